"""Load a model with no network: a diffusers folder or a single-file checkpoint."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch

from .configs import SCHEDULER, STANDARD
from .denoiser import NoiseSchedule
from .diffusers_denoiser import TEXT_ENCODER_LAYOUT, DiffusersDenoiser
from .ldm_layout import clip_state_for

CONFIG_METADATA_KEY = "erase_engine.diffusers_configs"
BUILTIN_SHAPES = "builtin:shapes"
CLIP_VOCAB_ENV = "ERASE_ENGINE_CLIP_VOCAB"


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def clip_vocab_path() -> Path:
    """CLIP's BPE merges file, from ``$ERASE_ENGINE_CLIP_VOCAB`` or the open-clip-torch package."""
    if env := os.environ.get(CLIP_VOCAB_ENV):
        return Path(env)
    spec = importlib.util.find_spec("open_clip")  # located, not imported (it would import torchvision)
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        "the CLIP tokenizer vocabulary was not found: `pip install --no-deps open-clip-torch` ships it, "
        f"or point {CLIP_VOCAB_ENV} at a bpe_simple_vocab_16e6.txt.gz"
    )


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The real CLIP tokenizer (49408 tokens), built offline from the BPE merges."""
    from transformers import CLIPTokenizer

    lines = gzip.open(clip_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    if tokenizer.vocab_size != 49408:
        raise RuntimeError(f"built a CLIP tokenizer with {tokenizer.vocab_size} tokens, expected 49408")
    return tokenizer


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a ``.safetensors`` or ``.ckpt`` file.

    A ``.ckpt`` is unpickled with ``weights_only=True``: a file that holds code is refused.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{path.name} is not a readable .safetensors file (corrupt or truncated?): {error}"
            ) from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path.name} holds more than weights and is refused (convert it to .safetensors): {error}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path.name} is not a readable .ckpt file (corrupt or truncated?): {error}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path.name} holds no state dict")
    return checkpoint.get("state_dict", checkpoint), {}


SUPPORTED_ARCHITECTURES = "Stable Diffusion 1.x, 2.x and XL"
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
            raise ValueError(
                f"{family} checkpoints are not supported; concept erasing supports {SUPPORTED_ARCHITECTURES}"
            )
    raise ValueError(f"not a checkpoint of a supported model ({SUPPORTED_ARCHITECTURES}): no known text encoder keys")


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
    if str(model) == BUILTIN_SHAPES:
        from .builtin.train_model import WEIGHTS as model
    path = Path(model)
    if path.is_dir() and (path / "model_index.json").exists():
        denoiser = load_diffusers_folder(path, prediction_type)
    elif path.is_file() and path.suffix in (".safetensors", ".ckpt"):
        denoiser = load_single_file(path, prediction_type)
    elif path.exists():
        raise ValueError(f"{path} is neither a diffusers folder (model_index.json) nor a .safetensors/.ckpt file")
    else:
        raise FileNotFoundError(f"no model at {path}")
    for module in (denoiser.unet, denoiser.vae, *denoiser.text_encoders):
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
    return denoiser
