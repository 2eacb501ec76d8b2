"""Trainable weight deltas: low-rank (LoRA) or full-rank, on a chosen set of layers.

The host's weights are never modified; ``WeightDeltas.patched_weights`` returns
``W + delta`` tensors that the denoiser swaps in for the student's forward pass.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layers import UNetLayer, is_trainable, lora_name


class LoRADelta(nn.Module):
    """``delta = up @ down * alpha / rank``; a conv layer gets a conv-shaped down
    projection and a 1x1 up projection (kohya's LoCon convention)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float):
        super().__init__()
        out_features, in_features = weight.shape[0], weight.shape[1:].numel()
        rank = min(rank, out_features, in_features)
        self.weight_shape = weight.shape
        self.rank, self.alpha = rank, float(alpha)
        self.down = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.up = nn.Parameter(torch.zeros(out_features, rank))  # zero: the student starts as the teacher

    def forward(self) -> torch.Tensor:
        return (self.up @ self.down * (self.alpha / self.rank)).reshape(self.weight_shape)

    def step_sizes(self, weight: torch.Tensor, relative_step: float) -> list[dict]:
        """Learning rates at which one step changes ``down`` and ``delta`` by about
        ``relative_step`` of ``down``'s and the weight's RMS: a step of ``lr`` on every entry of
        ``up`` moves ``delta`` by about ``lr * alpha / rank * sqrt(rank) * rms(down)``."""
        down_rms = _rms(self.down)
        delta_per_up = self.alpha / self.rank * self.rank**0.5 * down_rms
        return [
            {"params": [self.down], "lr": relative_step * down_rms},
            {"params": [self.up], "lr": relative_step * _rms(weight) / delta_per_up},
        ]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(down, up, alpha) shaped as kohya stores them."""
        extra = (1,) * (len(self.weight_shape) - 2)
        down = self.down.detach().reshape(self.rank, *self.weight_shape[1:])
        up = self.up.detach().reshape(*self.up.shape, *extra)
        return down, up, self.alpha


class FullDelta(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(weight.shape))

    def forward(self) -> torch.Tensor:
        return self.delta

    def step_sizes(self, weight: torch.Tensor, relative_step: float) -> list[dict]:
        """The learning rate at which one step changes the weight by ``relative_step`` of its RMS."""
        return [{"params": [self.delta], "lr": relative_step * _rms(weight)}]


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.detach().float().pow(2).mean().sqrt().clamp_min(1e-12))


class WeightDeltas(nn.Module):
    """The trained state of an erasure: one delta per selected UNet layer (``by_layer``),
    keyed by its kohya name."""

    def __init__(self, layers: dict[str, UNetLayer], deltas: dict[str, nn.Module], rank: int | None, alpha: float):
        super().__init__()
        if not layers:
            raise ValueError("no layer of this model is selected")
        self.layers, self.rank, self.alpha = layers, rank, alpha
        self.by_layer = nn.ModuleDict(deltas)

    @classmethod
    def create(cls, layers: list[UNetLayer], train: str, rank: int | None, alpha: float | None = None) -> WeightDeltas:
        """Fresh deltas (the student starts equal to the teacher) on the ``train`` set."""
        selected = {layer.lora_name: layer for layer in layers if is_trainable(layer.ldm_name, train)}
        if not selected:
            raise ValueError(f"the trainable set {train!r} selects no layer of this model")
        alpha = float(alpha if alpha is not None else (rank or 0))
        widest = max(min(layer.module.weight.shape[0], layer.module.weight[0].numel()) for layer in selected.values())
        if rank and rank > widest:  # a narrower layer gets a rank it can hold (LoRADelta clamps it)
            raise ValueError(
                f"LoRA rank {rank} is larger than any selected layer allows (at most {widest}); "
                "choose a smaller rank, or full rank"
            )
        deltas = {
            key: LoRADelta(layer.module.weight, rank, alpha) if rank else FullDelta(layer.module.weight)
            for key, layer in selected.items()
        }
        return cls(selected, deltas, rank, alpha)

    @classmethod
    def from_lora(cls, layers: list[UNetLayer], state: dict[str, torch.Tensor]) -> WeightDeltas:
        """Deltas read back from a kohya LoRA state dict (every key must match a layer), whether
        its keys name layers the way kohya names them for the family or by their original-layout
        paths (as this engine wrote every family's LoRAs before)."""
        by_name = {lora_name(layer.ldm_name): layer for layer in layers} | {layer.lora_name: layer for layer in layers}
        modules = sorted({k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in state})
        unknown = [m for m in modules if m not in by_name]
        if unknown:
            raise ValueError(f"{len(unknown)} LoRA modules match no layer of this model, e.g. {unknown[:3]}")
        deltas = {}
        for key in modules:
            down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
            rank, weight = down.shape[0], by_name[key].module.weight
            if up.shape[0] != weight.shape[0] or down[0].numel() != weight[0].numel():
                raise ValueError(
                    f"this LoRA was made for another base model: {key} is {up.shape[0]}x{down[0].numel()}, "
                    f"the model's layer is {weight.shape[0]}x{weight[0].numel()}"
                )
            alpha = float(state[f"{key}.alpha"]) if f"{key}.alpha" in state else float(rank)
            delta = LoRADelta(by_name[key].module.weight, rank, alpha)
            delta.down.data.copy_(down.reshape(rank, -1))
            delta.up.data.copy_(up.reshape(up.shape[0], rank))
            deltas[by_name[key].lora_name] = delta
        rank = max(d.rank for d in deltas.values())
        alpha = next(iter(deltas.values())).alpha
        layers_read = {by_name[key].lora_name: by_name[key] for key in modules}
        return cls(layers_read, deltas, rank, alpha).requires_grad_(False)

    def parameter_groups(self, lr: float | None, relative_step: float) -> list[dict]:
        """The optimizer's parameter groups: one learning rate ``lr`` for all, or (None) each
        layer's own, at which a step changes its weight by ``relative_step`` of the weight's
        RMS: the same change on models whose weights differ in scale (docs/method.md, section 8)."""
        if lr is not None:
            return [{"params": list(self.parameters()), "lr": lr}]
        return [
            group
            for key, delta in self.by_layer.items()
            for group in delta.step_sizes(self.layers[key].module.weight, relative_step)
        ]

    @property
    def is_lora(self) -> bool:
        return self.rank is not None

    def delta(self, key: str) -> torch.Tensor:
        return self.by_layer[key]()

    def patched_weights(self) -> dict[str, torch.Tensor]:
        """``{unet parameter name: W + delta}`` for functional_call."""
        patched = {}
        for key, layer in self.layers.items():
            weight = layer.module.weight.detach()  # no gradient may reach the host's weights
            patched[layer.weight_name] = weight + self.delta(key).to(weight.dtype)
        return patched
