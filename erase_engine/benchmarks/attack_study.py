"""Does it come back?  Each concept erased by ``surgical``, ``surgical`` with ``robust`` on and
``esd`` (the defaults otherwise), each erasure attacked at the benchmark's budget and, if asked,
by a stronger attack; and how the erasure holds for other ways of asking for the concept
(docs/method.md, section 11).

    python -m erase_engine.benchmarks.attack_study --erase star heart --strong-steps 1000 --strong-tokens 4

Prints a JSON row per (concept, method) as it goes, then a markdown table; ``--json`` keeps the rows.
One attack is noisy (its draws alone can move ``attack_acc`` by 0.2); ``--attack-seeds N``
attacks each erasure N times with different draws and reports the mean, and each run in
``*_acc_runs`` (``--strong-seeds`` for the stronger attack, whose runs take longer).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..builtin import BUILTIN_MODEL
from ..builtin.judge import load_judge
from ..builtin.render import COLORS, SHAPES
from ..hosts.diffusers_loading import load_denoiser
from ..parameters import EraseConfig
from .efficacy import (
    ATTACK_STEPS,
    SAMPLE_SEED,
    Concept,
    average,
    bench_erasure,
    judge_attack,
    other_concepts,
    prompt_groups,
    sample,
    table_cell,
)

METHODS = {"surgical": {}, "robust": {"robust": "on"}, "esd": {"method": "esd"}}
PARAPHRASE_SAMPLES = 64


def paraphrases(concept: Concept) -> dict[str, list[str]]:
    """The ways the built-in model was taught to ask for a concept (its caption templates),
    each as a list of prompts over the other attribute and the backgrounds."""
    name = concept.name
    if concept.kind == "shape":
        return {
            f"{name}": [name],
            f"a {name}": [f"a {name}"],
            f"a <color> {name}": [f"a {color} {name}" for color in COLORS],
            f"a <color> {name} on a <background> background": prompt_groups(concept, 18)[0].prompts,
        }
    return {
        f"{name}": [name],
        f"a {name} shape": [f"a {name} shape"],
        f"a {name} <shape>": [f"a {name} {shape}" for shape in SHAPES],
        f"a {name} <shape> on a <background> background": prompt_groups(concept, 18)[0].prompts,
    }


def paraphrase_accuracy(judge, erasure, concept: Concept) -> dict[str, float]:
    """The judge's accuracy for the concept after the erasure, per caption form."""
    found = {}
    for form, prompts in paraphrases(concept).items():
        asked = [prompts[i % len(prompts)] for i in range(PARAPHRASE_SAMPLES)]
        seen = judge.classify(sample(erasure.denoiser, asked, SAMPLE_SEED, erasure.deltas))[concept.head]
        found[form] = average(seen == concept.index)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erase_engine.benchmarks.attack_study", description=__doc__)
    parser.add_argument("--erase", nargs="+", default=list(SHAPES), help="shapes or colors of the built-in model")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--samples", type=int, default=72)
    parser.add_argument("--strong-steps", type=int, default=0, help="a stronger attack's steps (0: none)")
    parser.add_argument("--strong-tokens", type=int, default=4)
    parser.add_argument("--contexts", nargs="+", default=["{}"], help="the erasures' contexts (default: the concept)")
    parser.add_argument("--attack-seeds", type=int, default=1, help="attacks per erasure and budget (their mean)")
    parser.add_argument("--strong-seeds", type=int, help="the stronger attack's (default: --attack-seeds)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    denoiser, judge = load_denoiser(BUILTIN_MODEL), load_judge()
    rows = []
    for erase in args.erase:
        concept = Concept.parse(erase)
        for method in args.methods:
            config = EraseConfig(
                erase=[erase], preserve=other_concepts(erase), contexts=args.contexts, **METHODS[method]
            )
            row, _, erasure = bench_erasure(denoiser, judge, config, args.samples)
            keep = ("steps", "seconds", "erase_acc_after", "preserve_acc_after", "uncond_pixel_drift", "layout_kept")
            result = {"erase": erase, "method": method, **{k: row[k] for k in keep}}
            budgets = {"attack": (ATTACK_STEPS, 1, args.attack_seeds)}
            if args.strong_steps:
                budgets["strong"] = (args.strong_steps, args.strong_tokens, args.strong_seeds or args.attack_seeds)
            for name, (steps, tokens, seeds) in budgets.items():
                runs = [
                    judge_attack(judge, erasure, concept, args.samples, SAMPLE_SEED, steps, tokens, config.seed + k)[0]
                    for k in range(seeds)
                ]
                figures = {k: round(sum(run[k] for run in runs) / len(runs), 4) for k in runs[0]}
                if seeds > 1:
                    figures["attack_acc_runs"] = [run["attack_acc"] for run in runs]
                result |= {k.replace("attack", name, 1): v for k, v in figures.items()}
            result["paraphrases"] = paraphrase_accuracy(judge, erasure, concept)
            print(json.dumps(result), flush=True)
            rows.append(result)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    print(table(rows))


def table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k not in ("erase", "method", "paraphrases") and not k.endswith("_runs")]
    lines = ["| erase | method | " + " | ".join(keys) + " |", "|" + "---|" * (2 + len(keys))]
    for row in rows:
        cells = [table_cell(row[k], k) for k in keys]
        lines.append(f"| {row['erase']} | {row['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
