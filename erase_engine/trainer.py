"""The erasure loop: sample trajectories once, then train the deltas."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from .deltas import WeightDeltas
from .denoiser import Conditioning, Denoiser
from .objective import Objective, erase_target, make_objective, surgery_loss
from .sampling import TrajectoryCache

PRESET_VALUE = -1.0  # a form's eta / lambda_u / lambda_p left at this takes the method's preset value


# Bounds on what a user types: prompts are stored in every file's header, which must stay small.
MAX_PROMPT_CHARS = 1000
MAX_PRESERVE_PROMPTS = 64
OUT_OF_MEMORY_HINT = (
    "try fewer trajectories, a smaller resolution, LoRA mode (a small rank) or fewer trainable layers (xattn)"
)
BROKEN_MODEL_HINT = "the model file is damaged, or it runs in a precision too low for it (try full precision)"


class ErasureCancelled(Exception):
    """Raised when the host asks to stop; nothing has been written."""


class ErasureFailed(RuntimeError):
    """The run could not finish (out of memory, a non-finite loss); nothing was kept."""


@dataclass
class EraseConfig:
    """Everything an erasure depends on.  Same config and model: same result."""

    erase: list[str]
    into: list[str] = field(default_factory=list)  # alternatives, one per erase prompt ("" = none)
    preserve: list[str] = field(default_factory=list)
    method: str = "surgical"
    eta: float | None = None  # None: the preset's value
    lambda_u: float | None = None
    lambda_p: float | None = None
    train: str = "xattn"
    lora_rank: int | None = 4  # None: full-rank deltas
    lora_alpha: float | None = None  # None: equal to the rank (scale 1)
    steps: int = 200
    lr: float = 1e-4
    seed: int = 0
    trajectories: int = 4  # K seeds per prompt in the trajectory cache
    sampler_steps: int = 50
    sampler_cfg: float = 3.0
    resolution: int | None = None  # image pixels; None: the model's native size

    def __post_init__(self) -> None:
        self.erase = [p.strip() for p in self.erase]
        self.into = [p.strip() for p in self.into]
        self.preserve = [p.strip() for p in self.preserve if p.strip()]
        if not self.erase or not all(self.erase):
            raise ValueError("give at least one non-empty concept to erase")
        if self.into and len(self.into) not in (1, len(self.erase)):
            raise ValueError("give one alternative, or one per erased concept")
        if len(self.into) == 1:
            self.into = self.into * len(self.erase)
        for erase, into in zip(self.erase, self.into, strict=False):
            if erase.casefold() == into.casefold():
                raise ValueError(f"the alternative {into!r} is the concept being erased")
        kept = sorted({p for p in self.preserve if p.casefold() in {e.casefold() for e in self.erase}})
        if kept:
            raise ValueError(f"the preserve list contains the concept being erased: {kept}")
        if len(self.preserve) > MAX_PRESERVE_PROMPTS:
            raise ValueError(f"at most {MAX_PRESERVE_PROMPTS} preserve prompts, got {len(self.preserve)}")
        longest = max([*self.erase, *self.into, *self.preserve], key=len)
        if len(longest) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts are limited to {MAX_PROMPT_CHARS} characters, one has {len(longest)}")
        for name in ("steps", "trajectories", "sampler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"the LoRA rank must be at least 1 (or full rank), got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"the LoRA alpha must be positive, got {self.lora_alpha}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"the learning rate must be positive, got {self.lr}")
        if not self.sampler_cfg >= 0:
            raise ValueError(f"the sampler CFG scale must be zero or more, got {self.sampler_cfg}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"the resolution must be a positive multiple of 8 pixels, got {self.resolution}")

    def objective(self) -> Objective:
        objective = make_objective(self.method, self.eta, self.lambda_u, self.lambda_p)
        if any(self.into) and not objective.allows_alternative:
            raise ValueError(f"the {self.method!r} method erases without an alternative; drop --into")
        return objective

    def pairs(self) -> list[tuple[str, str]]:
        return list(zip(self.erase, self.into or [""] * len(self.erase), strict=True))

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_form(
        cls, erase: str, alternative: str, preserve: str, rank: int, resolution: int, **values
    ) -> EraseConfig:
        """A config from the fields of a host's form (node inputs, the web interface): one concept,
        an optional alternative, preserve prompts one per line, rank 0 = full rank, resolution 0 =
        the model's, and eta / lambda_u / lambda_p at ``PRESET_VALUE`` = the method's preset."""
        coefficients = {k: float(values.pop(k)) for k in ("eta", "lambda_u", "lambda_p") if k in values}
        config = cls(
            erase=[erase],
            into=[alternative] if alternative.strip() else [],
            preserve=preserve.splitlines(),
            lora_rank=int(rank) or None,
            resolution=int(resolution) or None,
            **{k: v for k, v in coefficients.items() if v != PRESET_VALUE},
            **values,
        )
        config.objective()  # a bad combination of method and alternative fails here, before any work
        return config


@dataclass
class Erasure:
    """The result: trained deltas plus everything needed to describe them."""

    deltas: WeightDeltas
    config: EraseConfig
    objective: Objective
    losses: list[dict[str, float]]
    seconds: dict[str, float]


ProgressFn = Callable[[int, int, dict[str, float]], None]


def latent_shape(denoiser: Denoiser, resolution: int | None) -> tuple[int, int, int]:
    pixels = resolution or denoiser.info.resolution
    if pixels % denoiser.vae_scale_factor:
        raise ValueError(f"resolution must be a multiple of {denoiser.vae_scale_factor}, got {pixels}")
    size = pixels // denoiser.vae_scale_factor
    return (denoiser.latent_channels, size, size)


def erase_concept(
    denoiser: Denoiser,
    config: EraseConfig,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Erasure:
    """Train weight deltas that erase ``config.erase`` from ``denoiser``.

    ``progress(step, total, losses)`` is called after every step; if
    ``should_stop()`` turns true the run raises ``ErasureCancelled``.  Running out
    of memory or a non-finite loss raises ``ErasureFailed``.  The denoiser's own
    weights are never modified, whatever happens.
    """
    try:
        return _erase_concept(denoiser, config, progress, should_stop)
    except torch.OutOfMemoryError as error:
        raise ErasureFailed(f"out of memory: {OUT_OF_MEMORY_HINT}") from error


def _erase_concept(denoiser, config, progress, should_stop) -> Erasure:
    objective = config.objective()
    device = denoiser.device
    generator = torch.Generator().manual_seed(config.seed)
    pick = random.Random(config.seed)
    started = time.perf_counter()

    # 1. Text conditioning, once (cloned: a host may have made it under inference mode).
    erase_prompts = list(dict.fromkeys(config.erase))
    alternatives = [a for a in dict.fromkeys(config.into) if a]
    prompts = list(dict.fromkeys(["", *erase_prompts, *alternatives, *config.preserve]))
    with torch.no_grad():
        encoded = denoiser.encode(prompts).detached().to(device)
    cond = {p: encoded[i] for i, p in enumerate(prompts)}
    broken = [p for p, c in cond.items() if not all(v.isfinite().all() for v in (c.context, *c.extras.values()))]
    if broken:
        raise ErasureFailed(f"the model's text encoder gives NaN or inf for {broken[0]!r}: {BROKEN_MODEL_HINT}")

    # 2. The trajectory cache: the frozen model samples x_t once.
    use_preserve = bool(config.preserve) and objective.lambda_p > 0
    cache = TrajectoryCache.sample(
        denoiser,
        erase_prompts + (config.preserve if use_preserve else []),
        config.trajectories,
        config.sampler_steps,
        config.sampler_cfg,
        latent_shape(denoiser, config.resolution),
        generator,
    )
    if not all(x.isfinite().all() for x in (*cache.latents.values(), *cache.outputs.values())):
        raise ErasureFailed(f"the model's own samples became NaN or inf: {BROKEN_MODEL_HINT}")
    sampled = time.perf_counter()

    # 3. The deltas and their optimizer (the host's weights stay frozen and untouched).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        deltas = WeightDeltas.create(denoiser.unet_layers(), config.train, config.lora_rank, config.lora_alpha)
    deltas.to(device)
    optimizer = torch.optim.AdamW(deltas.parameters(), lr=config.lr, weight_decay=0.0)

    losses = []
    for step in range(config.steps):
        if should_stop is not None and should_stop():
            raise ErasureCancelled(f"stopped after {step} of {config.steps} steps")
        erase, into = pick.choice(config.pairs())
        x_e, t_e, out_e = cache.draw(erase, generator)
        preserve_draws = [cache.draw(p, generator) for p in config.preserve] if use_preserve else []
        x_p = torch.cat([x for x, _, _ in preserve_draws]) if preserve_draws else x_e[:0]
        t_p = torch.cat([t for _, t, _ in preserve_draws]) if preserve_draws else t_e[:0]
        preserve_cond = [cond[p] for p in config.preserve] if use_preserve else []

        # 4. The teacher: its outputs at cached states were kept by the sampler (uncond and
        #    erase at x_e, each preserve prompt at its own state); only an alternative needs a call.
        t_uncond, t_erase = out_e[0:1], out_e[1:2]
        teacher_preserve = torch.stack([out[1] for _, _, out in preserve_draws]) if preserve_draws else None
        t_alt = None
        if into:
            with torch.no_grad():
                t_alt = denoiser.output(x_e, t_e, cond[into])
        target = erase_target(t_uncond, t_erase, objective.eta, t_alt)

        # 5. The student: erase, [uncond], [preserve...] in one batched call with the deltas.
        student_conds = [cond[erase]] + ([cond[""]] if objective.lambda_u else []) + preserve_cond
        n_s = len(student_conds) - len(preserve_cond)
        student = denoiser.output(
            torch.cat([x_e.expand(n_s, -1, -1, -1), x_p]),
            torch.cat([t_e.expand(n_s), t_p]),
            Conditioning.cat(student_conds),
            deltas,
        )
        terms = surgery_loss(
            objective,
            target,
            student[0:1],
            student_uncond=student[1:2] if objective.lambda_u else None,
            teacher_uncond=t_uncond,
            student_preserve=student[n_s:] if use_preserve else None,
            teacher_preserve=teacher_preserve,
        )
        losses.append(terms.as_floats())
        if not math.isfinite(losses[-1]["loss"]):
            raise ErasureFailed(
                f"the loss became {losses[-1]['loss']} at step {step + 1}; nothing was kept (try a lower learning rate)"
            )
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        optimizer.step()

        if progress is not None:
            progress(step + 1, config.steps, losses[-1])

    finished = time.perf_counter()
    deltas.requires_grad_(False)
    seconds = {"sampling": sampled - started, "training": finished - sampled, "total": finished - started}
    return Erasure(deltas, config, objective, losses, seconds)
