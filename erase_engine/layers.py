"""The UNet layers a delta can be attached to, and ESD's named sets of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

TRAINABLE_SETS = ("xattn", "xattn-kv", "noxattn", "full")

# SDXL's pooled text embedding enters the UNet beside cross-attention, through the first layer
# of the added-conditioning MLP (sgm's ``label_emb``, diffusers' ``add_embedding``): the one
# other layer that reads the prompt.
POOLED_TEXT_LAYER = "label_emb.0.0"


@dataclass(frozen=True)
class UNetLayer:
    """One weight-bearing layer of the UNet that a delta may be attached to."""

    ldm_name: str  # module path in the original ldm/sgm layout
    lora_name: str  # the key kohya's trainer writes for it (``lora_unet_…``): see ``lora_name``
    weight_name: str  # parameter name inside ``Denoiser.network`` (for functional_call)
    module: nn.Module  # a linear or 2-d convolution layer


def is_weight_layer(module: nn.Module) -> bool:
    """A linear layer or a 2-d convolution, judged by its weight's shape: hosts build UNets
    from their own layer classes (Forge's are not torch's)."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() in (2, 4)


def is_trainable(ldm_name: str, train: str) -> bool:
    """ESD's parameter groups, decided on original-layout names so every host agrees.

    ``xattn`` (ESD-x): the layers that read the prompt, cross-attention and on SDXL the
    pooled text embedding's projection; ``xattn-kv``: only cross-attention's key/value
    projections (and that projection); ``noxattn`` (ESD-u): everything but cross-attention,
    the time embedding and the output head; ``full``: every layer.
    """
    if train == "xattn":
        return ".attn2." in ldm_name or ldm_name == POOLED_TEXT_LAYER
    if train == "xattn-kv":
        return ldm_name.endswith((".attn2.to_k", ".attn2.to_v")) or ldm_name == POOLED_TEXT_LAYER
    if train == "noxattn":
        return ".attn2." not in ldm_name and not ldm_name.startswith(("time_embed.", "out."))
    if train == "full":
        return True
    raise ValueError(f"unknown trainable set {train!r}; choose one of {', '.join(TRAINABLE_SETS)}")


def lora_name(module_path: str) -> str:
    """kohya's key for a UNet module: ``lora_unet_`` and its path with ``_`` for ``.``.  kohya's
    trainer names SD1/SD2 modules by their diffusers paths and SDXL's by their original
    (sgm) ones, and diffusers' loader reads only those: ``Architecture.lora_layout`` says which."""
    return "lora_unet_" + module_path.replace(".", "_")
