"""The denoiser adapter for ComfyUI: a MODEL (ModelPatcher), a CLIP and optionally a VAE.

Only importable inside a ComfyUI process.  ComfyUI's ``apply_model`` takes a
sigma and returns the denoised x0 (``SigmaDenoiser`` converts); the schedule comes
from the MODEL's ``model_sampling``.  Nothing the host owns is modified: the
student's weights are swapped in with ``functional_call``.
"""

from __future__ import annotations

import math
import numbers

import comfy.model_management
import comfy.model_sampling
import torch
from torch import nn
from torch.func import functional_call

from ..denoiser import Conditioning, copying_saved_activations, normal_parameters, token_rows
from .sigma import SigmaDenoiser

# ComfyUI's model config class -> the engine's architecture name
ARCHITECTURE = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl"}
PREDICTION = {comfy.model_sampling.EPS: "epsilon", comfy.model_sampling.V_PREDICTION: "v_prediction"}
# ComfyUI's names of the text encoders (``clip_<key>`` in its tokenizer and model), in the order
# embedding files and the other adapters keep them: CLIP-L (SD2: OpenCLIP-H), then SDXL's OpenCLIP-G.
ENCODER_KEYS = ("l", "h", "g")


def model_family(patcher) -> tuple[str, str]:
    """(architecture, prediction type), or a clear error for other models."""
    config_name = type(patcher.model.model_config).__name__
    sampling = patcher.get_model_object("model_sampling")
    bases = type(sampling).__bases__
    prediction = next((PREDICTION[b] for b in bases if b in PREDICTION), None)
    if config_name not in ARCHITECTURE or comfy.model_sampling.ModelSamplingDiscrete not in bases or prediction is None:
        raise ValueError(
            f"concept erasing supports SD1.x, SD2.x and SDXL models with a discrete eps or v schedule; "
            f"this MODEL is {config_name} with {type(sampling).__name__} sampling"
        )
    return ARCHITECTURE[config_name], prediction


class TextEncoding(nn.Module):
    """ComfyUI's own text encoding (``CLIP.encode_from_tokens``) as a module call, so that
    ``functional_call`` can lend it normal aliases of its weights: ComfyUI made them as inference
    tensors, which autograd cannot save for a gradient to the token embeddings."""

    def __init__(self, clip):
        super().__init__()
        self.model = clip.cond_stage_model
        self.clip = [clip]  # in a list: not a submodule

    def forward(self, tokens: dict) -> dict:
        return self.clip[0].encode_from_tokens(tokens, return_pooled=True, return_dict=True)


class ComfyDenoiser(SigmaDenoiser):
    def __init__(self, model, clip, vae=None):
        architecture, prediction = model_family(model)
        self.patcher, self.clip, self.vae = model, clip, vae
        self.base = model.model
        name = f"ComfyUI {type(self.base.model_config).__name__} model"
        self._use_model(self.base, model.get_model_object("model_sampling").sigmas, architecture, prediction, name)
        self._load()

    def _load(self) -> None:
        """Put the UNet (with any patches the MODEL carries) on its device, as a KSampler would."""
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.manual_cast_dtype or self.base.get_dtype()

    def encode(self, prompts: list[str]) -> Conditioning:
        encode = TextEncoding(self.clip)
        return self._conditioning([encode(self.clip.tokenize(prompt)) for prompt in prompts])

    def encode_with_embedding(self, prompts: list[str], word: str, vectors: list[torch.Tensor]) -> Conditioning:
        """As ComfyUI puts an ``embedding:name`` in a prompt: each vector takes one token's place
        in the tokens, and ComfyUI's text encoder reads it in place of that token's embedding."""
        self.clip.load_model()  # weights patched and placed before they are aliased
        encode = TextEncoding(self.clip)
        weights = normal_parameters(encode)
        word_ids = self._token_ids(word)
        for key, ids in word_ids.items():
            if len(ids) != 1:
                raise ValueError(f"{word!r} is {len(ids)} tokens of ComfyUI's clip_{key} tokenizer, not one")
        outputs = []
        for prompt in prompts:
            tokens = self.clip.tokenize(prompt)
            for key, rows in zip(word_ids, vectors, strict=True):
                tokens[key] = put_vectors(tokens[key], word_ids[key][0], rows)
            with copying_saved_activations():  # ComfyUI's CLIP adds its residuals in place
                outputs.append(functional_call(encode, weights, (tokens,)))
        return self._conditioning(outputs)

    def word_vectors(self, text: str) -> list[torch.Tensor]:
        encoders = self.clip.cond_stage_model
        return [
            token_rows(getattr(encoders, f"clip_{key}").transformer.get_input_embeddings().weight, ids, text).float()
            for key, ids in self._token_ids(text).items()
        ]

    def _token_ids(self, text: str) -> dict[str, list[int]]:
        """``text``'s token ids for each text encoder, as ComfyUI's tokenizer reads a word."""
        ids = {}
        for key in ENCODER_KEYS:
            tokenizer = getattr(self.clip.tokenizer, f"clip_{key}", None)
            if tokenizer is not None:
                ids[key] = tokenizer.tokenizer(text)["input_ids"][tokenizer.tokens_start : -1]
        return ids

    def _conditioning(self, outputs: list[dict]) -> Conditioning:
        """The engine's batch of what ``CLIP.encode_from_tokens`` returned for each prompt."""
        contexts = [out["cond"] for out in outputs]
        pooled = [out["pooled_output"] for out in outputs]
        self._load()  # the text encoder may have pushed the UNet off the device
        # Prompts over 75 tokens give longer contexts; repeat each to a common length, as ComfyUI batches them.
        length = math.lcm(*(c.shape[1] for c in contexts))
        context = torch.cat([c.repeat(1, length // c.shape[1], 1) for c in contexts]).to(self.device)
        if self.info.architecture != "sdxl":
            return Conditioning(context)
        size = self.info.resolution
        y = self.base.encode_adm(pooled_output=torch.cat(pooled), width=size, height=size)
        return Conditioning(context, {"y": y.to(self.device)})

    def _vae(self):
        if self.vae is None:
            raise ValueError("connect a VAE: images are decoded and encoded with it")
        return self.vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:  # ComfyUI's own rough preview: a linear map of the latent channels
            fmt = self.base.latent_format
            factors = torch.tensor(fmt.latent_rgb_factors, device=latents.device).T
            bias = fmt.latent_rgb_factors_bias
            bias = torch.tensor(bias, device=latents.device) if bias else None
            rgb = torch.nn.functional.linear(latents.float().movedim(1, -1), factors, bias).movedim(-1, 1)
            return torch.nn.functional.interpolate((rgb + 1) / 2, scale_factor=self.vae_scale_factor).clamp(0, 1)
        images = self._vae().decode(self.base.process_latent_out(latents.float()))
        self._load()
        return images.reshape(-1, *images.shape[-3:]).movedim(-1, 1).float().clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        latents = self._vae().encode(images.movedim(1, -1)[..., :3].cpu())
        self._load()
        return self.base.process_latent_in(latents).to(self.device)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """What ComfyUI's own checkpoint save writes (the MODEL's patches applied)."""
        loaded = [self.patcher, self.clip.load_model()]
        comfy.model_management.load_models_gpu(loaded, force_patch_weights=True, force_full_load=True)
        return self.base.state_dict_for_saving(self.clip.get_sd(), self._vae().get_sd(), None)


def put_vectors(chunks: list[list[tuple]], token_id: int, rows: torch.Tensor) -> list[list[tuple]]:
    """ComfyUI's tokens of one text encoder (chunks of ``(token, weight, ...)``) with the k-th
    ``token_id`` replaced by the vector ``rows[k]``, as its tokenizer puts an embedding's rows."""
    found = 0
    replaced = []
    for chunk in chunks:
        row = []
        for token, *rest in chunk:
            if isinstance(token, numbers.Integral) and token == token_id:
                if found >= len(rows):
                    raise ValueError(f"a prompt holds the placeholder more than the embedding's {len(rows)} times")
                token, found = rows[found], found + 1
            row.append((token, *rest))
        replaced.append(row)
    return replaced
