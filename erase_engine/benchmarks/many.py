"""Many concepts in one erasure, on ``builtin:shapes``, judged concept by concept.

    python -m erase_engine.benchmarks.many all-but-one [--keep circle]
    python -m erase_engine.benchmarks.many combination [--erase "red star"]
    python -m erase_engine.benchmarks.many growth [--counts 1 3 6 12]

- ``all-but-one``: every shape but one erased in one run; each erased shape's accuracy, the
  kept one's, and whether the erased shapes' samples keep the color they were asked for.
- ``combination``: one color-and-shape combination erased ("red star"), its neighbours
  (the same shape in the other colors, the same color on the other shapes) preserved.
- ``growth``: 1, 3, 6, 12 combinations ("blue circle", ...) erased in one run each, six others
  kept: seconds, peak memory, erasure per concept and the kept combinations' accuracy.

Each row runs in a process of its own (its peak memory is its own), with the engine's defaults
(auto steps); a JSON row per run, then a markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..builtin import BUILTIN_MODEL
from ..builtin.judge import Judge, load_judge
from ..builtin.render import BACKGROUNDS, COLORS, SHAPES, prompt
from ..denoiser import Denoiser
from ..hosts.diffusers_loading import load_denoiser
from ..parameters import EraseConfig
from ..trainer import erase_concept
from .efficacy import SAMPLE_SEED, average, sample, table_cell

SAMPLES = 32  # per concept judged
KEPT_IN_GROWTH = 6  # combinations never erased in the growth rows, whose accuracy must stay


@dataclass(frozen=True)
class Target:
    """What the judge looks for: a shape, a color, or both ("red star")."""

    shape: int | None = None
    color: int | None = None

    @staticmethod
    def parse(text: str) -> Target:
        words = text.strip().lower().removeprefix("a ").split()
        shape = next((SHAPES.index(w) for w in words if w in SHAPES), None)
        color = next((list(COLORS).index(w) for w in words if w in COLORS), None)
        if not words or len(words) != (shape is not None) + (color is not None):
            raise ValueError(f"name a shape {SHAPES}, a color {tuple(COLORS)} or both ('red star'), not {text!r}")
        return Target(shape, color)

    @property
    def name(self) -> str:
        color = list(COLORS)[self.color] if self.color is not None else None
        return " ".join(w for w in (color, SHAPES[self.shape] if self.shape is not None else None) if w)

    def prompts(self, samples: int) -> list[str]:
        """Prompts that ask for it (over the other attribute and the backgrounds), cycled to ``samples``."""
        combos = [
            (s, c, b)
            for s, c, b in itertools.product(range(len(SHAPES)), range(len(COLORS)), BACKGROUNDS)
            if self.shape in (None, s) and self.color in (None, c)
        ]
        picked = [combos[(i * 7) % len(combos)] for i in range(samples)]  # a stride that walks them all
        return [prompt(SHAPES[s], list(COLORS)[c], b) for s, c, b in picked]

    def accuracy(self, judge: Judge, denoiser: Denoiser, deltas, samples: int, seed: int) -> dict[str, float]:
        """How often the judge sees it in samples of its prompts (``acc``), and how often the
        color asked for (``color_kept``)."""
        prompts = self.prompts(samples)
        shapes, colors = judge.classify(sample(denoiser, prompts, seed, deltas))
        seen = torch.ones_like(shapes, dtype=torch.bool)
        if self.shape is not None:
            seen &= shapes == self.shape
        if self.color is not None:
            seen &= colors == self.color
        asked = torch.tensor([list(COLORS).index(p.split()[1]) for p in prompts])  # "a <color> <shape> on ..."
        return {"acc": average(seen), "color_kept": average(colors == asked)}


def scenario(kind: str, args: argparse.Namespace) -> list[tuple[list[str], list[str]]]:
    """(erased, kept) concept lists: one per row."""
    if kind == "all-but-one":
        return [([s for s in SHAPES if s != args.keep], [args.keep])]
    if kind == "combination":
        target = Target.parse(args.erase)
        if target.shape is None or target.color is None:
            raise ValueError("combination erases a color-and-shape pair, e.g. 'red star'")
        color, shape = list(COLORS)[target.color], SHAPES[target.shape]
        neighbours = [f"{color} {s}" for s in SHAPES if s != shape] + [f"{c} {shape}" for c in COLORS if c != color]
        return [([target.name], neighbours)]
    # diagonals of the shape x color table: every six in a row hold each shape and each color once
    n = len(SHAPES)
    ordered = [f"{list(COLORS)[(k % n + k // n) % n]} {SHAPES[k % n]}" for k in range(n * len(COLORS))]
    kept, pool = ordered[-KEPT_IN_GROWTH:], ordered[:-KEPT_IN_GROWTH]
    return [(pool[:count], kept) for count in args.counts]


def sentences_config(erase: list[str], keep: list[str]) -> EraseConfig:
    """The erasure in the model's own sentences as well: each concept also erased in "a {} on a
    <background> background" (``contexts``), each kept one also preserved in them."""
    contexts = ["{}"] + [f"a {{}} on a {background} background" for background in BACKGROUNDS]
    kept = keep + [c.replace("{}", k) for k in keep for c in contexts[1:]]
    return EraseConfig(erase=erase, preserve=kept, contexts=contexts)


def run_row(erase: list[str], keep: list[str], samples: int, sentences: bool = False) -> dict:
    """One erasure of ``erase`` (``keep`` as its preserve prompts) at the defaults, judged;
    ``sentences``: with ``sentences_config``."""
    denoiser, judge = load_denoiser(BUILTIN_MODEL), load_judge()
    config = sentences_config(erase, keep) if sentences else EraseConfig(erase=erase, preserve=keep)
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    erasure = erase_concept(denoiser, config)
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seed = SAMPLE_SEED + config.seed
    judged = {}
    for name in [*erase, *keep]:
        target = Target.parse(name)
        before = target.accuracy(judge, denoiser, None, samples, seed)
        after = target.accuracy(judge, denoiser, erasure.deltas, samples, seed)
        judged[name] = {"before": before["acc"], "after": after["acc"], "color_kept": after["color_kept"]}
    erased_after = [judged[n]["after"] for n in erase]
    kept_drop = [judged[n]["before"] - judged[n]["after"] for n in keep]
    return {
        "concepts": len(erase),
        "steps": erasure.scores[-1][0],
        "stopped": erasure.stopped,
        "seconds": round(seconds, 1),
        "seconds_per_concept": round(seconds / len(erase), 1),
        "seconds_sampling": round(erasure.seconds["sampling"], 1),
        "peak_rss_gb": round(peak_kb / 2**20, 2),
        "erasure_rss_gb": round(max(peak_kb - before_kb, 0) / 2**20, 2),
        "erase_acc_after_max": max(erased_after),
        "erase_acc_after_mean": round(sum(erased_after) / len(erased_after), 4),
        "kept_acc_drop_max": round(max(kept_drop), 4),
        "erased_color_kept": round(sum(judged[n]["color_kept"] for n in erase) / len(erase), 4),
        "score_worst_remaining": round(erasure.score.worst_remaining, 4),
        "judged": judged,
        "erase": erase,
        "keep": keep,
        "sentences": sentences,
    }


TABLE_KEYS = (
    "concepts",
    "steps",
    "seconds",
    "seconds_per_concept",
    "peak_rss_gb",
    "erase_acc_after_max",
    "erase_acc_after_mean",
    "kept_acc_drop_max",
    "erased_color_kept",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erase_engine.benchmarks.many", description=__doc__)
    parser.add_argument("kind", choices=("all-but-one", "combination", "growth", "row"))
    parser.add_argument("--keep", default="circle", help="all-but-one: the shape kept")
    parser.add_argument("--erase", default="red star", help="combination: the pair erased")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 3, 6, 12], help="growth: concepts per row")
    parser.add_argument("--samples", type=int, default=SAMPLES, help="samples judged per concept")
    parser.add_argument(
        "--sentences", action="store_true", help="erase and preserve in the model's sentences too (contexts)"
    )
    parser.add_argument("--row", help=argparse.SUPPRESS)  # a row's lists, as JSON, in a child process
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.kind == "row":
        erase, keep = json.loads(args.row)
        print(json.dumps(run_row(erase, keep, args.samples, args.sentences)))
        return 0
    rows = []
    for erase, keep in scenario(args.kind, args):
        child = [sys.executable, "-m", __spec__.name, "row", "--row", json.dumps([erase, keep])]
        options = ["--samples", str(args.samples), *(["--sentences"] if args.sentences else [])]
        done = subprocess.run([*child, *options], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    print("| " + " | ".join(TABLE_KEYS) + " |\n|" + "---|" * len(TABLE_KEYS))
    for row in rows:
        print("| " + " | ".join(table_cell(row[k], k) for k in TABLE_KEYS) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
