"""One erasure of a full-size SD1.5-shaped model (random weights) on the CPU.

    python -m erase_engine.benchmarks.cpu_sd15 [--steps 20] [--resolution 64] [--threads N]

Prints the wall time of trajectory sampling and of training, the peak resident
memory, and, as a baseline measured in the same run, the time of one plain
UNet forward+backward at the same batch: a training step should cost about one
student forward+backward at batch 2 (the erased and the empty prompt; the
teacher's outputs come from the trajectory cache).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from ..hosts.diffusers_configs import STANDARD
from ..hosts.diffusers_loading import build_from_configs
from ..parameters import EraseConfig
from ..trainer import erase_concept


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=64, help="image pixels (64: an 8x8 latent)")
    parser.add_argument("--trajectories", type=int, default=4)
    parser.add_argument("--sampler-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    torch.manual_seed(0)
    denoiser = build_from_configs(STANDARD["sd1"], "sd1", "random-sd15")
    built = time.perf_counter() - started
    rss_model = peak_rss_gib()

    # Baseline: one forward+backward of the bare UNet (batch 2), with gradients
    # on the cross-attention weights only, as the default erasure trains.
    size = args.resolution // denoiser.vae_scale_factor
    x = torch.randn(2, 4, size, size)
    t = torch.tensor([500, 500])
    context = denoiser.encode(["a cat", ""]).context
    for name, param in denoiser.unet.named_parameters():
        param.requires_grad_(".attn2." in name)
    for _ in range(2):  # the first call warms up; the second is timed
        baseline_start = time.perf_counter()
        denoiser.unet(x, t, encoder_hidden_states=context).sample.square().mean().backward()
        baseline = time.perf_counter() - baseline_start
    denoiser.unet.requires_grad_(False).zero_grad(set_to_none=True)

    config = EraseConfig(
        erase=["a painting by Van Gogh"],
        steps=args.steps,
        trajectories=args.trajectories,
        sampler_steps=args.sampler_steps,
        resolution=args.resolution,
    )
    erasure = erase_concept(denoiser, config)
    per_step = erasure.seconds["training"] / args.steps
    figures = {
        "threads": torch.get_num_threads(),
        "latent": f"{size}x{size}",
        "build_seconds": round(built, 1),
        "sampling_seconds": round(erasure.seconds["sampling"], 1),
        "sampler_unet_calls": args.sampler_steps,
        "training_seconds": round(erasure.seconds["training"], 1),
        "erasure_seconds": round(erasure.seconds["total"], 1),
        "seconds_per_step": round(per_step, 2),
        "baseline_forward_backward_seconds": round(baseline, 2),
        "step_over_baseline": round(per_step / baseline, 2),
        "peak_rss_gib_model_only": round(rss_model, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
