"""``erase-concept``: erase a concept from a Stable Diffusion model on the command line.

erase-concept [--model PATH] --erase TEXT ...     erase, save a LoRA / checkpoint / report
erase-concept bench --erase TEXT ... | --compare  measure an erasure on builtin:shapes
erase-concept purify --lora FILE --image IN.png --prompt TEXT --out OUT.png
erase-concept attack --lora FILE --concept TEXT [--out EMB.safetensors] [--report DIR]   does it come back?
erase-concept ui [--port N] [--model PATH] [--folder DIR]   the web interface on 127.0.0.1
erase-concept bench-speed [--device cuda|cpu] [--shape tiny|sd15|sdxl]   ESD-style loop vs this engine
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ..builtin import BUILTIN_MODEL
from ..parameters import PARAMETERS, EraseConfig, Parameter, concept_list

if TYPE_CHECKING:
    from ..trainer import Progress


def add_parameter_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per erasure parameter (``--lambda-u`` for ``lambda_u``), from the parameter table."""
    advanced = parser.add_argument_group("advanced")
    for spec in PARAMETERS:
        group = advanced if spec.advanced else parser
        flag, default = "--" + spec.name.replace("_", "-"), spec.default
        if spec.is_list and spec.multiline:  # several prompts after one flag
            group.add_argument(flag, nargs="+", action="extend", default=[], metavar="TEXT", help=spec.help)
        elif spec.is_list:  # the flag repeats
            group.add_argument(flag, action="append", default=[], metavar="TEXT", help=spec.help)
        elif spec.choices:
            group.add_argument(flag, choices=spec.choices, default=default, help=f"{spec.help} (default {default})")
        else:
            automatic = spec.unset_means == "auto"
            unset = f"; {spec.unset:g}: {spec.unset_means}" if spec.unset is not None and not automatic else ""
            ranged = f"{spec.minimum:g} to {spec.maximum:g}{unset}" + (" or auto" if automatic else "")
            shown = "auto" if automatic and default == spec.unset else f"{default:g}"
            flag_help = f"{spec.help} (default {shown}; {ranged})"
            if spec.name == "lora_rank":  # also a switch, the way the CLI always had it
                rank = group.add_mutually_exclusive_group()
                rank.add_argument(flag, type=int, default=default, metavar="N", help=flag_help)
                rank.add_argument("--full-rank", dest=spec.name, action="store_const", const=0, help="--lora-rank 0")
            else:
                group.add_argument(flag, type=cli_type(spec), default=default, help=flag_help)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")


def cli_type(spec: Parameter):
    """The flag's type: the value's, and the word "auto" where the unset value means auto."""
    if spec.unset_means != "auto":
        return spec.kind

    def value(text: str):
        return spec.unset if text == "auto" else spec.kind(text)

    value.__name__ = f"{spec.kind.__name__} or 'auto'"  # argparse's error message names it
    return value


def config_from_args(args: argparse.Namespace, **overrides) -> EraseConfig:
    config = EraseConfig(**{**{spec.name: getattr(args, spec.name) for spec in PARAMETERS}, **overrides})
    config.objective()  # validates the method's constraints before loading anything
    return config


def load_model(model: str, device: str, prediction_type: str | None = None):
    import torch

    from ..hosts.diffusers_loading import load_denoiser

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but this PyTorch sees no CUDA device")
    return load_denoiser(model, device=device, prediction_type=prediction_type)


def check_output(
    parser: argparse.ArgumentParser, flag: str, path: Path | None, suffix: str = ".safetensors", overwrite: bool = True
) -> None:
    if path is None:
        return
    if path.suffix != suffix:
        parser.error(f"{flag} must name a {suffix} file, got {path}")
    if not path.parent.resolve().is_dir():
        parser.error(f"{flag}: the folder {path.parent} does not exist")
    if path.exists() and not overwrite:
        parser.error(f"{flag}: {path} exists; pass --overwrite to replace it")


def erase_file_lines(path: Path | None) -> list[str]:
    """The lines of ``--erase-file`` (none without one); parsed with --erase's by the config."""
    if path is None:
        return []
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"--erase-file: cannot read {path}: {error}") from None


def default_output(erase: list[str], prefix: str = "erased") -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", erase[0].lower()).strip("-")[:40] or "concept"
    return Path(f"{prefix}-{slug}.safetensors")


class PhaseBars:
    """tqdm bars on stderr fed by the trainer's progress callback: one for the trajectory cache's
    sampler steps ("sampling"), then one for the training steps ("erasing"). A bar is closed
    when its phase ends, so its last state is printed even when tqdm skipped the redraw."""

    LABELS = {"sampling": "sampling", "training": "erasing", "attacking": "attacking"}

    def __init__(self) -> None:
        self.bar = None
        self.phase = None

    def __call__(self, where: Progress) -> None:
        from tqdm import tqdm

        if where.phase != self.phase or self.bar.total != where.total:
            self.close()
            self.phase = where.phase
            self.bar = tqdm(desc=self.LABELS[where.phase], total=where.total, unit="step", file=sys.stderr)
        if where.losses:
            shown = {"loss": f"{where.losses['loss']:.4g}"}
            if where.score is not None:
                shown["remaining"] = f"{where.score.worst_remaining:.2f}"
            self.bar.set_postfix(shown, refresh=False)
        self.bar.update(where.step - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> PhaseBars:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@contextmanager
def ctrl_c_stops_at_the_next_step(ranks_size: int = 1) -> Iterator[Callable[[], bool] | None]:
    """While a run goes, Ctrl-C asks it to stop at its next step (the engine's ``should_stop``)
    instead of raising KeyboardInterrupt wherever the main thread is: raised inside a
    destructor or a callback, the exception is printed and ignored, and the run goes on. A
    second Ctrl-C raises at once. Under torchrun the launcher stops the ranks (a rank that
    stopped on its own would leave the others waiting in a collective), so nothing is caught."""
    if ranks_size > 1:
        yield None
        return
    asked = []

    def ask(signum, frame) -> None:
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)

    previous = signal.signal(signal.SIGINT, ask)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


def erase_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erase-concept",
        description="Erase a concept from a Stable Diffusion model and save a LoRA and/or a checkpoint.",
        epilog="Other commands: erase-concept bench / purify / attack / ui (each with --help).",
    )
    parser.add_argument(
        "--model", default=BUILTIN_MODEL, help=f"diffusers folder, .safetensors/.ckpt file or {BUILTIN_MODEL}"
    )
    add_parameter_arguments(parser)
    parser.add_argument(
        "--erase-file",
        type=Path,
        metavar="FILE",
        help="concepts to erase, one a line ('concept => alternative' names its own; # comments), besides --erase",
    )
    parser.add_argument("--export-rank", type=int, default=16, metavar="N", help="SVD rank for full-rank deltas")
    parser.add_argument("--out", type=Path, metavar="FILE.safetensors", help="where to write the LoRA")
    parser.add_argument("--save-checkpoint", type=Path, metavar="FILE.safetensors", help="also write a checkpoint")
    parser.add_argument("--report", type=Path, metavar="DIR", help="write a before/after grid, loss curve and summary")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), help="override the model's")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def erase_main(argv: list[str]) -> int:
    parser = erase_parser()
    args = parser.parse_args(argv)
    if not all(e.strip() for e in args.erase):  # an empty shell variable, say: not a list's blank line
        parser.error("--erase needs a non-empty concept, got an empty one")
    args.erase += erase_file_lines(args.erase_file)
    concepts, _ = concept_list(args.erase, [])
    if not concepts:
        parser.error("give at least one non-empty concept to erase: --erase TEXT or --erase-file FILE")
    if args.out is None and args.save_checkpoint is None:
        args.out = default_output(concepts)
    check_output(parser, "--out", args.out, overwrite=args.overwrite)
    check_output(parser, "--save-checkpoint", args.save_checkpoint, overwrite=args.overwrite)

    from ..exports import save_checkpoint, save_lora
    from ..parallel import start_from_environment
    from ..report import write_report
    from ..trainer import erase_concept

    config = config_from_args(args)
    ranks, device = start_from_environment(args.device)  # under torchrun: one rank of a data-parallel run
    denoiser = load_model(args.model, device, args.prediction_type)
    with PhaseBars() as bars, ctrl_c_stops_at_the_next_step(ranks.size) as should_stop:
        erasure = erase_concept(denoiser, config, progress=bars if ranks.is_main else None, should_stop=should_stop)
    if not ranks.is_main:
        return 0  # every rank holds the same deltas; the first one writes them
    outputs, if_exists = {}, "replace" if args.overwrite else "refuse"
    if args.out is not None:
        outputs["lora"] = str(save_lora(erasure, args.out, args.export_rank, if_exists))
    if args.save_checkpoint is not None:
        outputs["checkpoint"] = str(save_checkpoint(erasure, args.save_checkpoint, if_exists))
    if args.report is not None:
        outputs["report"] = str(write_report(args.report, erasure, outputs=dict(outputs)))
    print(f"{erasure.scores[-1][0]} steps ({erasure.stopped}); held-out score: {erasure.score.summary()}")
    for kind, path in outputs.items():
        print(f"{kind}: {path}")
    return 0


# The --compare defaults: every shape erased plainly, shapes replaced by others, and colors.
COMPARE_DEFAULTS = [(s, "") for s in ("circle", "square", "triangle", "star", "heart", "cross")] + [
    ("star", "heart"),
    ("square", "circle"),
    ("red", ""),
    ("blue", "green"),
]


def bench_main(argv: list[str]) -> int:
    from ..benchmarks import efficacy as bench

    parser = argparse.ArgumentParser(prog="erase-concept bench", description=bench.__doc__)
    add_parameter_arguments(parser)
    parser.add_argument(
        "--compare", action="store_true", help="run surgical and esd side by side, each until the judge sees it erased"
    )
    parser.add_argument(
        "--preserve-others",
        action="store_true",
        help="preserve the other five shapes (or colors) by name, as the paper does; without it or --preserve,"
        " the bench measures exactly the erasure erase-concept --erase X trains",
    )
    parser.add_argument("--samples", type=int, default=72, help="samples per prompt group (>= 64)")
    parser.add_argument(
        "--uncond-samples",
        type=int,
        metavar="N",
        help="samples of the empty prompt (default: --samples); its pixel drift is the noisiest figure",
    )
    parser.add_argument(
        "--attack-steps",
        type=int,
        default=bench.ATTACK_STEPS,
        metavar="N",
        help=f"the textual-inversion attack's budget (default {bench.ATTACK_STEPS}; 0: no attack)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    parser.add_argument(
        "--grid", type=Path, metavar="FILE.png", help="before/after picture of the first erasure (--compare: by method)"
    )
    args = parser.parse_args(argv)
    if not args.erase and not args.compare:
        parser.error("give --erase TEXT, or --compare for the default set of concepts")
    if args.preserve_others and args.preserve:
        parser.error("give --preserve TEXT or --preserve-others, not both")
    if args.uncond_samples is not None and args.uncond_samples < 1:
        parser.error("--uncond-samples must be at least 1")
    check_output(parser, "--json", args.json, ".json")
    check_output(parser, "--grid", args.grid, ".png")

    from ..builtin.judge import load_judge

    padded_into = args.into + [""] * len(args.erase or [])  # an --erase without its --into has none
    pairs = list(zip(args.erase, padded_into, strict=False)) if args.erase else COMPARE_DEFAULTS
    methods = ["surgical", "esd"] if args.compare else [args.method]
    denoiser, judge = load_model(BUILTIN_MODEL, args.device), load_judge()
    run = bench.run_bench_until_erased if args.compare else bench.run_bench
    rows, done, first_images = [], {}, {}
    for (erase, into), method in ((p, m) for p in pairs for m in methods):
        into_list = [into] if into and method != "esd" else []
        preserve = bench.other_concepts(erase) if args.preserve_others else args.preserve
        config = config_from_args(args, erase=[erase], into=into_list, preserve=preserve, method=method)
        key = (erase, tuple(into_list), method)
        if key not in done:  # esd's row for an "into" pair is its plain erasure, run once
            what = f"{erase!r}{f' into {into!r}' if config.into else ''} with {method}"
            print(f"bench: erasing {what} ...", file=sys.stderr)
            done[key] = run(
                denoiser, judge, config, args.samples, args.attack_steps, uncond_samples=args.uncond_samples
            )
            print(json.dumps(done[key][0]), file=sys.stderr)
        row, images = done[key]
        rows.append(row)
        if (erase, into) == pairs[0]:
            first_images[method] = images
    if args.grid is not None:
        if args.compare:
            bench.methods_grid({pairs[0][0]: first_images}).save(args.grid)
        else:
            bench.bench_grid(first_images[methods[0]]).save(args.grid)
    print(bench.comparison_table(rows))
    for row in rows if args.compare else []:  # equal erasure: whether each row got there
        print(f"{row['erase']}{' -> ' + row['into'] if row['into'] else ''}, {row['method']}: {row['erased']}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows if len(rows) > 1 else rows[0], indent=2))
    return 0


def load_erased(model: str, lora: Path, device: str):
    """The base model and a LoRA's deltas on it (refused if the LoRA was made for another kind of model)."""
    from ..deltas import WeightDeltas
    from ..exports import check_lora_base
    from ..files import read_state_dict

    if not lora.is_file():
        raise FileNotFoundError(f"no LoRA at {lora}")
    state, metadata = read_state_dict(lora)
    denoiser = load_model(model, device)
    check_lora_base(metadata, denoiser)
    return denoiser, WeightDeltas.from_lora(denoiser.unet_layers(), state).to(denoiser.device)


def attack_main(argv: list[str]) -> int:
    from ..attack import AttackConfig

    parser = argparse.ArgumentParser(
        prog="erase-concept attack",
        description="Does the concept come back? Learn a textual-inversion embedding that brings it back on the "
        "erased model (original model + LoRA), and save it for the hosts' embeddings folders.",
    )
    parser.add_argument("--model", default=BUILTIN_MODEL, help="the original model the LoRA was erased from")
    parser.add_argument("--lora", type=Path, required=True, help="the erasure's LoRA file")
    parser.add_argument("--concept", required=True, help="the erased concept, as it was erased")
    parser.add_argument(
        "--contexts", nargs="+", default=["{}"], metavar="TEXT", help="sentences to attack in ({} stands for it)"
    )
    parser.add_argument("--steps", type=int, default=AttackConfig.steps, help="attack steps (the budget)")
    parser.add_argument("--tokens", type=int, default=AttackConfig.tokens, help="vectors in the embedding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, metavar="EMB.safetensors", help="where to write the embedding")
    parser.add_argument("--report", type=Path, metavar="DIR", help="write a grid (original / erased / attacked)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing embedding file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    args.out = args.out or default_output([args.concept], prefix="attack")
    check_output(parser, "--out", args.out, overwrite=args.overwrite)

    from ..attack import learn_attack, save_embedding
    from ..report import write_attack_report

    config = AttackConfig(args.concept, args.contexts, args.tokens, args.steps, args.seed)
    denoiser, deltas = load_erased(args.model, args.lora, args.device)
    with PhaseBars() as progress, ctrl_c_stops_at_the_next_step() as should_stop:
        attack = learn_attack(denoiser, deltas, config, progress=progress, should_stop=should_stop)
    judged = judge_builtin_attack(args.model, denoiser, deltas, attack)
    path = save_embedding(attack, denoiser, args.out, "replace" if args.overwrite else "refuse")
    if args.report is not None:
        write_attack_report(args.report, denoiser, deltas, attack, {"judge": judged, "embedding": str(path)})
    print(f"attack: {args.steps} steps; recovered {attack.recovered:.2f} of the concept's original prediction")
    for name, value in (judged or {}).items():
        print(f"{name}: {value:.2f}")
    print(f"embedding: {path}" + (f"\nreport: {args.report}" if args.report else ""))
    return 0


def judge_builtin_attack(model: str, denoiser, deltas, attack) -> dict | None:
    """On the built-in model, the judge's accuracy for the concept with the embedding (the bench's figure)."""
    from ..benchmarks import efficacy as bench
    from ..builtin.judge import load_judge

    if model != BUILTIN_MODEL:
        return None
    try:
        concept = bench.Concept.parse(attack.config.concept)
    except ValueError:
        return None
    figures, _ = bench.attack_accuracy(load_judge(), denoiser, deltas, attack, concept, 64, bench.SAMPLE_SEED)
    return figures


def purify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="erase-concept purify",
        description="DDIM-invert an image with the original model, regenerate it with the erased one.",
    )
    parser.add_argument("--model", default=BUILTIN_MODEL)
    parser.add_argument("--lora", type=Path, required=True, help="the erasure's LoRA file")
    parser.add_argument("--image", type=Path, required=True)
    parser.add_argument("--prompt", required=True, help="what the image shows")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT.png")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--strength", type=float, default=0.7, help="how far to invert, 0-1")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    check_output(parser, "--out", args.out, ".png")

    from PIL import Image, UnidentifiedImageError

    from ..purify import purify_picture

    if not args.image.is_file():
        raise FileNotFoundError(f"no image at {args.image}")
    if not args.lora.is_file():
        raise FileNotFoundError(f"no LoRA at {args.lora}")
    try:  # any size and mode: converted to RGB at the model's size, and back to the image's size
        image = Image.open(args.image)
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{args.image} is not an image this can read: {error}") from None
    denoiser, deltas = load_erased(args.model, args.lora, args.device)
    purify_picture(denoiser, image, args.prompt, deltas, args.steps, args.strength).save(args.out)
    print(f"purified: {args.out}")
    return 0


def ui_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="erase-concept ui", description="The web interface, on 127.0.0.1 only.")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--model", default=BUILTIN_MODEL, help=f"the model selected at start (default {BUILTIN_MODEL})")
    parser.add_argument("--folder", default=".", help="where LoRAs and checkpoints are saved (default: here)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not Path(args.folder).is_dir():
        parser.error(f"--folder: {args.folder} is not a folder")

    from .web import launch

    launch(args.port, args.model, args.folder, args.device)
    return 0


def bench_speed_main(argv: list[str]) -> int:
    from ..benchmarks.speed import main as speed_main

    return speed_main(argv)


COMMANDS = {
    "attack": attack_main,
    "bench": bench_main,
    "bench-speed": bench_speed_main,
    "purify": purify_main,
    "ui": ui_main,
}


EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad input (nothing done), 1 the run failed, 130 interrupted.
    In every failure case no output file is left behind and no traceback is shown."""
    from ..trainer import ErasureCancelled, ErasureFailed

    argv = list(sys.argv[1:] if argv is None else argv)
    command = COMMANDS.get(argv[0], None) if argv else None
    try:
        return command(argv[1:]) if command else erase_main(argv)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as error:
        return fail(f"error: {error}", EXIT_BAD_INPUT)
    except ErasureFailed as error:
        return fail(f"failed: {error}", EXIT_FAILED)
    except OSError as error:  # disk full, permissions
        return fail(f"could not write: {error}; nothing was saved", EXIT_FAILED)
    except (KeyboardInterrupt, ErasureCancelled):  # Ctrl-C: raised, or the run stopped at its next step
        return fail("interrupted; nothing was saved", EXIT_INTERRUPTED)


def fail(message: str, code: int) -> int:
    print(f"erase-concept: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
