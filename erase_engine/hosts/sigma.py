"""What ComfyUI and Forge share: a model whose ``apply_model(x, sigma, **conds)`` takes
k-diffusion's input ``x0 + sigma * eps`` and returns the denoised x0."""

from __future__ import annotations

import torch
from torch import nn

from ..architectures import ARCHITECTURES, LATENT_CHANNELS, VAE_SCALE_FACTOR
from ..denoiser import Denoiser, NoiseSchedule


class X0FromSigma(nn.Module):
    """The host's ``apply_model(x, sigma, **conds) -> x0`` (ComfyUI's ``BaseModel``,
    Forge's ``KModel``) as a module whose parameter names are the single-file ones
    (``model.diffusion_model.…``), so ``functional_call`` can swap them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **conds) -> torch.Tensor:
        return self.model.apply_model(x, sigma, transformer_options={}, **conds)


class SigmaDenoiser(Denoiser):
    """A host whose ``apply_model(x, sigma, **conds)`` takes k-diffusion's input
    ``x0 + sigma * eps`` and returns the denoised x0 (ComfyUI, Forge).

    The engine speaks discrete VP timesteps and the model's own output (eps or v),
    so this converts both ways with the host's sigmas (``alphas_cumprod = 1 / (1 + sigma^2)``).
    """

    sigmas: torch.Tensor  # [T] float32, the host's sigma at each discrete timestep
    weight_prefix = "model.diffusion_model."

    def _use_model(self, model: nn.Module, sigmas: torch.Tensor, architecture: str, prediction: str, name: str) -> None:
        """The host's model (its UNet at ``model.diffusion_model``), its discrete sigmas and
        the VP schedule they stand for."""
        self.network, self.unet = X0FromSigma(model), model.diffusion_model
        sigmas = sigmas.detach().double().cpu()
        self.sigmas = sigmas.float()
        self.schedule = NoiseSchedule(1.0 / (1.0 + sigmas**2), prediction)
        self.latent_channels, self.vae_scale_factor = LATENT_CHANNELS, VAE_SCALE_FACTOR
        self.info = ARCHITECTURES[architecture].info(name, prediction)

    def _predict(self, x_t, t, cond, weights):
        sigma = self.sigmas.to(x_t.device)[t.long().to(x_t.device)].float()
        sigma_ = sigma.reshape(-1, 1, 1, 1)
        scale = (1 + sigma_**2).sqrt()
        x_in = x_t.float() * scale  # VP latents -> the host's x0 + sigma * eps
        # both hosts take the context as ``c_crossattn`` and SDXL's vector as ``y``
        x0 = self.call_network(weights, x_in, sigma, c_crossattn=cond.context, **cond.extras).float()
        eps = (x_in - x0) / sigma_
        if self.schedule.prediction_type == "epsilon":
            return eps.to(x_t.dtype)
        return ((eps - sigma_ * x0) / scale).to(x_t.dtype)  # v = sqrt(a) eps - sqrt(1 - a) x0
