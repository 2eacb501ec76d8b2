"""The denoiser adapter for Automatic1111's own model object: an ldm ``LatentDiffusion``
(SD1.x, SD2.x eps or v) or an sgm ``DiffusionEngine`` (SDXL), used as it is loaded.

A1111's ``apply_model`` takes an integer timestep and returns the raw eps or v, which
is the engine's own convention; the UNet sits at ``model.model.diffusion_model``, so
``model.diffusion_model.*`` parameter names are the single-file names already.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property

import torch
from torch import nn

from ..architectures import ARCHITECTURES, LATENT_CHANNELS, SUPPORTED, VAE_SCALE_FACTOR
from ..denoiser import (
    Conditioning,
    Denoiser,
    NoiseSchedule,
    differentiable_encoding,
    single_token_id,
    to_signed_range,
    to_unit_range,
    token_rows,
    word_in_place,
)
from ..tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer

# A1111's models tell the families apart by their cross-attention context's width.
BY_CONTEXT_WIDTH = {a.context_width: a for a in ARCHITECTURES.values()}
PREDICTION = {"eps": "epsilon", "v": "v_prediction"}


class OutputFromTimestep(nn.Module):
    """The host's UNet wrapper (ldm ``DiffusionWrapper`` or sgm ``OpenAIWrapper``) under
    the name ``model``, called the way the host's ``apply_model`` calls it."""

    def __init__(self, wrapper: nn.Module, sdxl: bool):
        super().__init__()
        self.model, self.sdxl = wrapper, sdxl

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, vector: torch.Tensor | None = None):
        if self.sdxl:
            return self.model(x, t, {"crossattn": context, "vector": vector})
        return self.model(x, t, c_crossattn=[context])


def context_width(unet: nn.Module) -> int:
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_k"):
            return module.in_features
    raise ValueError(f"this model has no cross-attention layer; concept erasing supports {SUPPORTED}")


class A1111Denoiser(Denoiser):
    def __init__(self, model: nn.Module, name: str = "A1111 model", sha256: str | None = None):
        self.model = model
        self.is_sdxl = hasattr(model, "conditioner")  # sgm's DiffusionEngine
        width = context_width(model.model.diffusion_model)
        parameterization = getattr(model, "parameterization", "eps")
        if width not in BY_CONTEXT_WIDTH or parameterization not in PREDICTION:
            raise ValueError(
                f"concept erasing supports {SUPPORTED} (eps or v); this model has a {width}-wide "
                f"text context and {parameterization!r} parameterization"
            )
        prediction = PREDICTION[parameterization]
        self.network = OutputFromTimestep(model.model, self.is_sdxl)
        self.unet = model.model.diffusion_model
        self.weight_prefix = "model.diffusion_model."
        self.schedule = NoiseSchedule(model.alphas_cumprod.detach().double().cpu(), prediction)
        self.latent_channels, self.vae_scale_factor = LATENT_CHANNELS, VAE_SCALE_FACTOR
        self.info = BY_CONTEXT_WIDTH[width].info(name, prediction)
        self.known_sha256 = sha256
        # ldm's own gradient checkpointing (the configs' use_checkpoint: True) hides the weights that
        # functional_call passes in from autograd; A1111 >= 1.7 turns it off at load, older ones do not.
        self._checkpointed = [
            (module, flag)
            for module in model.model.diffusion_model.modules()
            for flag in ("use_checkpoint", "checkpoint")
            if getattr(module, flag, None) is True
        ]

    @contextmanager
    def _checkpointing_off(self) -> Iterator[None]:
        """For the duration of one of our forward passes only; the flags are restored after."""
        for module, flag in self._checkpointed:
            setattr(module, flag, False)
        try:
            yield
        finally:
            for module, flag in self._checkpointed:
                setattr(module, flag, True)

    def encode(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad():
            return self._conditioning(self.model.get_learned_conditioning(prompts))

    def _conditioning(self, cond) -> Conditioning:
        if self.is_sdxl:  # A1111's sgm models take the batch of prompts and return crossattn + vector
            return Conditioning(cond["crossattn"].to(self.dtype), {"vector": cond["vector"].to(self.dtype)})
        return Conditioning(cond.to(self.dtype))

    def encode_with_embedding(self, prompts: list[str], word: str, vectors: list[torch.Tensor]) -> Conditioning:
        """As A1111 puts a textual-inversion embedding in a prompt: its vectors take the places of
        the word's tokens in each encoder's token embeddings, and the model's own text encoding
        reads them (SDXL: ``vectors`` for CLIP-L, then OpenCLIP bigG)."""
        token_id = single_token_id(self._tokenizer, word)
        with word_in_place([(table, token_id) for table in self._token_tables()], vectors):
            cond = differentiable_encoding(self.model.get_learned_conditioning, self._text_encoders(), prompts)
        return self._conditioning(cond)

    def word_vectors(self, text: str) -> list[torch.Tensor]:
        ids = self._tokenizer(text, add_special_tokens=False).input_ids
        return [token_rows(table.weight, ids, text).float() for table in self._token_tables()]

    def _text_encoders(self) -> nn.Module:
        return self.model.conditioner if self.is_sdxl else self.model.cond_stage_model

    def _token_tables(self) -> list[nn.Embedding]:
        """Each text encoder's token-embedding table, in the order of an embedding file's vectors.
        (A1111 wraps each table in its own module that adds its embeddings: the table is inside.)"""
        return [
            module
            for module in self._text_encoders().modules()
            if isinstance(module, nn.Embedding) and module.num_embeddings == CLIP_VOCAB_SIZE
        ]

    @cached_property
    def _tokenizer(self):
        """CLIP's tokenizer: every text encoder of these families reads CLIP's BPE vocabulary
        (OpenCLIP's models too), so a word has the same token ids in each."""
        return clip_tokenizer()

    def _predict(self, x_t, t, cond, weights):
        with self._checkpointing_off():
            return self.call_network(weights, x_t, t, cond.context, cond.extras.get("vector"))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.model.decode_first_stage(latents.to(self.dtype))
        return to_unit_range(images)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        encoded = self.model.encode_first_stage(to_signed_range(images).to(self.device, self.dtype))
        if self.is_sdxl:  # sgm's encode_first_stage already returns the scaled latents
            return encoded
        return self.model.get_first_stage_encoding(encoded)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
