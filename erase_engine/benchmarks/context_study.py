"""Does erasing a concept in sentences help?  One erasure on ``builtin:shapes`` with the
given contexts (docs/method.md, section 9), judged on the benchmark's sentences, per
background.

    python -m erase_engine.benchmarks.context_study --erase purple --contexts "{}" "a {} shape on a white background"

Prints one JSON row: the steps auto took, the concept's share left (overall and per
background), the judge's accuracy on the other concepts' sentences before and after, and
the empty prompt's pixel drift.
"""

from __future__ import annotations

import argparse
import json

from ..builtin import BUILTIN_MODEL
from ..builtin.judge import load_judge
from ..builtin.render import BACKGROUNDS
from ..hosts.diffusers_loading import load_denoiser
from ..parameters import EraseConfig
from ..trainer import erase_concept
from .efficacy import SAMPLE_SEED, Concept, average, judge_erasure, other_concepts, prompt_groups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erase_engine.benchmarks.context_study", description=__doc__)
    parser.add_argument("--erase", required=True, help="a shape or a color of the built-in model")
    parser.add_argument("--contexts", nargs="+", default=["{}"], help="templates, {} where the concept goes")
    parser.add_argument("--steps", type=int, help="a fixed number of training steps (default: auto)")
    parser.add_argument("--samples", type=int, default=72)
    args = parser.parse_args(argv)
    denoiser, judge = load_denoiser(BUILTIN_MODEL), load_judge()
    concept = Concept.parse(args.erase)
    config = EraseConfig(
        erase=[args.erase], contexts=args.contexts, preserve=other_concepts(args.erase), steps=args.steps
    )
    erasure = erase_concept(denoiser, config)
    metrics, images = judge_erasure(judge, erasure, concept, None, args.samples, SAMPLE_SEED)
    prompts = prompt_groups(concept, args.samples)[0].prompts  # the sentences behind images["erase_after"]
    left = judge.classify(images["erase_after"])[concept.head] == concept.index
    row = {
        "erase": args.erase,
        "contexts": config.contexts,
        "steps": erasure.scores[-1][0],
        "remaining": round(erasure.score.remaining, 3),
        "erase_acc_after": metrics["erase_acc_after"],
        "by_background": {b: average(left[[b in p for p in prompts]]) for b in BACKGROUNDS},
        "others_acc_before": metrics["preserve_acc_before"],
        "others_acc_after": metrics["preserve_acc_after"],
        "uncond_pixel_drift": metrics["uncond_pixel_drift"],
    }
    print(json.dumps(row))


if __name__ == "__main__":
    main()
