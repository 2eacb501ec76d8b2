"""The ``--report`` folder: a before/after grid (same seeds), a loss curve and a JSON summary."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .sampling import generate
from .trainer import Erasure

LABEL_WIDTH = 160


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


def grid_image(prompts: list[str], before: torch.Tensor, after: torch.Tensor) -> Image.Image:
    """One row pair per prompt: 'original' above 'erased', a column per seed."""
    size = max(before.shape[-1], 64)
    seeds = before.shape[1]
    grid = Image.new("RGB", (LABEL_WIDTH + seeds * size, 2 * len(prompts) * size), "white")
    draw = ImageDraw.Draw(grid)
    for p, prompt in enumerate(prompts):
        for row, (label, images) in enumerate((("original", before), ("erased", after))):
            top = (2 * p + row) * size
            draw.text((4, top + 4), f"{prompt[:22]}\n{label}", fill="black")
            for s in range(seeds):
                tile = to_pil(images[p, s]).resize((size, size), Image.NEAREST)
                grid.paste(tile, (LABEL_WIDTH + s * size, top))
    return grid


def loss_plot(losses: list[dict[str, float]], width: int = 640, height: int = 360) -> Image.Image:
    """Total and erase loss per step, linear axes."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 20, width - 20, height - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    series = {"loss": "black", "erase": "red", "uncond": "blue", "preserve": "green"}
    values = [v for row in losses for k, v in row.items() if k in series]
    high = max(values, default=1.0) or 1.0
    steps = max(len(losses) - 1, 1)
    for name, color in series.items():
        points = [
            (left + (right - left) * i / steps, bottom - (bottom - top) * row[name] / high)
            for i, row in enumerate(losses)
            if name in row
        ]
        if len(points) > 1:
            draw.line(points, fill=color, width=2)
            draw.text((right - 70, top + 5 + 12 * list(series).index(name)), name, fill=color)
    draw.text((4, top), f"{high:.3g}", fill="black")
    draw.text((4, bottom - 10), "0", fill="black")
    draw.text(((left + right) // 2 - 20, bottom + 10), f"step (1-{len(losses)})", fill="black")
    return image


def write_report(
    folder: str | Path,
    erasure: Erasure,
    seeds: list[int] | None = None,
    outputs: dict[str, str] | None = None,
) -> Path:
    """grid.png, loss.png and summary.json in ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    seeds = seeds or [erasure.config.seed + i for i in range(4)]
    prompts = list(dict.fromkeys(erasure.config.erase + erasure.config.preserve))
    before, after = before_after_images(erasure, prompts, seeds)
    grid_image(prompts, before, after).save(folder / "grid.png")
    loss_plot(erasure.losses).save(folder / "loss.png")
    drift = (after - before).abs().mean(dim=(1, 2, 3, 4))
    summary = {
        "base_model": erasure.denoiser.info.name,
        "architecture": erasure.denoiser.info.architecture,
        "config": erasure.config.as_dict(),
        "objective": vars(erasure.objective),
        "seconds": erasure.seconds,
        "first_losses": erasure.losses[0],
        "final_losses": erasure.losses[-1],
        "pixel_change": {p: float(d) for p, d in zip(prompts, drift, strict=True)},
        "seeds": seeds,
        "outputs": outputs or {},
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    return folder
