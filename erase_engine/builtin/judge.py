"""The judge: a small classifier (shape and color heads) for the built-in model's
images, and a foreground mask for layout comparisons.

    python -m erase_engine.builtin.judge   # trains it on fresh renders, prints held-out accuracy
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import JUDGE_WEIGHTS
from .render import COLORS, SHAPES, Scenes, render

HEADS = ("shape", "color")  # what the judge's outputs are, in order


class Judge(nn.Module):
    """Images [B, 3, 32, 32] in [0, 1] -> (shape logits [B, 6], color logits [B, 6])."""

    def __init__(self, width: int = 48):
        super().__init__()
        layers, channels = [], 3
        for out, stride in ((width, 1), (width, 2), (2 * width, 2), (2 * width, 2)):
            layers += [nn.Conv2d(channels, out, 3, stride, 1), nn.GroupNorm(8, out), nn.SiLU()]
            channels = out
        self.features = nn.Sequential(*layers)
        self.shape_head = nn.Linear(channels, len(SHAPES))
        self.color_head = nn.Linear(channels, len(COLORS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images * 2 - 1).mean(dim=(2, 3))
        return self.shape_head(features), self.color_head(features)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape, color = self(images.float())
        return shape.argmax(1), color.argmax(1)


def load_judge(path: Path = JUDGE_WEIGHTS) -> Judge:
    from safetensors.torch import load_file

    judge = Judge()
    judge.load_state_dict(load_file(path))
    return judge.eval().requires_grad_(False)


def foreground_mask(images: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """[B, H, W] booleans: pixels whose color is far from the background, taken as
    the median color of the image's border."""
    return (images - border_color(images)[:, :, None, None]).abs().amax(dim=1) > threshold


def border_color(images: torch.Tensor) -> torch.Tensor:
    """[B, 3] the median color of each image's border: its background."""
    border = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, :, 0], images[:, :, :, -1]], dim=2)
    return border.median(dim=2).values


def mask_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU per image of two mask batches (1 where both are empty)."""
    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def _boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bounding boxes [B, 4] (top, left, bottom, right) of masks [B, H, W]; empty: no area."""
    height, width = masks.shape[1:]
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    r, c = torch.arange(height), torch.arange(width)
    top, bottom = torch.where(rows, r, height).amin(1), torch.where(rows, r + 1, 0).amax(1)
    left, right = torch.where(cols, c, width).amin(1), torch.where(cols, c + 1, 0).amax(1)
    return torch.stack([top, left, bottom, right], dim=1)


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return ((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)).float()


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU per image of the bounding boxes of two mask batches: where the object is and
    how large, whatever its outline (1 where both are empty)."""
    box_a, box_b = _boxes(a), _boxes(b)
    inter = _area(torch.cat([torch.maximum(box_a[:, :2], box_b[:, :2]), torch.minimum(box_a[:, 2:], box_b[:, 2:])], 1))
    union = _area(box_a) + _area(box_b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def centroids(masks: torch.Tensor) -> torch.Tensor:
    """[B, 2] (row, column) centre of mass of masks [B, H, W], in pixels (empty: NaN)."""
    height, width = masks.shape[1:]
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    weights = masks.flatten(1).float()
    count = weights.sum(1)
    centre = torch.stack([weights @ rows.flatten().float(), weights @ cols.flatten().float()], dim=1) / count[:, None]
    return torch.where(count[:, None] > 0, centre, torch.nan)


# layout_kept's tolerances, on 32-px images.  A perfect replacement (the same scene rendered
# with another shape) is within them 99.8 % of the time; the same prompt drawn again in
# another place and size, 7.4 % (tests/test_builtin.py prints both, on 512 renders).
CENTROID_TOLERANCE = 3.0  # pixels
BOX_AREA_TOLERANCE = 1.65  # the larger box area over the smaller
BACKGROUND_TOLERANCE = 0.15  # largest channel difference of the border's median color


def layout_kept(judge: Judge, before: torch.Tensor, after: torch.Tensor, erased_kind: str) -> torch.Tensor:
    """[B] booleans: the pair (before[i], after[i]) shows the same picture apart from the
    erased attribute: the object is where it was (centroid), as large (box area), of the
    same color (when a shape is erased) or shape (when a color is), on the same background.
    An object that vanished, or appeared, does not keep the layout."""
    masks_before, masks_after = foreground_mask(before), foreground_mask(after)
    moved = (centroids(masks_before) - centroids(masks_after)).norm(dim=1)
    area_before, area_after = _area(_boxes(masks_before)), _area(_boxes(masks_after))
    resized = torch.maximum(area_before, area_after) / torch.minimum(area_before, area_after).clamp(min=1)
    empty_before, empty_after = ~masks_before.flatten(1).any(1), ~masks_after.flatten(1).any(1)
    placed = (moved <= CENTROID_TOLERANCE) & (resized <= BOX_AREA_TOLERANCE) | (empty_before & empty_after)
    background = (border_color(before) - border_color(after)).abs().amax(1) <= BACKGROUND_TOLERANCE
    kept = 1 - HEADS.index(erased_kind)  # the other head: what must not change
    same = judge.classify(before)[kept] == judge.classify(after)[kept]
    return placed & background & same


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Make renders look like a small diffusion model's samples: blur, noise, color shifts."""
    n = len(images)
    blur = torch.rand(n, generator=generator) < 0.5
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = torch.where(blur[:, None, None, None], blurred, images)
    shift = (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.12
    noise = torch.randn(images.shape, generator=generator) * 0.04 * torch.rand(n, 1, 1, 1, generator=generator)
    return (images + shift + noise).clamp(0, 1)


def accuracy(judge: Judge, count: int, seed: int) -> dict[str, float]:
    """Held-out accuracy on fresh renders (clean and degraded) from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    scenes = Scenes.random(count, generator)
    images = render(scenes)
    result = {}
    for name, batch in (("clean", images), ("degraded", degrade(images, generator))):
        shape, color = judge.classify(batch)
        result[f"shape_{name}"] = float((shape == scenes.shape).float().mean())
        result[f"color_{name}"] = float((color == scenes.color).float().mean())
    return result


def train(steps: int, batch: int, seed: int) -> Judge:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    started = time.perf_counter()
    for step in range(steps):
        scenes = Scenes.random(batch, generator)
        shape, color = judge(degrade(render(scenes), generator))
        loss = F.cross_entropy(shape, scenes.shape) + F.cross_entropy(color, scenes.color)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            print(f"[{time.perf_counter() - started:5.0f}s] judge {step}/{steps} loss {loss.item():.4f}", flush=True)
    return judge.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=JUDGE_WEIGHTS)
    args = parser.parse_args(argv)
    judge = train(args.steps, args.batch, args.seed)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(args.out))
    print({k: round(v, 4) for k, v in accuracy(judge, 4096, seed=10_000 + args.seed).items()})


if __name__ == "__main__":
    main()
