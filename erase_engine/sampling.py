"""DDIM with classifier-free guidance, and the trajectory cache built from it.

ESD re-runs a 50-step sampler at every training step to get one ``x_t``.  Here
the frozen model samples K trajectories per prompt once, every intermediate
latent is kept, and each training step draws ``(x_t, t)`` from that cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .deltas import WeightDeltas
from .denoiser import Conditioning, Denoiser
from .parallel import Ranks


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``e(x,0) + s (e(x,c) - e(x,0))`` from one batched call, and its two parts."""
    both = denoiser.output(torch.cat([x, x]), torch.cat([t, t]), Conditioning.cat([uncond, cond]), deltas)
    out_uncond, out_cond = both.chunk(2)
    return out_uncond + cfg_scale * (out_cond - out_uncond), out_uncond, out_cond


class Trajectory(NamedTuple):
    latents: torch.Tensor  # [S, B, C, H, W]: the latent entering each step
    uncond: torch.Tensor  # the model's output there for the empty prompt
    cond: torch.Tensor  # and for the row's prompt


@torch.no_grad()
def ddim_sample(
    denoiser: Denoiser,
    cond: Conditioning,
    noise: torch.Tensor,
    steps: int,
    cfg_scale: float,
    deltas: WeightDeltas | None = None,
    keep_trajectory: bool = False,
    start: int = 0,
    stop: int | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Deterministic DDIM from ``noise`` (one row per prompt in ``cond``).

    ``start`` skips the first steps: ``noise`` is then a latent at the noise level
    of ``ddim_timesteps(...)[start]`` (as ``ddim_invert`` returns).  ``stop`` ends
    early, with the latent at the level of ``ddim_timesteps(...)[stop]`` (ESD's way
    of reaching one ``x_t``).  Returns the latents; if asked, the trajectory: the
    latents *entering* every step run and the model's unconditional and conditional
    outputs there (each [steps, B, ...]); and the timesteps of the steps run.
    ``on_step(done, total)`` is called after each step (it may raise to stop the run).
    """
    schedule = denoiser.schedule
    every = ddim_timesteps(schedule.num_timesteps, steps)
    timesteps = every[start:stop]
    uncond = denoiser.encode([""]).repeat(len(cond)).to(noise.device)
    x = noise
    kept = []
    for i, t in enumerate(timesteps):
        t_batch = t.repeat(len(x)).to(x.device)
        out, out_uncond, out_cond = guided_output(denoiser, x, t_batch, cond, uncond, cfg_scale, deltas)
        if keep_trajectory:
            kept.append((x, out_uncond, out_cond))
        eps, x0 = schedule.eps_and_x0(out, x, t_batch)
        following = start + i + 1
        if following < len(every):
            a_next = schedule.alpha(every[following].repeat(len(x)), x)
            x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        else:
            x = x0
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    trajectory = Trajectory(*(torch.stack(part) for part in zip(*kept, strict=True))) if keep_trajectory else None
    return x, trajectory, timesteps


def seeded_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One initial latent per seed, each from its own generator: a sample depends on its seed only."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def generate(
    denoiser: Denoiser,
    prompts: list[str] | Conditioning,
    seeds: list[int],
    steps: int,
    cfg_scale: float,
    deltas: WeightDeltas | None = None,
    resolution: int | None = None,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1], sample i of ``prompts[i]`` (text, or its conditioning
    already computed) from seed ``seeds[i]``: with and without ``deltas``, the same seeds give
    the same starting noise."""
    noise = seeded_noise(denoiser.latent_shape(resolution), seeds).to(denoiser.device, denoiser.dtype)
    cond = prompts if isinstance(prompts, Conditioning) else denoiser.encode(prompts)
    latents, _, _ = ddim_sample(denoiser, cond.to(denoiser.device), noise, steps, cfg_scale, deltas)
    return denoiser.decode(latents).cpu()


@torch.no_grad()
def ddim_invert(
    denoiser: Denoiser, latents: torch.Tensor, cond: Conditioning, steps: int, strength: float, cfg_scale: float = 1.0
) -> tuple[torch.Tensor, int]:
    """Run DDIM backwards from clean ``latents`` up to ``strength`` of the way to
    pure noise.  Returns the noised latents and the ``start`` index at which
    ``ddim_sample`` resumes from them."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    schedule = denoiser.schedule
    ascending = ddim_timesteps(schedule.num_timesteps, steps).flip(0)
    count = max(1, round(strength * steps))
    uncond = denoiser.encode([""]).repeat(len(cond)).to(latents.device)
    x, level = latents, None  # level: the timestep x is at (None: clean)
    for t in ascending[:count]:
        t_model = (level if level is not None else t).repeat(len(x)).to(x.device)
        out, _, _ = guided_output(denoiser, x, t_model, cond, uncond, cfg_scale)
        eps, _ = schedule.eps_and_x0(out, x, t_model)
        a_now = schedule.alpha(level.repeat(len(x)), x) if level is not None else torch.ones_like(x[:, :1, :1, :1])
        x0 = (x - (1 - a_now).sqrt() * eps) / a_now.sqrt()
        a_next = schedule.alpha(t.repeat(len(x)), x)
        x, level = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps, t
    return x, steps - count


@dataclass
class TrajectoryCache:
    """For each prompt, ``latents[k, s]`` is trajectory k's latent at ``timesteps[s]`` and
    ``outputs[k, s]`` the frozen model's (unconditional, conditional) outputs there: the
    sampler computed them anyway, and they are the teacher's outputs at that state."""

    latents: dict[str, torch.Tensor]  # prompt -> [K, S, C, H, W]
    outputs: dict[str, torch.Tensor]  # prompt -> [K, S, 2, C, H, W]
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
        on_step: Callable[[int, int], None] | None = None,
        ranks: Ranks | None = None,
    ) -> TrajectoryCache:
        """Run the frozen model once: K seeds per prompt, all prompts in one batch
        (``on_step(done, total)`` after each sampler step).  With several ``ranks`` each
        samples a share of the rows, from the same noise, and every rank gets all of them."""
        ranks = ranks or Ranks()
        prompts = list(dict.fromkeys(prompts))
        cond = denoiser.encode(prompts).repeat(trajectories).to(denoiser.device)
        noise = torch.randn((len(cond), *latent_shape), generator=generator).to(denoiser.device, denoiser.dtype)
        mine = ranks.share(len(cond))
        if mine.start == mine.stop:
            raise ValueError(f"{ranks.size} processes for {len(cond)} sampled trajectories: use fewer processes")
        _, trajectory, timesteps = ddim_sample(
            denoiser, cond[mine], noise[mine], steps, cfg_scale, keep_trajectory=True, on_step=on_step
        )
        trajectory = Trajectory(*(ranks.gather(part, len(cond), dim=1) for part in trajectory))

        def per_prompt(part: torch.Tensor) -> torch.Tensor:  # [S, P*K, ...] -> [P, K, S, ...]
            return part.transpose(0, 1).reshape(len(prompts), trajectories, len(timesteps), *latent_shape)

        latents = per_prompt(trajectory.latents)
        outputs = torch.stack([per_prompt(trajectory.uncond), per_prompt(trajectory.cond)], dim=3)
        return cls(
            {p: latents[i] for i, p in enumerate(prompts)}, {p: outputs[i] for i, p in enumerate(prompts)}, timesteps
        )

    def draw(self, prompt: str, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One state of a random trajectory of ``prompt`` at a random step: ``x_t`` [1, ...],
        ``t`` [1] and the frozen model's (unconditional, conditional) outputs there [2, ...]."""
        latents = self.latents[prompt]
        k = int(torch.randint(latents.shape[0], (1,), generator=generator))
        s = int(torch.randint(latents.shape[1], (1,), generator=generator))
        return latents[k, s : s + 1], self.timesteps[s : s + 1].to(latents.device), self.outputs[prompt][k, s]

    def split(self, held_out: int) -> tuple[TrajectoryCache, TrajectoryCache]:
        """The first trajectories of every prompt, and the last ``held_out`` of them."""

        def part(chosen: slice) -> TrajectoryCache:
            return TrajectoryCache(
                {p: x[chosen] for p, x in self.latents.items()},
                {p: out[chosen] for p, out in self.outputs.items()},
                self.timesteps,
            )

        return part(slice(None, -held_out)), part(slice(-held_out, None))

    def states(self, prompt: str, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every trajectory's states at ``levels`` steps spread evenly from the first to the
        last: ``x_t`` [N, ...], ``t`` [N] and the frozen model's outputs there [N, 2, ...]."""
        latents, outputs = self.latents[prompt], self.outputs[prompt]
        trajectories, steps = latents.shape[:2]
        chosen = torch.linspace(0, steps - 1, min(levels, steps)).round().long().unique()
        x = latents[:, chosen].flatten(0, 1)
        t = self.timesteps[chosen].repeat(trajectories).to(x.device)
        return x, t, outputs[:, chosen].flatten(0, 1)
