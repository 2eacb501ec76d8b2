"""The erasure score (docs/method.md, section 7): how far an erasure has gone, measured by the
model itself on held-out trajectories, with no classifier.

The trajectory cache samples two more trajectories per prompt than training draws from; a
few states of each (spread over the noise levels) are the held-out states.  With
``d = target - e*(x, c_e)``, there:

    remaining      = 1 - sum < e(x, c_e) - e*(x, c_e), d > / sum || d ||^2
    distance       = sqrt( sum || e(x, c_e) - target ||^2 / sum || d ||^2 )
    uncond drift   = sqrt( sum || e(x, 0) - e*(x, 0) ||^2 / sum || g*(x, c_e) ||^2 )
    preserve drift = sqrt( mean || e(x_p, p) - e*(x_p, p) ||^2 / mean || g*(x, c_e) ||^2 ), per p

``remaining`` is 1 before training and 0 when the erased prompt has moved all the way to its
target (``distance`` also counts what the trained layers cannot reach); the drifts are 0
before training and measure a change relative to the size of the erased concept's guidance
(the change the erasure is meant to make; in a context, taken from the sentence without the concept).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .deltas import WeightDeltas
from .denoiser import Conditioning, Denoiser
from .objective import Objective
from .parallel import Ranks
from .sampling import TrajectoryCache

HELD_OUT_TRAJECTORIES = 2  # per prompt, never drawn by training
LEVELS = 6  # states per held-out trajectory, evenly spread over the sampler's steps
# Rows per model call while scoring: BATCH, or for a smaller latent as many as hold the same
# latent pixels (the built-in model's 8x8: 1024 rows), since a small call costs mostly its overhead.
BATCH = 16
BATCH_PIXELS = BATCH * 64 * 64  # BATCH rows of SD1.5's 512-px latent


@dataclass(frozen=True)
class Score:
    remaining: float  # along the direction to the target: the headline, what auto steps stop on
    distance: float  # the whole remaining distance to the target
    uncond_drift: float
    preserve_drift: dict[str, float]  # per preserve prompt
    # a robust erasure's: ``remaining`` with the adversary's word in the concept's place
    adversary_remaining: float | None = None
    remaining_by_concept: dict[str, float] = field(default_factory=dict)  # ``remaining`` of each erased concept

    @property
    def worst_remaining(self) -> float:
        """The least erased concept's ``remaining`` (of several, auto steps wait for every one)."""
        return max(self.remaining_by_concept.values(), default=self.remaining)

    @property
    def worst_preserve_drift(self) -> float:
        return max(self.preserve_drift.values(), default=0.0)

    def as_dict(self) -> dict:
        robust = {} if self.adversary_remaining is None else {"adversary_remaining": round(self.adversary_remaining, 4)}
        return {
            "remaining": round(self.remaining, 4),
            "distance": round(self.distance, 4),
            "uncond_drift": round(self.uncond_drift, 4),
            "preserve_drift": round(self.worst_preserve_drift, 4),
            "preserve_drift_by_prompt": {p: round(d, 4) for p, d in self.preserve_drift.items()},
            "remaining_by_concept": {c: round(r, 4) for c, r in self.remaining_by_concept.items()},
        } | robust

    def summary(self) -> str:
        text = f"remaining {self.remaining:.2f}"
        if len(self.remaining_by_concept) > 1:
            worst = max(self.remaining_by_concept, key=self.remaining_by_concept.get)
            text += f" (least erased: {worst!r} {self.remaining_by_concept[worst]:.2f})"
        text += f", uncond drift {self.uncond_drift:.3f}"
        if self.adversary_remaining is not None:
            text += f", through the adversary {self.adversary_remaining:.2f}"
        return text + (f", preserve drift {self.worst_preserve_drift:.3f}" if self.preserve_drift else "")


class ScoreProbe:
    """The held-out states with the frozen model's outputs and targets there, computed once;
    ``score(deltas)`` then costs the student's forward passes over them (all prompts' rows in
    calls of ``rows_per_call``)."""

    def __init__(
        self,
        denoiser: Denoiser,
        objective: Objective,
        held_out: TrajectoryCache,
        pairs: list[tuple[str, str]],
        preserve: list[str],
        cond: dict[str, Conditioning],
        concepts: list[str] | None = None,
        ranks: Ranks | None = None,
        bases: dict[str, str] | None = None,
    ):
        """``concepts``: the erased concept of each pair (default: the pair's erased prompt);
        ``bases``: each erased prompt's context without the concept (default: "", the empty prompt).
        With several ``ranks`` each computes the student's outputs for its share of the prompts,
        and every rank gets the same score."""
        self.denoiser, self.cond, self.ranks = denoiser, cond, ranks or Ranks()
        self.concept_rows: dict[str, list[int]] = {}  # the held-out rows of each concept
        self.erase_states, self.preserve_states = [], {}  # (prompt, x, t) the student is asked at
        targets, teacher_erase, teacher_uncond, teacher_base, self.teacher_preserve = [], [], [], [], {}
        rows = 0
        for (erase, into), concept in zip(pairs, concepts or [erase for erase, _ in pairs], strict=True):
            x, t, outputs = held_out.states(erase, LEVELS)
            self.concept_rows.setdefault(concept, []).extend(range(rows, rows + len(x)))
            rows += len(x)
            base = (bases or {}).get(erase, "")
            teacher_base.append(self._output([(base, x, t)]) if base else outputs[:, 0])
            alternative = self._output([(into, x, t)]) if into else None
            targets.append(
                objective.target(teacher_base[-1], outputs[:, 1], t, denoiser.schedule.num_timesteps, alternative)
            )
            teacher_uncond.append(outputs[:, 0])
            teacher_erase.append(outputs[:, 1])
            self.erase_states.append((erase, x, t))
        for prompt in preserve:
            x, t, outputs = held_out.states(prompt, LEVELS)
            self.teacher_preserve[prompt] = outputs[:, 1]
            self.preserve_states[prompt] = (x, t)
        self.preserve_rows = [len(x) for x, _ in self.preserve_states.values()]
        self.target, self.teacher_uncond = torch.cat(targets), torch.cat(teacher_uncond)
        self.teacher_erase = torch.cat(teacher_erase)
        self.untouched = _energy(self.teacher_erase - self.target)  # || d ||^2
        self.guidance = _energy(self.teacher_erase - torch.cat(teacher_base))  # || g*(x, c_e) ||^2 (from its base)
        self.guidance_per_state = self.guidance / len(self.teacher_erase)

    def score(self, deltas: WeightDeltas, adversary: dict[str, Conditioning] | None = None) -> Score:
        """The score of ``deltas``; with ``adversary`` (erased prompt -> its conditioning with the
        adversary's word), also ``remaining`` asked that way."""
        asked = {  # every kind of row in one batch: a call costs mostly its overhead on a small model
            "erase": self.erase_states,
            "uncond": [("", x, t) for _, x, t in self.erase_states],
            "preserve": [(p, x, t) for p, (x, t) in self.preserve_states.items()],
            "adversary": [(adversary[p], x, t) for p, x, t in self.erase_states] if adversary is not None else [],
        }
        outputs = self._shared([row for rows in asked.values() for row in rows], deltas)
        student = dict(
            zip(asked, outputs.split([sum(len(x) for _, x, _ in rows) for rows in asked.values()]), strict=True)
        )
        student_erase = student["erase"]
        adversary_remaining = self._remaining(student["adversary"]) if adversary is not None else None
        preserve = {}
        for prompt, change in zip(self.preserve_states, student["preserve"].split(self.preserve_rows), strict=True):
            change = change - self.teacher_preserve[prompt]
            preserve[prompt] = float(_energy(change) / len(change) / self.guidance_per_state) ** 0.5
        return Score(
            remaining=self._remaining(student_erase),
            distance=float(_energy(student_erase - self.target) / self.untouched) ** 0.5,
            uncond_drift=float(_energy(student["uncond"] - self.teacher_uncond) / self.guidance) ** 0.5,
            preserve_drift=preserve,
            adversary_remaining=adversary_remaining,
            remaining_by_concept={c: self._remaining(student_erase, rows) for c, rows in self.concept_rows.items()},
        )

    def _shared(self, asked: list[tuple[str | Conditioning, torch.Tensor, torch.Tensor]], deltas) -> torch.Tensor:
        """The student's outputs for each (prompt, states), all of them in one tensor: each rank
        computes its share of the prompts and the ranks add up their parts (zeros elsewhere)."""
        if not asked:
            return self.teacher_erase[:0]
        own = self.ranks.own(len(asked))
        computed = self._output([asked[i] for i in own], deltas).split([len(asked[i][1]) for i in own]) if own else []
        mine = dict(zip(own, computed, strict=True))
        parts = [mine[i] if i in mine else self.teacher_erase.new_zeros(x.shape) for i, (_, x, _) in enumerate(asked)]
        return self.ranks.sum_tensor(torch.cat(parts))

    def _remaining(self, student_erase: torch.Tensor, rows: list[int] | None = None) -> float:
        """``remaining`` over all held-out rows, or over ``rows`` only."""
        pick = slice(None) if rows is None else rows
        moved = _inner(student_erase[pick] - self.teacher_erase[pick], self.target[pick] - self.teacher_erase[pick])
        return 1 - float(moved / _energy(self.teacher_erase[pick] - self.target[pick]))

    @torch.no_grad()
    def _output(
        self, asked: list[tuple[str | Conditioning, torch.Tensor, torch.Tensor]], deltas: WeightDeltas | None = None
    ) -> torch.Tensor:
        """The model's outputs for each (prompt or one-row conditioning, states ``x, t``), in one
        tensor: every prompt's rows together, ``rows_per_call`` rows a call."""
        conds = [p if isinstance(p, Conditioning) else self.cond[p] for p, _, _ in asked]
        of_row = [i for i, (_, x, _) in enumerate(asked) for _ in range(len(x))]  # each row's entry in ``asked``
        x, t = torch.cat([x for _, x, _ in asked]), torch.cat([t for _, _, t in asked])
        rows = rows_per_call(x)
        parts = []
        for start in range(0, len(x), rows):  # (the text conditioning, larger than a latent, built per call)
            cond = Conditioning.cat([conds[i] for i in of_row[start : start + rows]])
            parts.append(self.denoiser.output(x[start : start + rows], t[start : start + rows], cond, deltas))
        return torch.cat(parts)


def rows_per_call(x: torch.Tensor) -> int:
    """``BATCH`` rows of latents ``x`` [N, C, H, W], or more where a row is smaller than SD1.5's."""
    return max(BATCH, BATCH_PIXELS // (x.shape[-2] * x.shape[-1]))


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() * b.double()).sum()


def _energy(difference: torch.Tensor) -> torch.Tensor:
    return difference.double().pow(2).sum().clamp_min(1e-30)
