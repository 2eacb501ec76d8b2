"""Does the concept come back?  A textual-inversion attack on an erased model (docs/method.md, section 11).

Pham et al. (ICLR 2024) brought the concept back after seven erasure methods by learning one
word embedding, without touching the weights.  Here ``K`` token embeddings ``v`` are learned so
that the erased model, asked with them where the concept's words were, predicts what the original
model predicted for the concept, at the original model's own samples of it (the trajectory cache):

    L_attack = || e(x_t, c(v); deltas) - e*(x_t, c_e) ||^2

This is textual inversion's diffusion loss with the original model's prediction in place of the
drawn noise (its expectation: the same minimum, less variance).  Only ``v`` trains.  The attack
starts from the concept's own token embeddings, so at step 0 it asks what the erased model draws
for the concept itself.

The attack's score, with no classifier, on held-out trajectories (seeds never trained on):

    recovered = 1 - sum || e(x, c(v); deltas) - e*(x, c_e) ||^2 / sum || e(x, c_e; deltas) - e*(x, c_e) ||^2

1: the embedding brings the original model's prediction for the concept fully back; 0: it does
no better than the concept's own words; below 0: worse.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .adversary import Adversary, check_no_placeholder, embedded, placeholders
from .deltas import WeightDeltas
from .denoiser import Conditioning, Denoiser
from .files import model_file_path, write_safetensors
from .parameters import EraseConfig, checked_contexts
from .sampling import TrajectoryCache
from .score import HELD_OUT_TRAJECTORIES, LEVELS
from .trainer import ErasureFailed, ProgressFn, RunHooks
from .version import __version__


@dataclass
class AttackConfig:
    """The attack's budget and the sentences it asks in (``{}``: where the concept's words go).
    The trajectory settings are the erasure's defaults, so that the states are the same kind."""

    concept: str
    contexts: list[str] = field(default_factory=lambda: ["{}"])
    tokens: int = 1
    steps: int = 300
    seed: int = 0
    trajectories: int = EraseConfig.trajectories
    sampler_steps: int = EraseConfig.sampler_steps
    sampler_cfg: float = EraseConfig.sampler_cfg
    resolution: int | None = None

    def __post_init__(self) -> None:
        self.concept = self.concept.strip()
        self.contexts = checked_contexts(self.contexts)
        if not self.concept:
            raise ValueError("give the concept to bring back")
        check_no_placeholder([self.concept, *self.contexts])
        if not 1 <= self.tokens <= 16:
            raise ValueError(f"tokens must be between 1 and 16, got {self.tokens}")
        if not 1 <= self.steps <= 100_000:
            raise ValueError(f"steps must be between 1 and 100000, got {self.steps}")

    @classmethod
    def against(cls, erased: EraseConfig, concept: str = "", **budget) -> AttackConfig:
        """The attack on an erasure made with ``erased``: its first concept unless another is
        given, and its trajectory settings (the states it was trained at)."""
        return cls(
            concept.strip() or erased.erase[0],
            trajectories=erased.trajectories,
            sampler_steps=erased.sampler_steps,
            sampler_cfg=erased.sampler_cfg,
            resolution=erased.resolution,
            **budget,
        )

    def prompt_pairs(self) -> list[tuple[str, str]]:
        """(the concept in a context, the same sentence with the embedding in its place)."""
        return [(c.replace("{}", self.concept), c.replace("{}", placeholders(self.tokens))) for c in self.contexts]


@dataclass
class Attack:
    """A learned embedding: one ``[tokens, width]`` tensor per text encoder of the model."""

    vectors: list[torch.Tensor]
    config: AttackConfig
    losses: list[float]
    recovered: float  # held out, after the attack
    seconds: float

    def condition(self, denoiser: Denoiser, prompts: list[str]) -> Conditioning:
        """Text conditioning of prompts written with placeholder words, the embedding in their place."""
        return embedded(denoiser, prompts, self.vectors)

    def prompt(self, context: str = "{}") -> str:
        """A sentence with the embedding's placeholders where ``{}`` is."""
        return context.replace("{}", placeholders(self.config.tokens))


def learn_attack(
    denoiser: Denoiser,
    deltas: WeightDeltas,
    config: AttackConfig,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Attack:
    """Learn an embedding that brings ``config.concept`` back on ``denoiser`` with ``deltas``.

    The original model samples the concept in each context once; ``progress`` and
    ``should_stop`` behave as for an erasure.  The model and the deltas are not changed."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    pick = random.Random(config.seed)
    pairs = config.prompt_pairs()
    hooks = RunHooks(progress, should_stop)
    adversary = Adversary(denoiser, config.concept, config.tokens)  # before sampling: a host may not support it

    def sampler_step(done: int, total: int) -> None:
        hooks.report("sampling", done, total, {})
        hooks.stop_if_asked("sampling the concept", done, total)

    cache = TrajectoryCache.sample(
        denoiser,
        [concept for concept, _ in pairs],
        config.trajectories + HELD_OUT_TRAJECTORIES,
        config.sampler_steps,
        config.sampler_cfg,
        denoiser.latent_shape(config.resolution),
        generator,
        sampler_step,
    )
    train, held_out = cache.split(HELD_OUT_TRAJECTORIES)

    losses = []
    for step in range(config.steps):
        hooks.stop_if_asked("attacking", step, config.steps)
        losses.append(adversary.step(denoiser, deltas, train, pairs, pick, generator))
        if not math.isfinite(losses[-1]):
            raise ErasureFailed(f"the attack's loss became {losses[-1]} at step {step + 1}")
        hooks.report("attacking", step + 1, config.steps, {"loss": losses[-1]})

    attack = Attack([v.detach() for v in adversary.vectors], config, losses, 0.0, 0.0)
    attack.recovered = recovered(denoiser, deltas, attack, held_out)
    attack.seconds = time.perf_counter() - started
    return attack


@torch.no_grad()
def recovered(denoiser: Denoiser, deltas: WeightDeltas, attack: Attack, held_out: TrajectoryCache) -> float:
    """The attack's score (module docstring) on the held-out states of each context."""
    with_attack, without = 0.0, 0.0
    for concept, prompt in attack.config.prompt_pairs():
        x, t, outputs = held_out.states(concept, LEVELS)
        original = outputs[:, 1].double()
        attacked = denoiser.output(x, t, attack.condition(denoiser, [prompt]).repeat(len(x)), deltas)
        erased = denoiser.output(x, t, denoiser.encode([concept]).repeat(len(x)), deltas)
        with_attack += float((attacked.double() - original).pow(2).sum())
        without += float((erased.double() - original).pow(2).sum())
    return 1 - with_attack / max(without, 1e-30)


def embedding_state_dict(attack: Attack) -> dict[str, torch.Tensor]:
    """The embedding as the hosts load a textual-inversion file: one tensor for a model with one
    text encoder (A1111 and ComfyUI take a file's only tensor; diffusers reads ``emb_params``),
    ``clip_l`` and ``clip_g`` for SDXL's two (A1111's SDXL embeddings, ComfyUI's keys per encoder)."""
    vectors = [v.detach().float().cpu().contiguous() for v in attack.vectors]
    if len(vectors) == 1:
        return {"emb_params": vectors[0]}
    clip_l, clip_g = vectors
    return {"clip_l": clip_l, "clip_g": clip_g}


def embedding_file_path(folder: str | Path, name: str) -> Path:
    """``folder/<name>.safetensors`` for an embedding: ``model_file_path``'s checks, and one word,
    since the hosts read an embedding's name in a prompt up to a space."""
    if name.split() != [name.strip()]:
        raise ValueError(f"the name {name!r} must be one word: it is the embedding's word in a prompt")
    return model_file_path(folder, name)


def save_embedding(attack: Attack, denoiser: Denoiser, path: str | Path, if_exists: str = "refuse") -> Path:
    """The learned embedding as a ``.safetensors`` file for the hosts' embeddings folders."""
    metadata = {
        "erasure.engine": "erase_engine",
        "erasure.engine_version": __version__,
        "attack.kind": "textual inversion against an erasure",
        "attack.config": json.dumps(asdict(attack.config), sort_keys=True),
        "attack.recovered": f"{attack.recovered:.4f}",
        "attack.base_model": denoiser.info.name,
        "attack.base_model_sha256": denoiser.sha256,
    }
    return write_safetensors(embedding_state_dict(attack), path, metadata, if_exists)
