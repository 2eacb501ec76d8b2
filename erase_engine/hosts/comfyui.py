"""The denoiser adapter for ComfyUI: a MODEL (ModelPatcher), a CLIP and optionally a VAE.

Only importable inside a ComfyUI process.  ComfyUI's ``apply_model`` takes a
sigma and returns the denoised x0 (``SigmaDenoiser`` converts); the schedule comes
from the MODEL's ``model_sampling``.  Nothing the host owns is modified: the
student's weights are swapped in with ``functional_call``.
"""

from __future__ import annotations

import math

import comfy.model_management
import comfy.model_sampling
import torch

from ..denoiser import Conditioning
from .sigma import SigmaDenoiser

# ComfyUI's model config class -> the engine's architecture name
ARCHITECTURE = {"SD15": "sd1", "SD20": "sd2", "SDXL": "sdxl"}
PREDICTION = {comfy.model_sampling.EPS: "epsilon", comfy.model_sampling.V_PREDICTION: "v_prediction"}


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
        contexts, pooled = [], []
        for prompt in prompts:
            out = self.clip.encode_from_tokens(self.clip.tokenize(prompt), return_pooled=True, return_dict=True)
            contexts.append(out["cond"])
            pooled.append(out["pooled_output"])
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
