"""Same picture, concept gone?  Each concept erased by ``surgical``, by ``surgical`` with
``keep_layout`` and by ``esd`` (the defaults otherwise), each run again with twice the steps
until the judge sees the concept in at most 5 % of the samples (equal erasure, as
``bench --compare``), and the layout each keeps (docs/method.md, section 10).

    python -m erase_engine.benchmarks.layout_study --erase star heart circle square triangle cross star:heart \
        --json layout.json --grid methods.png

``star:heart`` erases the star into a heart (``esd`` has no alternative: its row is a plain
erasure). Prints a JSON row per (concept, method) as it goes, then a markdown table; ``--grid``
draws the first concepts' samples, same seeds, a row per method under the original's.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from ..builtin import BUILTIN_MODEL
from ..builtin.judge import load_judge
from ..hosts.diffusers_loading import load_denoiser
from ..parameters import EraseConfig
from .efficacy import methods_grid, run_bench_until_erased, table_cell

KEEP_LAYOUT = 0.4  # the measured point where keep_layout still erases every shape (section 10)
COLUMNS = (
    "steps",
    "erase_acc_after",
    "into_acc_after",
    "layout_kept",
    "swap_layout_kept",
    "reseed_layout_kept",
    "layout_box_iou",
    "preserve_layout_kept",
    "preserve_acc_after",
    "uncond_pixel_drift",
    "purify_layout_iou",
    "purify_layout_kept",
)


def variants(keep_layout: float, esd_steps: int | None) -> dict[str, dict]:
    """The compared erasures, by label: the settings each changes from the defaults."""
    return {
        "surgical": {},
        f"surgical, keep {keep_layout:g}": {"keep_layout": keep_layout},
        "esd": {"method": "esd", "steps": esd_steps},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erase_engine.benchmarks.layout_study", description=__doc__)
    parser.add_argument("--erase", nargs="+", required=True, help="shapes or colors, CONCEPT or CONCEPT:ALTERNATIVE")
    parser.add_argument("--keep-layout", type=float, default=KEEP_LAYOUT)
    parser.add_argument(
        "--esd-steps", type=int, help="esd's first run's steps (default: auto; it doubles them until erased)"
    )
    parser.add_argument("--samples", type=int, default=72)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid", type=Path, metavar="FILE.png")
    parser.add_argument("--grid-concepts", type=int, default=2, help="how many of the first concepts the grid shows")
    args = parser.parse_args(argv)
    denoiser, judge = load_denoiser(BUILTIN_MODEL), load_judge()
    rows, shown, done = [], {}, {}
    for pair in args.erase:
        erase, _, into = pair.partition(":")
        for label, settings in variants(args.keep_layout, args.esd_steps).items():
            config = replace(EraseConfig(erase=[erase], into=[into] if into else []), **settings)
            if config.method == "esd":  # no alternative: its row for a replacement is its plain erasure, run once
                config = replace(config, into=[])
            key = (label, erase, tuple(config.into))
            if key not in done:
                row, images = run_bench_until_erased(denoiser, judge, config, args.samples, attack_steps=0)
                done[key] = {"variant": label} | row, images
                print(json.dumps(done[key][0]), flush=True)
            row, images = done[key]
            rows.append(row)
            if len(shown) < args.grid_concepts or pair in shown:
                shown.setdefault(pair, {})[label] = images
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.grid is not None:
        methods_grid(shown).save(args.grid)
    print(table(rows))


def table(rows: list[dict]) -> str:
    lines = ["| erased | variant | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (2 + len(COLUMNS))]
    for row in rows:
        erased = row["erase"] + (f" -> {row['into']}" if row["into"] else "")
        cells = [table_cell(row[k], k) for k in COLUMNS]
        lines.append(f"| {erased} | {row['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
