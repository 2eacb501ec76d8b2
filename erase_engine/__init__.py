"""Surgical concept erasing for Stable Diffusion ("All but One", AAAI 2024)."""

__version__ = "0.2.0"  # the same as pyproject.toml's (the Comfy Registry reads it there)

from .denoiser import BaseModelInfo, Conditioning, Denoiser, NoiseSchedule, UNetLayer  # noqa: E402
from .export import lora_state_dict, save_checkpoint, save_lora  # noqa: E402
from .loading import load_denoiser  # noqa: E402
from .objective import PRESETS, Objective, erase_target, make_objective  # noqa: E402
from .trainer import EraseConfig, Erasure, ErasureCancelled, erase_concept  # noqa: E402

__all__ = [
    "PRESETS",
    "BaseModelInfo",
    "Conditioning",
    "Denoiser",
    "EraseConfig",
    "Erasure",
    "ErasureCancelled",
    "NoiseSchedule",
    "Objective",
    "UNetLayer",
    "__version__",
    "erase_concept",
    "erase_target",
    "load_denoiser",
    "lora_state_dict",
    "make_objective",
    "save_checkpoint",
    "save_lora",
]
