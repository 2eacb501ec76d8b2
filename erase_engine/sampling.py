"""DDIM with classifier-free guidance, and the trajectory cache built from it.

ESD re-runs a 50-step sampler at every training step to get one ``x_t``.  Here
the frozen model samples K trajectories per prompt once, every intermediate
latent is kept, and each training step draws ``(x_t, t)`` from that cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .deltas import WeightDeltas
from .denoiser import Conditioning, Denoiser


def ddim_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """Descending timesteps with "trailing" spacing: the first is the last training step."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"sampler steps must be between 1 and {num_train_timesteps}, got {steps}")
    ratio = num_train_timesteps / steps
    return (torch.arange(num_train_timesteps, 0, -ratio).round() - 1).long()


def guided_output(
    denoiser: Denoiser,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Conditioning,
    uncond: Conditioning,
    cfg_scale: float,
    deltas: WeightDeltas | None = None,
) -> torch.Tensor:
    """``e(x,0) + s (e(x,c) - e(x,0))`` from one batched call."""
    both = denoiser.output(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond]), deltas)
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + cfg_scale * (out_cond - out_uncond)


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    cond: Conditioning,
    noise: torch.Tensor,
    steps: int,
    cfg_scale: float,
    deltas: WeightDeltas | None = None,
    keep_trajectory: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Deterministic DDIM from ``noise`` (one row per prompt in ``cond``).

    Returns the final latents, the latents *entering* every step ([steps, B, ...])
    if asked, and the timesteps they belong to.
    """
    schedule = denoiser.schedule
    timesteps = ddim_timesteps(schedule.num_timesteps, steps)
    uncond = denoiser.encode([""]).repeat(len(cond)).to(noise.device)
    x = noise
    kept = []
    for i, t in enumerate(timesteps):
        if keep_trajectory:
            kept.append(x)
        t_batch = t.repeat(len(x)).to(x.device)
        out = guided_output(denoiser, x, t_batch, cond, uncond, cfg_scale, deltas)
        eps, x0 = schedule.eps_and_x0(out, x, t_batch)
        if i + 1 < len(timesteps):
            a_prev = schedule.alpha(timesteps[i + 1].repeat(len(x)), x)
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        else:
            x = x0
    trajectory = torch.stack(kept) if keep_trajectory else None
    return x, trajectory, timesteps


@dataclass
class TrajectoryCache:
    """For each prompt, ``latents[k, s]`` is trajectory k's latent at ``timesteps[s]``."""

    latents: dict[str, torch.Tensor]  # prompt -> [K, S, C, H, W]
    timesteps: torch.Tensor  # [S]

    @classmethod
    def sample(
        cls,
        denoiser: Denoiser,
        prompts: list[str],
        trajectories: int,
        steps: int,
        cfg_scale: float,
        latent_shape: tuple[int, int, int],
        generator: torch.Generator,
    ) -> TrajectoryCache:
        """Run the frozen model once: K seeds per prompt, all prompts in one batch."""
        prompts = list(dict.fromkeys(prompts))
        cond = denoiser.encode(prompts).repeat(trajectories).to(denoiser.device)
        noise = torch.randn((len(cond), *latent_shape), generator=generator).to(denoiser.device, denoiser.dtype)
        _, trajectory, timesteps = ddim_sample(denoiser, cond, noise, steps, cfg_scale, keep_trajectory=True)
        per_prompt = trajectory.transpose(0, 1).reshape(len(prompts), trajectories, len(timesteps), *latent_shape)
        return cls({p: per_prompt[i] for i, p in enumerate(prompts)}, timesteps)

    def draw(self, prompt: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One ``(x_t, t)`` pair from a random trajectory of ``prompt``, at a random step."""
        latents = self.latents[prompt]
        k = int(torch.randint(latents.shape[0], (1,), generator=generator))
        s = int(torch.randint(latents.shape[1], (1,), generator=generator))
        return latents[k, s : s + 1], self.timesteps[s : s + 1].to(latents.device)
