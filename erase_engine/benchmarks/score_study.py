"""Does the held-out erasure score predict the judge?  On ``builtin:shapes``, each concept is
erased at the defaults for several fixed step counts (runs with the same seed are prefixes of one another);
each run's final ``remaining`` score is set against the judge's ``erase_acc_after``.

    python -m erase_engine.benchmarks.score_study --json score_study.json

Prints one line per run, then per concept and over all runs the Spearman rank correlation,
and for each candidate threshold how many runs it would call erased that the judge does not
(and the reverse).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ..builtin import BUILTIN_MODEL
from ..builtin.judge import load_judge
from ..builtin.render import COLORS, SHAPES
from ..hosts.diffusers_loading import load_denoiser
from ..parameters import EraseConfig
from ..trainer import erase_concept
from .efficacy import SAMPLE_SEED, Concept, average, prompt_groups, sample

STEP_COUNTS = (50, 100, 200, 400)
ERASED = 0.05  # the judge's erase_acc_after at which a concept counts as erased (issue 13)
THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


def ranks(values: list[float]) -> torch.Tensor:
    """Ranks with ties averaged."""
    data = torch.tensor(values, dtype=torch.float64)
    order = data.argsort()
    result = torch.empty_like(data)
    result[order] = torch.arange(len(data), dtype=torch.float64)
    for value in data.unique():
        tied = data == value
        result[tied] = result[tied].mean()
    return result


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def run(concepts: list[str], step_counts: tuple[int, ...], samples: int) -> list[dict]:
    denoiser, judge = load_denoiser(BUILTIN_MODEL), load_judge()
    rows = []
    for erase in concepts:
        concept = Concept.parse(erase)
        head = concept.head
        prompts = prompt_groups(concept, samples)[0].prompts
        for steps in step_counts:
            # the defaults but the steps: what erase-concept --erase X --steps N trains
            erasure = erase_concept(denoiser, EraseConfig(erase=[erase], steps=steps))
            after = judge.classify(sample(denoiser, prompts, SAMPLE_SEED, erasure.deltas))[head]
            row = {
                "erase": erase,
                "steps": steps,
                **erasure.score.as_dict(),
                "erase_acc_after": average(after == concept.index),
            }
            row.pop("preserve_drift_by_prompt")
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict:
    """The rank correlations, and how each threshold agrees with the judge."""
    concepts = list(dict.fromkeys(r["erase"] for r in rows))

    def correlation(chosen: list[dict], score: str = "remaining") -> float:
        return round(spearman([r[score] for r in chosen], [r["erase_acc_after"] for r in chosen]), 3)

    agreement = {}
    for threshold in THRESHOLDS:
        called = [r for r in rows if r["remaining"] <= threshold]
        agreement[threshold] = {
            "called_erased": len(called),
            "judge_disagrees": sum(r["erase_acc_after"] > ERASED for r in called),
            "missed": sum(r["remaining"] > threshold and r["erase_acc_after"] <= ERASED for r in rows),
        }
    return {
        "spearman_all": correlation(rows),
        "spearman_all_distance": correlation(rows, "distance"),
        "spearman_by_concept": {c: correlation([r for r in rows if r["erase"] == c]) for c in concepts},
        "thresholds": agreement,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erase_engine.benchmarks.score_study", description=__doc__)
    parser.add_argument("--erase", action="append", help="concepts (default: every shape and color)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS), help="the step counts compared")
    parser.add_argument("--samples", type=int, default=64, help="judged samples per run")
    parser.add_argument("--json", type=Path, help="write the runs and the summary here")
    args = parser.parse_args(argv)
    rows = run(args.erase or [*SHAPES, *COLORS], tuple(args.steps), args.samples)
    result = summary(rows)
    print(json.dumps(result, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": rows, **result}, indent=2))


if __name__ == "__main__":
    main()
