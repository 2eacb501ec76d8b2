"""``erase-concept``: erase a concept from a Stable Diffusion model on the command line."""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import fields
from pathlib import Path

from .deltas import TRAINABLE_SETS
from .objective import PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erase-concept",
        description="Erase a concept from a Stable Diffusion model and save a LoRA and/or a checkpoint.",
    )
    parser.add_argument("--model", required=True, help="diffusers folder or single-file .safetensors/.ckpt")
    parser.add_argument("--erase", action="append", required=True, metavar="TEXT", help="concept to erase (repeatable)")
    parser.add_argument(
        "--into", action="append", default=[], metavar="TEXT", help="alternative concept (one, or one per --erase)"
    )
    parser.add_argument(
        "--preserve", nargs="+", action="extend", default=[], metavar="TEXT", help="prompts to keep unchanged"
    )
    parser.add_argument("--method", choices=sorted(PRESETS), default="surgical")
    parser.add_argument("--train", choices=TRAINABLE_SETS, default="xattn", help="which UNet layers get deltas")
    rank = parser.add_mutually_exclusive_group()
    rank.add_argument("--lora-rank", type=int, default=4, metavar="N", help="train a LoRA of rank N (default 4)")
    rank.add_argument("--full-rank", action="store_true", help="train full-rank deltas")
    parser.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
    parser.add_argument(
        "--export-rank", type=int, default=16, metavar="N", help="SVD rank of the LoRA export of full-rank deltas"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, metavar="FILE.safetensors", help="where to write the LoRA")
    parser.add_argument(
        "--save-checkpoint", type=Path, metavar="FILE.safetensors", help="also write a merged checkpoint"
    )
    parser.add_argument("--report", type=Path, metavar="DIR", help="write a before/after grid, loss curve and summary")
    advanced = parser.add_argument_group("advanced")
    advanced.add_argument("--eta", type=float, help="negative guidance on the erased concept (preset's value)")
    advanced.add_argument("--lambda-u", type=float, help="weight of the unconditional-score term")
    advanced.add_argument("--lambda-p", type=float, help="weight of the preserve term")
    advanced.add_argument("--trajectories", type=int, default=4, help="sampled trajectories per prompt")
    advanced.add_argument("--sampler-steps", type=int, default=50, help="DDIM steps of the trajectory sampler")
    advanced.add_argument("--sampler-cfg", type=float, default=3.0, help="CFG scale of the trajectory sampler")
    advanced.add_argument("--resolution", type=int, help="image size in pixels (default: the model's)")
    advanced.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), help="override the model's")
    return parser


def _check_output(parser: argparse.ArgumentParser, flag: str, path: Path | None) -> None:
    if path is None:
        return
    if path.suffix != ".safetensors":
        parser.error(f"{flag} must name a .safetensors file, got {path}")
    if not path.parent.resolve().is_dir():
        parser.error(f"{flag}: the folder {path.parent} does not exist")


def default_output(erase: list[str]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", erase[0].lower()).strip("-")[:40] or "concept"
    return Path(f"erased-{slug}.safetensors")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and args.save_checkpoint is None:
        args.out = default_output(args.erase)
    _check_output(parser, "--out", args.out)
    _check_output(parser, "--save-checkpoint", args.save_checkpoint)

    # Heavy imports after argument checks, so a typo answers at once.
    import torch
    from tqdm import tqdm

    from .export import save_checkpoint, save_lora
    from .loading import load_denoiser
    from .report import write_report
    from .trainer import EraseConfig, erase_concept

    try:
        if args.full_rank:
            args.lora_rank = None
        config = EraseConfig(**{f.name: getattr(args, f.name) for f in fields(EraseConfig)})
        config.objective()  # validates the method's constraints before loading anything
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for, but this PyTorch sees no CUDA device")
        denoiser = load_denoiser(args.model, device=args.device, prediction_type=args.prediction_type)
        with tqdm(total=config.steps, desc="erasing", unit="step", file=sys.stderr) as bar:

            def progress(step: int, total: int, losses: dict[str, float]) -> None:
                bar.set_postfix(loss=f"{losses['loss']:.4g}", refresh=False)
                bar.update(1)

            erasure = erase_concept(denoiser, config, progress=progress)
        outputs = {}
        if args.out is not None:
            outputs["lora"] = str(save_lora(erasure, denoiser, args.out, svd_rank=args.export_rank))
        if args.save_checkpoint is not None:
            outputs["checkpoint"] = str(save_checkpoint(erasure, denoiser, args.save_checkpoint))
        if args.report is not None:
            outputs["report"] = str(write_report(args.report, denoiser, erasure, outputs=dict(outputs)))
    except (ValueError, FileNotFoundError, KeyError) as error:
        print(f"erase-concept: error: {error}", file=sys.stderr)
        return 2
    for kind, path in outputs.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
