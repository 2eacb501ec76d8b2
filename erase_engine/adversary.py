"""A learnable word: token embeddings that stand in a prompt for a placeholder, and the step that
fits them so that a (possibly erased) model predicts what the original model predicted for the
concept (docs/method.md, section 11).  The attack trains one; a robust erasure trains against one."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .deltas import WeightDeltas
from .denoiser import Conditioning, Denoiser
from .sampling import TrajectoryCache

# A one-token word of CLIP's vocabulary that stands for the learned vectors in a prompt (the
# hosts use the embedding file's name instead); prompts must not contain it otherwise.
PLACEHOLDER = "sks"
# Each step changes every vector by about this fraction of the concept's own embedding's RMS.
RELATIVE_STEP = 2e-2
BATCH = 4  # cached states per step
# Sentences a robust erasure also asks its adversary's word in, besides the erased prompt's own:
# an attacker puts the word in sentences, and a word learned (and erased) alone does not carry
# over to them (docs/method.md, section 11).
CARRIERS = ("a {}", "a picture of a {}", "an image of a {}")


def placeholders(tokens: int) -> str:
    return " ".join([PLACEHOLDER] * tokens)


def check_no_placeholder(prompts: list[str]) -> None:
    if any(PLACEHOLDER in p.lower().split() for p in prompts):
        raise ValueError(f"the word {PLACEHOLDER!r} stands for a learned embedding; leave it out of the prompts")


@contextmanager
def frozen(deltas: WeightDeltas | None) -> Iterator[None]:
    """The deltas without gradients for a while (then as they were)."""
    parameters = list(deltas.parameters()) if deltas is not None else []
    flags = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(parameters, flags, strict=True):
            p.requires_grad_(flag)


class Adversary:
    """``tokens`` vectors per text encoder, starting as the mean of ``concept``'s own token
    embeddings (at step 0 they ask for the concept itself), with their Adam optimizer."""

    def __init__(self, denoiser: Denoiser, concept: str, tokens: int):
        start = [v.mean(dim=0, keepdim=True).repeat(tokens, 1) for v in denoiser.word_vectors(concept)]
        self.vectors = [v.float().requires_grad_(True) for v in start]
        self.optimizer = torch.optim.Adam(
            [{"params": [v], "lr": RELATIVE_STEP * float(v.detach().pow(2).mean().sqrt())} for v in self.vectors]
        )

    def step(
        self,
        denoiser: Denoiser,
        deltas: WeightDeltas | None,
        cache: TrajectoryCache,
        pairs: list[tuple[str, str]],
        pick: random.Random,
        generator: torch.Generator,
    ) -> float:
        """One step of ``|| e(x_t, c(v); deltas) - e*(x_t, c_e) ||^2`` at ``BATCH`` states drawn
        from ``cache`` for random (concept prompt, the same with the placeholder) ``pairs``
        (``e*``: the frozen model's outputs the cache holds); the loss."""
        rows = [pick.choice(pairs) for _ in range(BATCH)]
        states = [cache.draw(concept, generator) for concept, _ in rows]
        x, t = torch.cat([x for x, _, _ in states]), torch.cat([t for _, t, _ in states])
        original = torch.stack([out[1] for _, _, out in states])
        with frozen(deltas):  # only the vectors get gradients
            cond = denoiser.encode_with_embedding([asked for _, asked in rows], PLACEHOLDER, self.vectors)
            loss = F.mse_loss(denoiser.output(x, t, cond, deltas).float(), original.float())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def condition(self, denoiser: Denoiser, prompts: list[str]) -> Conditioning:
        return embedded(denoiser, prompts, self.vectors)


def embedded(denoiser: Denoiser, prompts: list[str], vectors: list[torch.Tensor]) -> Conditioning:
    """Text conditioning of prompts written with ``PLACEHOLDER`` words, ``vectors`` in their place
    (no gradient)."""
    with torch.no_grad():
        return denoiser.encode_with_embedding(prompts, PLACEHOLDER, vectors).detached()
