"""The one interface the engine sees: a denoiser adapter that hides the host.

An adapter gives the noise schedule, a text encoder (prompts -> conditioning)
and a prediction call ``output(x_t, t, cond, deltas)``.  Everything else in the
engine (objective, trajectory cache, trainer, exports) only talks to this.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import functional_call

from .architectures import ARCHITECTURES, BaseModelInfo
from .files import weights_sha256
from .layers import UNetLayer, is_weight_layer, lora_name
from .ldm_layout import unet_diffusers_names

if TYPE_CHECKING:
    from .deltas import WeightDeltas


@dataclass(frozen=True)
class NoiseSchedule:
    """The discrete training schedule: ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``."""

    alphas_cumprod: torch.Tensor  # [T], float64
    prediction_type: str  # "epsilon" or "v_prediction"

    def __post_init__(self) -> None:
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction type {self.prediction_type!r}")

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``a_t`` broadcast against ``like`` (t may be a tensor of timesteps)."""
        a = self.alphas_cumprod.to(like.device)[t.long().to(like.device)]
        return a.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def eps_and_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a model output (eps or v) into (eps, x0) at ``x_t``."""
        a = self.alpha(t, x_t)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        if self.prediction_type == "epsilon":
            eps = output
            x0 = (x_t - s1a * eps) / sa
        else:
            x0 = sa * x_t - s1a * output
            eps = s1a * x_t + sa * output
        return eps, x0


@dataclass
class Conditioning:
    """A batch of text conditioning: the cross-attention context plus any
    host-specific extras (SDXL's pooled embedding and size ids), all batch-first."""

    context: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.context.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(fn(self.context), {k: fn(v) for k, v in self.extras.items()})

    def __getitem__(self, index) -> Conditioning:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return self._map(lambda v: v[index])

    def repeat(self, n: int) -> Conditioning:
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def to(self, device: torch.device | str) -> Conditioning:
        return self._map(lambda v: v.to(device))

    def detached(self) -> Conditioning:
        """A normal-tensor copy, safe to use in autograd even if the host computed
        it under ``torch.inference_mode``."""
        return self._map(lambda v: v.detach().clone())

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        return Conditioning(
            torch.cat([c.context for c in items]),
            {k: torch.cat([c.extras[k] for c in items]) for k in items[0].extras},
        )


class Denoiser(ABC):
    """Host-independent view of a text-to-image diffusion model.

    An adapter sets ``network`` (the module a prediction runs: the UNet itself, or the
    host's wrapper around it), ``unet`` (the UNet inside it, whose layers get deltas) and
    ``weight_prefix`` (the UNet's path inside ``network``), and implements the abstract
    methods; layers, hashing and the student's forward pass are the same for every host.
    """

    network: nn.Module
    unet: nn.Module
    weight_prefix: str = ""
    schedule: NoiseSchedule
    latent_channels: int
    vae_scale_factor: int  # image pixels per latent pixel
    info: BaseModelInfo
    known_sha256: str | None = None  # the host's own hash of the model file, when it has one
    # Sentences the model is known to be asked (its model card's): an erasure is trained in those
    # that hold the concept (EraseConfig.in_model_sentences). A host's model declares none.
    example_prompts: tuple[str, ...] = ()

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network.parameters()).dtype

    @abstractmethod
    def encode(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for a list of prompts (empty string: unconditional)."""

    def encode_with_embedding(self, prompts: list[str], word: str, vectors: list[torch.Tensor]) -> Conditioning:
        """``encode``, differentiable, with the k-th occurrence of the one-token ``word`` in a prompt
        replaced by ``vectors[i][k]`` in text encoder i (a textual-inversion embedding)."""
        raise NotImplementedError(f"learning a token embedding is not supported on {type(self).__name__} models yet")

    def word_vectors(self, text: str) -> list[torch.Tensor]:
        """Each text encoder's input embeddings of ``text``'s tokens ([tokens, width] each)."""
        raise NotImplementedError(f"reading token embeddings is not supported on {type(self).__name__} models yet")

    @abstractmethod
    def _predict(
        self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, weights: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Raw model output (eps or v) with ``weights`` overriding ``network`` parameters."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], shape [B, 3, H, W]."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> latents (the mean of the encoder's distribution)."""

    @abstractmethod
    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model (UNet, text encoders, VAE) in the original single-file layout."""

    def ldm_name(self, module_path: str) -> str:
        """A UNet module's name in the original layout (most hosts use it already)."""
        return module_path

    def unet_layers(self) -> list[UNetLayer]:
        """Every linear and convolution layer of the UNet (judged by its weight's shape: hosts
        build UNets from their own layer classes), with its original-layout name and its key
        in a LoRA file, as kohya's trainer names that layer for this family."""
        found = [(path, module) for path, module in self.unet.named_modules() if is_weight_layer(module)]
        ldm_names = [self.ldm_name(path) for path, _ in found]
        layout = ARCHITECTURES[self.info.architecture].lora_layout
        lora_paths = ldm_names if layout == "ldm" else unet_diffusers_names(ldm_names)
        return [
            UNetLayer(ldm, lora_name(lora_path), f"{self.weight_prefix}{path}.weight", module)
            for (path, module), ldm, lora_path in zip(found, ldm_names, lora_paths, strict=True)
        ]

    def reload_metadata(self) -> dict[str, str]:
        """Header entries a checkpoint of this model needs to be reloaded by this adapter."""
        return {}

    @cached_property
    def sha256(self) -> str:
        """The base model's hash: the host's own, else one of the UNet's weights (seconds)."""
        return self.known_sha256 or weights_sha256(self.unet)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int]:
        """(channels, height, width) of the latents of square images of ``resolution`` pixels."""
        pixels = resolution or self.info.resolution
        if pixels % self.vae_scale_factor:
            raise ValueError(f"resolution must be a multiple of {self.vae_scale_factor}, got {pixels}")
        size = pixels // self.vae_scale_factor
        return (self.latent_channels, size, size)

    def output(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        deltas: WeightDeltas | None = None,
    ) -> torch.Tensor:
        """Model output in its own space (eps or v); with ``deltas`` the student's.

        The base weights are never touched: the student's forward pass swaps in
        ``W + delta`` through ``torch.func.functional_call``.
        """
        weights = deltas.patched_weights() if deltas is not None else {}
        return self._predict(x_t, t, cond, weights)

    def call_network(self, weights: dict[str, torch.Tensor], *args, **kwargs):
        if not weights and not torch.is_grad_enabled():  # the frozen model, in a pass autograd does not record
            return self.network(*args, **kwargs)
        return functional_call(self.network, {**self._frozen_weights(), **weights}, args, kwargs, strict=False)

    _aliases: tuple[tuple[int, ...], dict[str, torch.Tensor]] | None = None  # (parameter addresses, aliases)

    def _frozen_weights(self) -> dict[str, torch.Tensor]:
        """What the student sees of every weight it does not train: an alias of the same
        memory that needs no gradient (a host's parameters may ask for one: A1111's do, and
        autograd would fill a ``.grad`` the size of the UNet) and that autograd can save (a
        host may have made its weights under ``torch.inference_mode``: ComfyUI's, Forge's).
        Rebuilt if the host swapped any parameter."""
        addresses = tuple(p.data_ptr() for p in self.network.parameters())
        if self._aliases is None or self._aliases[0] != addresses:
            self._aliases = addresses, normal_parameters(self.network)
        return self._aliases[1]


def token_rows(table: torch.Tensor, ids: list[int], text: str) -> torch.Tensor:
    """A copy of a token-embedding table's rows for ``text``'s token ``ids`` (``word_vectors``)."""
    if not ids:
        raise ValueError(f"{text!r} has no tokens")
    return table[torch.tensor(ids, device=table.device)].detach().clone()


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word``, which must be one token of ``tokenizer``."""
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{word!r} is {len(ids)} tokens of this tokenizer, not one")
    return ids[0]


def replace_word_embedding(token_id: int, rows: torch.Tensor):
    """A forward hook for a text encoder's token-embedding table: the k-th occurrence of
    ``token_id`` in a prompt gets ``rows[k]`` (as A1111 and ComfyUI put a textual-inversion
    embedding's vectors in place of its name's tokens, before the position embeddings)."""

    def hook(module, inputs, output):
        found = inputs[0] == token_id
        if not found.any():
            return output
        order = found.long().cumsum(dim=1) - 1  # which occurrence in its prompt
        if int(order.max()) >= len(rows):
            raise ValueError(f"a prompt holds the placeholder more than the embedding's {len(rows)} times")
        output = output.clone()
        output[found] = rows[order[found]].to(output.dtype)
        return output

    return hook


@contextmanager
def word_in_place(tables: list[tuple[nn.Embedding, int]], vectors: list[torch.Tensor]) -> Iterator[None]:
    """While inside: each (token-embedding table, the word's token id) reads the word as its
    ``vectors`` (one tensor per table, in order)."""
    with ExitStack() as hooks:
        for (table, token_id), rows in zip(tables, vectors, strict=True):
            replace = replace_word_embedding(token_id, rows.to(table.weight.device))
            hooks.callback(table.register_forward_hook(replace).remove)
        yield


class HostEncoding(nn.Module):
    """A host's own prompt encoding as a module call over its text encoders, so that
    ``functional_call`` can lend it normal aliases of their weights that need no gradient (a
    host's weights may ask for one, or be inference tensors that autograd cannot save)."""

    def __init__(self, encode: Callable[[list[str]], Any], text_encoders: nn.Module):
        super().__init__()
        self.model = text_encoders  # the modules the host's ``encode`` calls
        self.encode_prompts = encode

    def forward(self, prompts: list[str]):
        return self.encode_prompts(prompts)


def differentiable_encoding(encode: Callable[[list[str]], Any], text_encoders: nn.Module, prompts: list[str]):
    """``encode(prompts)`` with autograd on, through aliases of ``text_encoders``' weights
    that get no gradient (``HostEncoding``)."""
    module = HostEncoding(encode, text_encoders)
    return functional_call(module, normal_parameters(module), (prompts,))


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """A VAE's output in [-1, 1] as images in [0, 1] (float32)."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_signed_range(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as a VAE's input in [-1, 1]."""
    return images * 2 - 1


def _saved_copy(tensor: torch.Tensor) -> torch.Tensor:
    """What autograd keeps of an activation: a copy, so later in-place updates cannot change it."""
    return tensor.clone() if tensor.grad_fn is not None else tensor


def copying_saved_activations() -> torch.autograd.graph.saved_tensors_hooks:
    """A context for hosts' inference code that updates activations in place after autograd saved
    them (``x += residual``): autograd keeps copies instead (more activation memory)."""
    return torch.autograd.graph.saved_tensors_hooks(_saved_copy, lambda tensor: tensor)


def normal_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter of ``module`` as a normal alias that needs no gradient, by name (for
    ``functional_call``: see ``Denoiser._frozen_weights``)."""
    return {name: normal_alias(p.detach()) for name, p in module.named_parameters()}


def normal_alias(tensor: torch.Tensor) -> torch.Tensor:
    """A normal tensor over the same memory as ``tensor`` (which may be an inference tensor)."""
    with torch.inference_mode(False):
        alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
        return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())
