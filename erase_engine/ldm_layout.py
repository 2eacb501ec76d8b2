"""Names and layouts of the original (ldm/sgm) single-file checkpoints.

diffusers renames the original modules; the exports speak the original
language (kohya LoRA keys, ``model.diffusion_model.*`` checkpoints), so this
module maps diffusers names back.  The reverse direction (original ->
diffusers) is diffusers' own ``single_file_utils``; the tests check that the
two round-trip exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_UNET_FIXED = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _layers_per_block(unet_config: Mapping) -> int:
    layers = unet_config["layers_per_block"]
    if isinstance(layers, (list, tuple)):
        if len(set(layers)) != 1:
            raise ValueError("the original layout needs the same number of layers in every block")
        layers = layers[0]
    return int(layers)


def unet_ldm_name(name: str, unet_config: Mapping) -> str:
    """Map a diffusers UNet module or parameter name to its ldm/sgm name.

    ``down_blocks.0.attentions.1.proj_in`` -> ``input_blocks.2.1.proj_in``.
    """
    per_block = _layers_per_block(unet_config)
    for prefix, ldm in _UNET_FIXED.items():
        if name == prefix or name.startswith(prefix + "."):
            return ldm + name[len(prefix) :]

    def join(*parts: str | None) -> str:
        return ".".join(p for p in parts if p)

    def resnet(tail: str | None) -> str:
        part, _, rest = (tail or "").partition(".")
        return join(_RESNET_PARTS[part], rest) if part else ""

    tail = r"(?:\.(.+))?"  # a module path stops here; a parameter name goes on
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)" + tail, name):
        index = 1 + int(m[1]) * (per_block + 1) + int(m[3])
        if m[2] == "resnets":
            return join(f"input_blocks.{index}.0", resnet(m[4]))
        return join(f"input_blocks.{index}.1", m[4])
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv" + tail, name):
        return join(f"input_blocks.{(int(m[1]) + 1) * (per_block + 1)}.0.op", m[2])
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)" + tail, name):
        if m[1] == "resnets":
            return join(f"middle_block.{2 * int(m[2])}", resnet(m[3]))
        return join("middle_block.1", m[3])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)" + tail, name):
        index = int(m[1]) * (per_block + 1) + int(m[3])
        if m[2] == "resnets":
            return join(f"output_blocks.{index}.0", resnet(m[4]))
        return join(f"output_blocks.{index}.1", m[4])
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv" + tail, name):
        block = int(m[1])
        has_attention = "CrossAttn" in unet_config["up_block_types"][block]
        index = block * (per_block + 1) + per_block
        return join(f"output_blocks.{index}.{2 if has_attention else 1}.conv", m[2])
    raise KeyError(f"no original-layout name for UNet parameter {name!r}")


_RESNET_NAMES = {ldm: diffusers for diffusers, ldm in _RESNET_PARTS.items()}
_UNET_FIXED_NAMES = {ldm: diffusers for diffusers, ldm in _UNET_FIXED.items()}


def layers_per_block(ldm_names: list[str]) -> int:
    """The resnets per down block of a UNet, from its layers' original-layout names: the
    down path has ``levels * n`` resnets, the up path ``levels * (n + 1)``."""
    down = {n.split(".")[1] for n in ldm_names if re.match(r"input_blocks\.\d+\.0\.in_layers\.", n)}
    up = {n.split(".")[1] for n in ldm_names if re.match(r"output_blocks\.\d+\.0\.in_layers\.", n)}
    if not down or len(up) <= len(down):
        raise ValueError("not a UNet in the original layout: its down and up paths do not match")
    return len(down) // (len(up) - len(down))


def unet_diffusers_name(name: str, per_block: int) -> str:
    """The inverse of ``unet_ldm_name`` for a module path: ``input_blocks.2.1.proj_in`` ->
    ``down_blocks.0.attentions.1.proj_in`` (``per_block`` resnets per down block)."""
    for prefix, diffusers in _UNET_FIXED_NAMES.items():
        if name == prefix or name.startswith(prefix + "."):
            return diffusers + name[len(prefix) :]

    def resnet_part(rest: str) -> str:
        for ldm, diffusers in _RESNET_NAMES.items():
            if rest == ldm or rest.startswith(ldm + "."):
                return diffusers + rest[len(ldm) :]
        raise KeyError(f"no diffusers name for UNet module {name!r}")

    if m := re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", name):
        level, position = divmod(int(m[1]) - 1, per_block + 1)
        if position == per_block:  # the level's downsampler
            return f"down_blocks.{level}.downsamplers.0.conv"
        if m[2] == "0":
            return f"down_blocks.{level}.resnets.{position}.{resnet_part(m[3])}"
        return f"down_blocks.{level}.attentions.{position}.{m[3]}"
    if m := re.fullmatch(r"middle_block\.(\d)\.(.+)", name):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}"
        return f"mid_block.resnets.{int(m[1]) // 2}.{resnet_part(m[2])}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.([012])\.(.+)", name):
        block, position = divmod(int(m[1]), per_block + 1)
        if m[3] == "conv" and m[2] != "0":  # the block's upsampler (after its attention, if any)
            return f"up_blocks.{block}.upsamplers.0.conv"
        if m[2] == "0":
            return f"up_blocks.{block}.resnets.{position}.{resnet_part(m[3])}"
        return f"up_blocks.{block}.attentions.{position}.{m[3]}"
    raise KeyError(f"no diffusers name for UNet module {name!r}")


def unet_diffusers_names(ldm_names: list[str]) -> list[str]:
    """The diffusers module paths of a UNet's layers, from their original-layout names."""
    per_block = layers_per_block(ldm_names)
    return [unet_diffusers_name(name, per_block) for name in ldm_names]


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    return {UNET_PREFIX + unet_ldm_name(k, unet_config): v for k, v in state_dict.items()}


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor], vae_config: Mapping) -> dict[str, torch.Tensor]:
    """AutoencoderKL parameters -> ``first_stage_model.*`` (attention as 1x1 convs)."""
    up_blocks = len(vae_config["block_out_channels"])
    out = {}
    for name, value in state_dict.items():
        new = name.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(
            r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.",
            lambda m: (
                f"decoder.up.{up_blocks - 1 - int(m[1])}." + (f"block.{m[3]}." if m[2] == "resnets" else "upsample.")
            ),
            new,
        )
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        if m := re.fullmatch(r"(.*)mid_block\.attentions\.0\.(.+)\.(weight|bias)", new):
            new = f"{m[1]}mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value.reshape(*value.shape, 1, 1)
        out[VAE_PREFIX + new] = value
    return out


def canonical_clip_state(encoder: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights under the ``text_model.*`` names that
    original checkpoints use (transformers 5 dropped that prefix from its own names)."""
    return {
        k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
        for k, v in encoder.state_dict().items()
    }


def clip_state_for(encoder: torch.nn.Module, canonical: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``canonical_clip_state``: names as this transformers version wants them."""
    if any(k.startswith("text_model.") for k in encoder.state_dict()):
        return dict(canonical)
    return {k.removeprefix("text_model."): v for k, v in canonical.items()}


def clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys stored as they are, under ``prefix``."""
    return {prefix + k: v for k, v in state_dict.items() if not k.endswith("position_ids")}


_OPEN_CLIP_PARTS = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def open_clip_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIP text model -> OpenCLIP layout (fused qkv, transposed projection)."""
    out = {}
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    for name, value in state_dict.items():
        if name in fixed:
            out[prefix + fixed[name]] = value
        elif name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name):
            layer, part, kind = m[1], m[2], m[3]
            block = f"{prefix}transformer.resblocks.{layer}."
            if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if part == "self_attn.q_proj":
                    qkv = [state_dict[f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            else:
                out[f"{block}{_OPEN_CLIP_PARTS[part]}.{kind}"] = value
    return out
