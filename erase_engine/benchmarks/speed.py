"""``erase-concept bench-speed``: an ESD-style training loop and this engine's, on the same
model and device, in one run.

The ESD-style loop is ESD's recipe: two UNet copies (the student trains its selected
weights in place), and every step samples a fresh ``x_t`` by running DDIM with CFG from
noise down to a random step with the student, then one teacher call for the erased and the
empty prompt and one student forward+backward.  The engine's loop is ``erase_concept`` at
its defaults (trajectory cache once, then batched teacher and student calls on LoRA deltas).
"""

from __future__ import annotations

import copy
import json
import random
import resource
import sys
import time
from pathlib import Path

import torch

from ..builtin import BUILTIN_MODEL
from ..denoiser import Conditioning, Denoiser
from ..hosts.diffusers_configs import STANDARD
from ..hosts.diffusers_loading import build_from_configs, load_denoiser
from ..layers import is_trainable
from ..objective import erase_target
from ..parameters import EraseConfig
from ..sampling import ddim_sample, ddim_timesteps
from ..trainer import erase_concept

ERASURE_STEPS = 200  # a typical erasure (auto steps stop after 100-400 on the built-in model), per-erasure figures
PROMPTS = {"tiny": "star", "sd15": "Van Gogh", "sdxl": "Van Gogh"}
DTYPES = ("float32", "bfloat16", "float16")  # the --dtype choices of the benchmarks on these models


ESD_LR = 1e-5  # ESD's own learning rate (the timing does not depend on it)


def build_model(shape: str, device: str, dtype: torch.dtype) -> Denoiser:
    """``tiny``: the built-in demo model; ``sd15``/``sdxl``: full-size models with random weights."""
    if shape == "tiny":
        return load_denoiser(BUILTIN_MODEL, device=device, dtype=dtype)
    architecture = {"sd15": "sd1", "sdxl": "sdxl"}[shape]
    return build_from_configs(STANDARD[architecture], architecture, f"random-{shape}").to(device, dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def esd_style_seconds_per_step(denoiser: Denoiser, config: EraseConfig, steps: int) -> tuple[float, float]:
    """Seconds per step of the ESD-style loop, and the mean number of sampler steps it ran."""
    student = copy.copy(denoiser)
    student.network = student.unet = copy.deepcopy(denoiser.unet)  # ESD's second copy, trained in place
    # by name, because a pass autograd records sees the network's other weights as frozen aliases
    trained = {
        layer.weight_name: layer.module.weight.requires_grad_(True)
        for layer in student.unet_layers()
        if is_trainable(layer.ldm_name, config.train)
    }
    optimizer = torch.optim.Adam(trained.values(), lr=config.lr or ESD_LR)
    cond = denoiser.encode(["", config.erase[0]]).detached().to(denoiser.device)
    uncond, erase = cond[0], cond[1]
    shape = denoiser.latent_shape(config.resolution)
    pick, generator = random.Random(config.seed), torch.Generator().manual_seed(config.seed)
    timesteps = ddim_timesteps(denoiser.schedule.num_timesteps, config.sampler_steps)
    sampled, started = [], None
    for step in range(steps + 1):  # the first step warms up and is not timed
        if step == 1:
            synchronize(denoiser.device)
            started = time.perf_counter()
        stop = pick.randrange(config.sampler_steps)
        noise = torch.randn((1, *shape), generator=generator).to(denoiser.device, denoiser.dtype)
        x_t, _, _ = ddim_sample(student, erase, noise, config.sampler_steps, config.sampler_cfg, stop=stop)
        t = timesteps[stop : stop + 1].to(denoiser.device)  # the level x_t stopped at
        sampled.append(stop)
        with torch.no_grad():
            teacher = denoiser.output(torch.cat([x_t, x_t]), t.repeat(2), Conditioning.cat([uncond, erase]))
        target = erase_target(teacher[0:1], teacher[1:2], 1.0, None)
        loss = torch.nn.functional.mse_loss(student._predict(x_t, t, erase, trained).float(), target.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    synchronize(denoiser.device)
    return (time.perf_counter() - started) / steps, sum(sampled[1:]) / steps


def unet_forward_flops(denoiser: Denoiser, config: EraseConfig) -> float:
    """FLOPs of one UNet forward at batch 1 (PyTorch's own counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((1, *denoiser.latent_shape(config.resolution)), device=denoiser.device, dtype=denoiser.dtype)
    cond = denoiser.encode([config.erase[0]]).to(denoiser.device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        denoiser.output(x, torch.tensor([500], device=denoiser.device), cond)
    return float(counter.get_total_flops())


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # the process's peak RSS (KiB on Linux)


def run_speed_bench(shape: str, device: str, steps: int, resolution: int | None, dtype: torch.dtype) -> dict:
    denoiser = build_model(shape, device, dtype)
    torch_device = denoiser.device
    config = EraseConfig(erase=[PROMPTS[shape]], steps=steps, resolution=resolution)
    forward = unet_forward_flops(denoiser, config)

    # each phase is reported as it ends, so that a run cut short by a time limit still tells something
    print(f"model built; one UNet forward {forward / 1e9:.1f} GFLOP", file=sys.stderr)
    baseline_step, mean_stop = esd_style_seconds_per_step(denoiser, config, steps)
    print(f"ESD-style loop: {baseline_step:.4f} s per step", file=sys.stderr)
    if torch_device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(torch_device)
    warm_up = EraseConfig(erase=config.erase, steps=1, trajectories=1, sampler_steps=2, resolution=resolution)
    erase_concept(denoiser, warm_up)
    erasure = erase_concept(denoiser, config)
    engine_step = erasure.seconds["training"] / steps
    engine_erasure = erasure.seconds["sampling"] + engine_step * ERASURE_STEPS
    baseline_erasure = baseline_step * ERASURE_STEPS
    # At the defaults a step is one student forward+backward at batch 2 (the erased and the empty
    # prompt; a backward costs about two forwards): the teacher's outputs come from the cache.
    engine_flops = forward * 2 * 3
    return {
        "device": torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda" else "cpu",
        "model": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "latent": list(denoiser.latent_shape(resolution)),
        "steps_timed": steps,
        "baseline_s_per_step": baseline_step,
        "baseline_mean_sampler_steps": mean_stop,
        "baseline_s_per_erasure": baseline_erasure,
        "engine_s_per_step": engine_step,
        "engine_cache_s": erasure.seconds["sampling"],
        "engine_s_per_erasure": engine_erasure,
        "speedup_per_step": baseline_step / engine_step,
        "speedup": baseline_erasure / engine_erasure,
        "unet_forward_gflop": forward / 1e9,
        "engine_tflops": engine_flops / engine_step / 1e12,
        "peak_mem_gib": peak_memory_gib(torch_device),
    }


def table(row: dict) -> str:
    lines = [
        f"bench-speed on {row['device']}, model {row['model']} ({row['dtype']}), latent {row['latent']}",
        f"{'':28}{'ESD-style':>12}{'engine':>12}{'ratio':>9}",
        f"{'seconds per step':28}{row['baseline_s_per_step']:>12.4f}{row['engine_s_per_step']:>12.4f}"
        f"{row['speedup_per_step']:>8.1f}x",
        f"{f'seconds per {ERASURE_STEPS}-step erasure':28}{row['baseline_s_per_erasure']:>12.1f}"
        f"{row['engine_s_per_erasure']:>12.1f}{row['speedup']:>8.1f}x",
        f"engine: trajectory cache {row['engine_cache_s']:.1f} s, {row['engine_tflops']:.3f} TFLOP/s, "
        f"peak memory {row['peak_mem_gib']:.2f} GiB",
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="erase-concept bench-speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=("tiny", "sd15", "sdxl"), help="default: sd15 on cuda, tiny on cpu")
    parser.add_argument("--steps", type=int, default=20, help="training steps timed in each loop")
    parser.add_argument("--resolution", type=int, help="image size in pixels (default: the model's)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    shape = args.shape or ("sd15" if args.device.startswith("cuda") else "tiny")
    row = run_speed_bench(shape, args.device, args.steps, args.resolution, getattr(torch, args.dtype))
    print(table(row))
    print(json.dumps(row), file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(row, indent=2))
    return 0
