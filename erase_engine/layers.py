"""The UNet layers a delta can be attached to, and ESD's named sets of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

TRAINABLE_SETS = ("xattn", "xattn-kv", "noxattn", "full")


@dataclass(frozen=True)
class UNetLayer:
    """One weight-bearing layer of the UNet that a delta may be attached to."""

    ldm_name: str  # module path in the original ldm/sgm layout (names the LoRA key)
    weight_name: str  # parameter name inside ``Denoiser.network`` (for functional_call)
    module: nn.Module  # a linear or 2-d convolution layer


def is_weight_layer(module: nn.Module) -> bool:
    """A linear layer or a 2-d convolution, judged by its weight's shape: hosts build UNets
    from their own layer classes (Forge's are not torch's)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() in (2, 4)


def list_unet_layers(
    unet: nn.Module, weight_prefix: str = "", ldm_name: Callable[[str], str] = lambda path: path
) -> list[UNetLayer]:
    """Every layer of ``unet``; ``weight_prefix`` is the UNet's path inside the denoiser's
    network, ``ldm_name`` maps a module path to its original-layout name."""
    return [
        UNetLayer(ldm_name(path), f"{weight_prefix}{path}.weight", module)
        for path, module in unet.named_modules()
        if is_weight_layer(module)
    ]


def is_trainable(ldm_name: str, train: str) -> bool:
    """ESD's parameter groups, decided on original-layout names so every host agrees.

    ``xattn`` (ESD-x): cross-attention; ``xattn-kv``: only its key/value
    projections; ``noxattn`` (ESD-u): everything but cross-attention, the time
    embedding and the output head; ``full``: every layer.
    """
    if train == "xattn":
        return ".attn2." in ldm_name
    if train == "xattn-kv":
        return ldm_name.endswith((".attn2.to_k", ".attn2.to_v"))
    if train == "noxattn":
        return ".attn2." not in ldm_name and not ldm_name.startswith(("time_embed.", "out."))
    if train == "full":
        return True
    raise ValueError(f"unknown trainable set {train!r}; choose one of {', '.join(TRAINABLE_SETS)}")


def kohya_name(ldm_name: str) -> str:
    return "lora_unet_" + ldm_name.replace(".", "_")
