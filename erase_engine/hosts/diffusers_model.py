"""The denoiser adapter for diffusers models (SD1.x, SD2.x eps/v, SDXL)."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from .. import ldm_layout
from ..architectures import BaseModelInfo
from ..denoiser import (
    Conditioning,
    Denoiser,
    NoiseSchedule,
    single_token_id,
    to_signed_range,
    to_unit_range,
    token_rows,
    word_in_place,
)
from ..files import read_state_dict, sha256_of_file, weights_sha256
from ..tokenizer import check_vocab_size
from .diffusers_configs import CONFIG_METADATA_KEY

# Where each architecture keeps its text encoders in a single-file checkpoint, and their layout.
TEXT_ENCODER_LAYOUT = {
    "sd1": [("cond_stage_model.transformer.", "clip")],
    "sd2": [("cond_stage_model.model.", "open_clip")],
    "sdxl": [("conditioner.embedders.0.transformer.", "clip"), ("conditioner.embedders.1.model.", "open_clip")],
}


def ordered_config(config) -> dict:
    """A diffusers config with its set-ordered list sorted, so that the same model always
    writes the same header (``_use_default_values`` comes from a set: its order changes
    from one process to the next)."""
    config = dict(config)
    if "_use_default_values" in config:
        config["_use_default_values"] = sorted(config["_use_default_values"])
    return config


class DiffusersDenoiser(Denoiser):
    """UNet2DConditionModel + CLIP text encoder(s) + AutoencoderKL."""

    def __init__(
        self,
        unet: nn.Module,
        vae: nn.Module,
        text_encoders: list[nn.Module],
        tokenizers: list,
        schedule: NoiseSchedule,
        name: str,
        architecture: str,
        scheduler_config: dict,
        source_file: Path | None = None,
    ):
        expected = len(TEXT_ENCODER_LAYOUT[architecture])
        if len(text_encoders) != expected or len(tokenizers) != expected:
            raise ValueError(f"{architecture} needs {expected} text encoders and tokenizers")
        for tokenizer in tokenizers:
            check_vocab_size(tokenizer)
        for module in (unet, vae, *text_encoders):
            module.requires_grad_(False).eval()
        self.network = self.unet = unet
        self.vae = vae
        self.text_encoders, self.tokenizers = text_encoders, tokenizers
        self.schedule = schedule
        self.scheduler_config = scheduler_config
        self.source_file = source_file
        self.latent_channels = unet.config.in_channels
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.info = BaseModelInfo(name, architecture, unet.config.sample_size * self.vae_scale_factor)

    @property
    def is_sdxl(self) -> bool:
        return self.info.architecture == "sdxl"

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusersDenoiser:
        for module in (self.unet, self.vae, *self.text_encoders):
            module.to(device)
            if dtype is not None and module.dtype != dtype:
                module.to(dtype=dtype)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Conditioning:
        return self._encode(prompts)

    def encode_with_embedding(self, prompts: list[str], word: str, vectors: list[torch.Tensor]) -> Conditioning:
        tables = [
            (encoder.get_input_embeddings(), single_token_id(tokenizer, word))
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True)
        ]
        with word_in_place(tables, vectors):
            return self._encode(prompts)

    def word_vectors(self, text: str) -> list[torch.Tensor]:
        return [
            token_rows(encoder.get_input_embeddings().weight, tokenizer(text, add_special_tokens=False).input_ids, text)
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True)
        ]

    def _encode(self, prompts: list[str]) -> Conditioning:
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=encoder.config.max_position_embeddings,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=self.is_sdxl)
            if self.is_sdxl:  # SDXL: penultimate layer of both encoders, pooled from the second
                hidden.append(out.hidden_states[-2])
                pooled = getattr(out, "text_embeds", pooled)
            else:
                hidden.append(out.last_hidden_state)
        context = torch.cat(hidden, dim=-1).to(self.dtype)
        if not self.is_sdxl:
            return Conditioning(context)
        size = float(self.info.resolution)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=context.device, dtype=self.dtype)
        return Conditioning(
            context, {"text_embeds": pooled.to(self.dtype), "time_ids": time_ids.repeat(len(prompts), 1)}
        )

    def _predict(self, x_t, t, cond, weights):
        added = cond.extras or None
        return self.call_network(
            weights, x_t, t, encoder_hidden_states=cond.context, added_cond_kwargs=added, return_dict=False
        )[0]

    def ldm_name(self, module_path: str) -> str:
        return ldm_layout.unet_ldm_name(module_path, self.unet.config)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        return to_unit_range(images)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        moments = self.vae.encode(to_signed_range(images).to(self.vae.device, self.vae.dtype)).latent_dist
        return moments.mean * self.vae.config.scaling_factor

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        if self.source_file is not None:  # keep every tensor of the file the model came from
            return read_state_dict(self.source_file)[0]
        state = ldm_layout.unet_to_ldm(self.unet.state_dict(), self.unet.config)
        state |= ldm_layout.vae_to_ldm(self.vae.state_dict(), self.vae.config)
        layouts = TEXT_ENCODER_LAYOUT[self.info.architecture]
        for (prefix, layout), encoder in zip(layouts, self.text_encoders, strict=True):
            convert = ldm_layout.clip_to_ldm if layout == "clip" else ldm_layout.open_clip_to_ldm
            state |= convert(ldm_layout.canonical_clip_state(encoder), prefix)
        return state

    def reload_metadata(self) -> dict[str, str]:
        """The configs, so that this engine reloads the checkpoint offline whatever its size."""
        return {CONFIG_METADATA_KEY: json.dumps(self.diffusers_configs(), sort_keys=True, default=str)}

    def diffusers_configs(self) -> dict:
        """The configs that rebuild this model from a single file with no network."""
        configs = {
            "unet": ordered_config(self.unet.config),
            "vae": ordered_config(self.vae.config),
            "prediction_type": self.schedule.prediction_type,
            "scheduler": self.scheduler_config,
        }
        for i, encoder in enumerate(self.text_encoders):
            configs["text_encoder" + (f"_{i + 1}" if i else "")] = encoder.config.to_diff_dict()
        return configs

    @cached_property
    def sha256(self) -> str:
        """The source file's sha256 (what A1111 shows), else a hash of the UNet weights."""
        if self.source_file is not None:
            return sha256_of_file(self.source_file)
        return weights_sha256(self.unet)
