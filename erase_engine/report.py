"""The ``--report`` folder: a before/after grid (same seeds), the training curves and a JSON summary."""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from .attack import Attack
from .deltas import WeightDeltas
from .denoiser import Denoiser
from .sampling import generate
from .trainer import Erasure

TILE = 128  # the smallest on-screen size of a sample in the grid, in pixels
LABEL_WIDTH = 200
HEADER = 28
SMOOTHING = 0.9  # the loss curve's exponential moving average


def before_after_images(
    erasure: Erasure, prompts: list[str], seeds: list[int], steps: int = 25, cfg_scale: float = 7.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [P, S, 3, H, W] of the original and the erased model, same prompts and seeds."""
    every_prompt = [p for p in prompts for _ in seeds]
    every_seed = seeds * len(prompts)
    images = [
        generate(erasure.denoiser, every_prompt, every_seed, steps, cfg_scale, deltas, erasure.config.resolution)
        for deltas in (None, erasure.deltas)
    ]
    return tuple(i.reshape(len(prompts), len(seeds), *i.shape[1:]) for i in images)


def to_pil(image: torch.Tensor) -> Image.Image:
    """An image [3, H, W] in [0, 1] as a PIL image."""
    return Image.fromarray((image.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy())


def figure_image(figure: Figure) -> Image.Image:
    """A matplotlib figure rendered (Agg, no global pyplot state) as an RGB PIL image."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def grid_image(
    prompts: list[str], before: torch.Tensor, after: torch.Tensor, seeds: list[int] | None = None
) -> Image.Image:
    """One row pair per prompt, 'original' above 'erased', a column per seed."""
    return versions_grid(prompts, {"original": before, "erased": after}, seeds)


def versions_grid(prompts: list[str], versions: dict[str, torch.Tensor], seeds: list[int] | None = None) -> Image.Image:
    """A row per version (tensors [P, N, C, H, W]) for each prompt, a column per seed; small
    samples are scaled up by a whole factor without smoothing, and each prompt is written out whole."""
    first = next(iter(versions.values()))
    rows, columns = len(versions) * len(prompts), first.shape[1]
    scale = max(1, -(-TILE // first.shape[-1]))
    tile_h, tile_w = first.shape[-2] * scale, first.shape[-1] * scale
    width, height = LABEL_WIDTH + columns * tile_w, HEADER + rows * tile_h
    figure = Figure(figsize=(width / 100, height / 100), dpi=100, facecolor="white")
    for c in range(columns):
        label = f"seed {seeds[c]}" if seeds else f"sample {c + 1}"
        figure.text(
            (LABEL_WIDTH + (c + 0.5) * tile_w) / width, 1 - HEADER / 2 / height, label, ha="center", va="center"
        )
    for p, prompt in enumerate(prompts):
        for r, (label, images) in enumerate(versions.items()):
            top = HEADER + (len(versions) * p + r) * tile_h
            text = (textwrap.fill(prompt or "(empty prompt)", 24) + "\n") if r == 0 else ""
            figure.text(
                8 / width, 1 - (top + tile_h / 2) / height, f"{text}{label}", va="center", fontsize=10,
                fontweight="bold" if r else "normal",
            )  # fmt: skip
            for c in range(columns):
                box = ((LABEL_WIDTH + c * tile_w) / width, 1 - (top + tile_h) / height, tile_w / width, tile_h / height)
                axes = figure.add_axes(box)
                axes.imshow(images[p, c].permute(1, 2, 0).clamp(0, 1).float().numpy(), interpolation="nearest")
                axes.set_axis_off()
    return figure_image(figure)


def smoothed(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """An exponential moving average, debiased at the start (as TensorBoard draws it)."""
    out, average = [], 0.0
    for i, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**i))
    return out


def training_plot(erasure: Erasure) -> Image.Image:
    """Two panels against training steps: the loss (each step, faint, and smoothed) and the
    held-out score (remaining, the drifts, and the threshold auto steps stop at)."""
    figure = Figure(figsize=(9, 3.6), dpi=100, facecolor="white", layout="constrained")
    loss_axes, score_axes = figure.subplots(1, 2)
    steps = list(range(1, len(erasure.losses) + 1))
    for name, color in (("loss", "black"), ("erase", "tab:red"), ("uncond", "tab:blue"), ("preserve", "tab:green")):
        values = [row[name] for row in erasure.losses if name in row]
        if len(values) == len(steps) and values:
            loss_axes.plot(steps, values, color=color, alpha=0.2, linewidth=0.8)
            loss_axes.plot(steps, smoothed(values), color=color, linewidth=1.6, label=name)
    loss_axes.set(xlabel="training step", ylabel="loss (smoothed)", yscale="log", title="Training loss")
    loss_axes.legend(fontsize=8)
    loss_axes.grid(alpha=0.3)
    at = [step for step, _ in erasure.scores]
    score_axes.plot(
        at, [s.remaining for _, s in erasure.scores], "o-", color="tab:red", label="remaining", markersize=3
    )
    score_axes.plot(at, [s.uncond_drift for _, s in erasure.scores], color="tab:blue", label="uncond drift")
    if erasure.score.preserve_drift:
        worst = [s.worst_preserve_drift for _, s in erasure.scores]
        score_axes.plot(at, worst, color="tab:green", label="preserve drift (worst)")
    if erasure.config.steps is None:
        score_axes.axhline(
            erasure.config.stop_threshold, color="gray", linestyle="--", linewidth=1, label="auto stops below"
        )
    score_axes.set(xlabel="training step", ylabel="held-out score", ylim=(0, 1.05), title="Erasure score")
    score_axes.legend(fontsize=8)
    score_axes.grid(alpha=0.3)
    return figure_image(figure)


def write_report(
    folder: str | Path,
    erasure: Erasure,
    seeds: list[int] | None = None,
    outputs: dict[str, str] | None = None,
) -> Path:
    """grid.png, training.png and summary.json in ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = seeds or [erasure.config.seed + i for i in range(4)]
    prompts = list(dict.fromkeys(erasure.config.erase + erasure.config.preserve))
    before, after = before_after_images(erasure, prompts, seeds)
    grid_image(prompts, before, after, seeds).save(folder / "grid.png")
    training_plot(erasure).save(folder / "training.png")
    drift = (after - before).abs().mean(dim=(1, 2, 3, 4))
    summary = {
        "base_model": erasure.denoiser.info.name,
        "architecture": erasure.denoiser.info.architecture,
        "config": erasure.config.as_dict(),
        "objective": vars(erasure.objective),
        "seconds": erasure.seconds,
        "steps_run": erasure.scores[-1][0],
        "stopped": erasure.stopped,
        "score": erasure.score.as_dict(),
        "scores": [{"step": step, **score.as_dict()} for step, score in erasure.scores],
        "first_losses": erasure.losses[0],
        "final_losses": erasure.losses[-1],
        "pixel_change": {p: float(d) for p, d in zip(prompts, drift, strict=True)},
        "seeds": seeds,
        "outputs": outputs or {},
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return folder


def attack_grid(
    denoiser: Denoiser,
    deltas: WeightDeltas,
    attack: Attack,
    seeds: list[int],
    steps: int = 25,
    cfg_scale: float = 7.5,
) -> Image.Image:
    """For each of the attack's contexts: the original model asked for the concept, the erased
    model asked for it, the erased model asked with the embedding (same seeds)."""
    concepts, attacks = zip(*attack.config.prompt_pairs(), strict=True)
    asked = [p for p in concepts for _ in seeds]
    every_seed = seeds * len(concepts)
    resolution = attack.config.resolution
    rows = {
        "original": generate(denoiser, asked, every_seed, steps, cfg_scale, None, resolution),
        "erased": generate(denoiser, asked, every_seed, steps, cfg_scale, deltas, resolution),
        "erased + attack": generate(
            denoiser, attack.condition(denoiser, [p for p in attacks for _ in seeds]), every_seed, steps, cfg_scale,
            deltas, resolution,
        ),
    }  # fmt: skip
    shaped = {name: images.reshape(len(concepts), len(seeds), *images.shape[1:]) for name, images in rows.items()}
    return versions_grid(list(concepts), shaped, seeds)


def write_attack_report(
    folder: str | Path,
    denoiser: Denoiser,
    deltas: WeightDeltas,
    attack: Attack,
    extra: dict | None = None,
    seeds: list[int] | None = None,
    steps: int = 25,
    cfg_scale: float = 7.5,
) -> Path:
    """attack.png (``attack_grid``) and summary.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = attack.config
    seeds = seeds or [config.seed + i for i in range(4)]
    attack_grid(denoiser, deltas, attack, seeds, steps, cfg_scale).save(folder / "attack.png")
    summary = {
        "base_model": denoiser.info.name,
        "architecture": denoiser.info.architecture,
        "config": asdict(config),
        "recovered": attack.recovered,
        "seconds": attack.seconds,
        "first_loss": attack.losses[0],
        "final_loss": attack.losses[-1],
        "seeds": seeds,
        **(extra or {}),
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return folder
