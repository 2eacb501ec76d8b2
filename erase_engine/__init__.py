"""Surgical concept erasing for Stable Diffusion ("All but One", AAAI 2024)."""

from .architectures import BaseModelInfo
from .denoiser import Conditioning, Denoiser, NoiseSchedule
from .exports import lora_state_dict, save_checkpoint, save_lora
from .hosts.diffusers_loading import load_denoiser
from .layers import UNetLayer
from .objective import PRESETS, Objective, erase_target, make_objective
from .parameters import PARAMETERS, EraseConfig
from .trainer import Erasure, ErasureCancelled, ErasureFailed, erase_concept
from .version import __version__

__all__ = [
    "PARAMETERS",
    "PRESETS",
    "BaseModelInfo",
    "Conditioning",
    "Denoiser",
    "EraseConfig",
    "Erasure",
    "ErasureCancelled",
    "ErasureFailed",
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
