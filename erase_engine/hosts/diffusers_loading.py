"""Load a model with no network: a diffusers folder or a single-file checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..architectures import SUPPORTED
from ..builtin import BUILTIN_MODEL, SHAPES_WEIGHTS
from ..builtin.render import example_prompts
from ..denoiser import NoiseSchedule
from ..files import read_state_dict
from ..ldm_layout import clip_state_for
from ..tokenizer import clip_tokenizer
from .diffusers_configs import CONFIG_METADATA_KEY, SCHEDULER, STANDARD
from .diffusers_model import TEXT_ENCODER_LAYOUT, DiffusersDenoiser

# Key prefixes that identify model families this engine does not erase from.
OTHER_FAMILIES = {
    "model.diffusion_model.joint_blocks.": "Stable Diffusion 3",
    "joint_blocks.": "Stable Diffusion 3",
    "model.diffusion_model.double_blocks.": "Flux",
    "double_blocks.": "Flux",
    "conditioner.embedders.0.model.ln_final.weight": "SDXL refiner",
}


def detect_architecture(keys) -> str:
    keys = set(keys)
    if "conditioner.embedders.1.model.ln_final.weight" in keys:
        return "sdxl"
    if "cond_stage_model.model.ln_final.weight" in keys:
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return "sd1"
    for prefix, family in OTHER_FAMILIES.items():
        if any(k.startswith(prefix) for k in keys):
            raise ValueError(f"{family} checkpoints are not supported; concept erasing supports {SUPPORTED}")
    raise ValueError(f"not a checkpoint of a supported model ({SUPPORTED}): no known text encoder keys")


def noise_schedule(scheduler_config: dict, prediction_type: str) -> NoiseSchedule:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config({**scheduler_config, "prediction_type": prediction_type})
    return NoiseSchedule(scheduler.alphas_cumprod.double(), prediction_type)


def load_single_file(path: Path, prediction_type: str | None = None) -> DiffusersDenoiser:
    state, metadata = read_state_dict(path)
    architecture = detect_architecture(state)
    configs = json.loads(metadata[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in metadata else STANDARD[architecture]
    if "v_pred" in state:  # the marker some SD2-v / v-prediction checkpoints carry
        configs = {**configs, "prediction_type": "v_prediction"}
    return build_from_configs(configs, architecture, path.stem, state, path, prediction_type)


def build_from_configs(
    configs: dict,
    architecture: str,
    name: str,
    state: dict[str, torch.Tensor] | None = None,
    source_file: Path | None = None,
    prediction_type: str | None = None,
) -> DiffusersDenoiser:
    """The model described by diffusers ``configs``, with the weights of an
    original-layout ``state`` dict (random weights when it is None)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_config(configs["unet"])
    vae = AutoencoderKL.from_config(configs["vae"])
    if state is not None:
        _load_exactly(unet, convert_ldm_unet_checkpoint(state, unet.config), "UNet")
        _load_exactly(vae, convert_ldm_vae_checkpoint(state, vae.config), "VAE")

    encoders, tokenizers = [], []
    for i, (prefix, layout) in enumerate(TEXT_ENCODER_LAYOUT[architecture]):
        config = CLIPTextConfig(**configs["text_encoder" + (f"_{i + 1}" if i else "")])
        encoder = (CLIPTextModelWithProjection if architecture == "sdxl" and i == 1 else CLIPTextModel)(config)
        if state is not None:
            if layout == "clip":
                converted = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            else:  # diffusers 0.31 splits OpenCLIP's fused q/k/v by text_projection's width; SD2 files
                # may have none, and its fallback (projection_dim) is wrong for SD2: give it the width, no data
                width = {prefix + "text_projection": torch.empty(config.hidden_size, 0)}
                converted = convert_open_clip_checkpoint(encoder, {**width, **state}, prefix=prefix)
            _load_exactly(encoder, clip_state_for(encoder, converted), f"text encoder {i + 1}")
        encoders.append(encoder)
        tokenizers.append(clip_tokenizer("<|endoftext|>" if layout == "clip" else "!"))

    scheduler_config = configs.get("scheduler", SCHEDULER)
    schedule = noise_schedule(scheduler_config, prediction_type or configs["prediction_type"])
    return DiffusersDenoiser(
        unet, vae, encoders, tokenizers, schedule, name, architecture, scheduler_config, source_file
    )


def _load_exactly(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load weights, failing on any missing weight (buffers such as position ids may be absent)."""
    try:
        missing, _unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as error:  # size mismatches: a fine-tune of another shape, or another model family
        first = str(error).split("\n\t")[1] if "\n\t" in str(error) else str(error)
        raise ValueError(f"the checkpoint's {what} weights do not fit the model's shapes: {first}") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} {what} weights, e.g. {missing[:3]}")


def load_diffusers_folder(path: Path, prediction_type: str | None = None) -> DiffusersDenoiser:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    index = json.loads((path / "model_index.json").read_text())
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True, low_cpu_mem_usage=False)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True, low_cpu_mem_usage=False)
    names = ["text_encoder", "text_encoder_2"] if "text_encoder_2" in index else ["text_encoder"]
    encoders, tokenizers = [], []
    for name in names:
        encoder_class = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
        encoders.append(encoder_class.from_pretrained(path, subfolder=name, local_files_only=True))
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder=tokenizer_name, local_files_only=True))
    if len(names) == 2:
        architecture = "sdxl"
    else:  # OpenCLIP (SD2) uses gelu, OpenAI's CLIP (SD1) quick_gelu
        architecture = "sd2" if encoders[0].config.hidden_act == "gelu" else "sd1"
    scheduler_config = dict(DDPMScheduler.load_config(path, subfolder="scheduler", local_files_only=True))
    prediction_type = prediction_type or scheduler_config.get("prediction_type", "epsilon")
    schedule = noise_schedule(scheduler_config, prediction_type)
    return DiffusersDenoiser(unet, vae, encoders, tokenizers, schedule, path.name, architecture, scheduler_config)


def load_denoiser(
    model: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32, prediction_type: str | None = None
) -> DiffusersDenoiser:
    """A diffusers folder (with ``model_index.json``), a ``.safetensors``/``.ckpt`` file,
    or ``builtin:shapes`` (the demo model shipped with the engine)."""
    path = SHAPES_WEIGHTS if str(model) == BUILTIN_MODEL else Path(model)
    if path.is_dir() and (path / "model_index.json").exists():
        denoiser = load_diffusers_folder(path, prediction_type)
    elif path.is_file() and path.suffix in (".safetensors", ".ckpt"):
        denoiser = load_single_file(path, prediction_type)
    elif path.exists():
        raise ValueError(f"{path} is neither a diffusers folder (model_index.json) nor a .safetensors/.ckpt file")
    else:
        raise FileNotFoundError(f"no model at {path}")
    if path == SHAPES_WEIGHTS:
        denoiser.example_prompts = example_prompts()
    return denoiser.to(device, dtype)
