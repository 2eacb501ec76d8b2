"""Auto steps and the automatic learning rate on full-size models with random weights.

    python -m erase_engine.benchmarks.auto_full_size --shape sd15 [--resolution 64] [--device cpu]
        [--dtype float32|bfloat16|float16] [--train xattn|xattn-kv|noxattn|full] [--seed N]

Runs one erasure at the defaults (auto steps, auto learning rate) on a full-size SD1.5- or
SDXL-shaped model (random weights; 64 px is an 8x8 latent, what a CPU affords) and prints
the held-out score at every check, the steps it took, why it stopped, and the seconds.
On SDXL it also prints how much of the concept's guidance comes through the pooled text
embedding alone, the path cross-attention cannot reach (docs/method.md, section 5).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from ..denoiser import Conditioning, Denoiser
from ..layers import TRAINABLE_SETS
from ..parameters import EraseConfig
from ..trainer import Progress, erase_concept
from .speed import DTYPES, PROMPTS, build_model, peak_memory_gib


def pooled_guidance_share(denoiser: Denoiser, prompt: str, resolution: int) -> float:
    """``|e(x, context of "", pooled of prompt) - e(x, "")| / |e(x, prompt) - e(x, "")|``, the mean
    over random latents at four noise levels: the part of the prompt's guidance that enters the
    UNet through the pooled embedding and the time embedding, not through cross-attention."""
    both = denoiser.encode(["", prompt])
    empty, concept = both[0], both[1]
    pooled_only = Conditioning(empty.context, concept.extras)
    generator, shares = torch.Generator().manual_seed(0), []
    with torch.no_grad():
        for timestep in (100, 300, 600, 900):
            x = torch.randn(1, *denoiser.latent_shape(resolution), generator=generator).to(
                denoiser.device, denoiser.dtype
            )
            t = torch.tensor([timestep], device=denoiser.device)
            unconditional = denoiser.output(x, t, empty)
            guidance = denoiser.output(x, t, concept) - unconditional
            shares.append(float((denoiser.output(x, t, pooled_only) - unconditional).norm() / guidance.norm()))
    return sum(shares) / len(shares)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m erase_engine.benchmarks.auto_full_size", description=__doc__)
    parser.add_argument("--shape", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--resolution", type=int, default=64, help="image pixels (64: an 8x8 latent)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sampler-steps", type=int, default=50, help="the trajectory sampler's steps")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--train", choices=TRAINABLE_SETS, default="xattn", help="the trained layers")
    parser.add_argument("--seed", type=int, default=0, help="the random weights' and the erasure's seed")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    denoiser = build_model(args.shape, args.device, getattr(torch, args.dtype))
    config = EraseConfig(
        erase=[PROMPTS[args.shape]], preserve=["a photo of a dog"], resolution=args.resolution,
        sampler_steps=args.sampler_steps, train=args.train, seed=args.seed,
    )  # fmt: skip
    shown = []
    pooled_share = None
    if denoiser.info.architecture == "sdxl":  # the family with a pooled text input
        pooled_share = round(pooled_guidance_share(denoiser, config.erase[0], args.resolution), 3)
        print(f"share of the guidance through the pooled embedding alone: {pooled_share}", file=sys.stderr)

    def progress(where: Progress) -> None:
        if where.score is not None and where.score is not (shown[-1] if shown else None):
            shown.append(where.score)
            print(f"step {where.step}: {where.score.summary()}, loss {where.losses['loss']:.4g}", file=sys.stderr)

    erasure = erase_concept(denoiser, config, progress=progress)
    row = {
        "shape": args.shape,
        "device": torch.cuda.get_device_name(denoiser.device) if denoiser.device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "resolution": args.resolution,
        "train": args.train,
        "seed": args.seed,
        "trained_layers": len(erasure.deltas.layers),
        "pooled_guidance_share": pooled_share,
        "steps_run": erasure.scores[-1][0],
        "stopped": erasure.stopped,
        "score": erasure.score.as_dict(),
        "scores": [{"step": step, **score.as_dict()} for step, score in erasure.scores],
        "seconds": {k: round(v, 1) for k, v in erasure.seconds.items()},
        "peak_mem_gib": round(peak_memory_gib(denoiser.device), 2),
    }
    print(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
