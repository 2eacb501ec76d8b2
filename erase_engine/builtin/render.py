"""Procedural images with captions: a colored shape on a plain background.

Everything is vectorised in torch so that training data costs next to nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLORS = {
    "red": (0.86, 0.12, 0.12),
    "green": (0.12, 0.67, 0.20),
    "blue": (0.12, 0.24, 0.86),
    "yellow": (0.95, 0.86, 0.12),
    "purple": (0.55, 0.16, 0.71),
    "orange": (0.98, 0.55, 0.08),
}
BACKGROUNDS = {"white": (0.96, 0.96, 0.96), "black": (0.06, 0.06, 0.06), "gray": (0.5, 0.5, 0.5)}
IMAGE_SIZE = 32


@dataclass
class Scenes:
    """A batch of scene parameters (all tensors of length B)."""

    shape: torch.Tensor  # index into SHAPES
    color: torch.Tensor  # index into COLORS
    background: torch.Tensor  # index into BACKGROUNDS
    center: torch.Tensor  # [B, 2] in [-1, 1] (x right, y up)
    scale: torch.Tensor  # half-size of the shape, in [-1, 1] units

    def __len__(self) -> int:
        return len(self.shape)

    def __getitem__(self, index) -> Scenes:
        return Scenes(
            self.shape[index], self.color[index], self.background[index], self.center[index], self.scale[index]
        )

    @staticmethod
    def random(n: int, generator: torch.Generator, shape=None, color=None, background=None) -> Scenes:
        """Random scenes; ``shape``/``color``/``background`` (an index) fix that attribute."""

        def pick(fixed, count):
            return torch.full((n,), fixed) if fixed is not None else torch.randint(count, (n,), generator=generator)

        scale = 0.36 + 0.28 * torch.rand(n, generator=generator)
        center = (torch.rand(n, 2, generator=generator) * 2 - 1) * (0.95 - scale)[:, None]
        return Scenes(
            pick(shape, len(SHAPES)), pick(color, len(COLORS)), pick(background, len(BACKGROUNDS)), center, scale
        )


def _star(x: torch.Tensor, y: torch.Tensor, inner: float = 0.45) -> torch.Tensor:
    """Inside a five-pointed star with a point up and straight edges."""
    r = torch.sqrt(x * x + y * y)
    half = math.pi / 5
    phi = torch.remainder(torch.atan2(x, y), 2 * half)  # angle from the nearest outer point
    phi = torch.where(phi > half, 2 * half - phi, phi)
    # edge from the outer point (1, 0) to the inner point (inner cos h, inner sin h), in polar
    p2x, p2y = inner * math.cos(half), inner * math.sin(half)
    nx, ny = p2y, 1 - p2x  # normal of the edge; n . (1, 0) = nx
    edge = nx / (nx * torch.cos(phi) + ny * torch.sin(phi))
    return r < edge


def shape_masks(shape: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Boolean masks [B, H, W]; ``x``, ``y`` are coordinates in the shape's own frame."""
    s = shape[:, None, None]
    ax, ay = x.abs(), y.abs()
    hx, hy = 1.15 * x, 1.15 * y + 0.15
    masks = {
        "circle": x * x + y * y < 1,
        "square": torch.maximum(ax, ay) < 0.82,
        "triangle": (y > -0.72) & (y < 0.98 - 1.79 * ax),
        "star": _star(x, y),
        "heart": (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy**3 < 0,
        "cross": ((ax < 0.3) & (ay < 0.92)) | ((ay < 0.3) & (ax < 0.92)),
    }
    out = torch.zeros_like(x, dtype=torch.bool)
    for index, name in enumerate(SHAPES):
        out = torch.where(s == index, masks[name], out)
    return out


def render(scenes: Scenes, size: int = IMAGE_SIZE, supersample: int = 3) -> torch.Tensor:
    """Images [B, 3, size, size] in [0, 1], anti-aliased by supersampling."""
    fine = size * supersample
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / fine * 2 - 1
    v, u = torch.meshgrid(-coords, coords, indexing="ij")  # v: y up
    x = (u[None] - scenes.center[:, 0, None, None]) / scenes.scale[:, None, None]
    y = (v[None] - scenes.center[:, 1, None, None]) / scenes.scale[:, None, None]
    coverage = shape_masks(scenes.shape, x, y).float()
    coverage = torch.nn.functional.avg_pool2d(coverage[:, None], supersample)  # [B, 1, size, size]
    fg = torch.tensor(list(COLORS.values()))[scenes.color][:, :, None, None]
    bg = torch.tensor(list(BACKGROUNDS.values()))[scenes.background][:, :, None, None]
    return bg + (fg - bg) * coverage


TEMPLATES = (  # (template, weight): full captions most of the time, shorter ones so single words work
    ("a {color} {shape} on a {background} background", 5),
    ("a {color} {shape}", 2),
    ("a {shape}", 1),
    ("{shape}", 1),
    ("a {color} shape", 1),
    ("{color}", 1),
)


def captions(scenes: Scenes, generator: torch.Generator, drop: float = 0.1) -> list[str]:
    """One caption per scene from a random template; ``drop`` of them empty (for CFG)."""
    weights = torch.tensor([w for _, w in TEMPLATES], dtype=torch.float)
    chosen = torch.multinomial(weights, len(scenes), replacement=True, generator=generator)
    dropped = torch.rand(len(scenes), generator=generator) < drop
    names = list(COLORS), list(BACKGROUNDS)
    return [
        ""
        if dropped[i]
        else TEMPLATES[int(chosen[i])][0].format(
            color=names[0][int(scenes.color[i])],
            shape=SHAPES[int(scenes.shape[i])],
            background=names[1][int(scenes.background[i])],
        )
        for i in range(len(scenes))
    ]


def example_prompts() -> tuple[str, ...]:
    """The model card's sentences (``Denoiser.example_prompts``): each color in a short caption,
    alone and on each background, and each shape's word, as its captions ask for it alone.  The
    model ties its colors to the words around them (its background words carry colors too), so a
    color is erased in these sentences as well, and a shape from its word; each erasure preserves
    the sentences of the same form that name another color or shape (docs/method.md, section 9)."""
    forms = ["a {} shape", *(f"a {{}} shape on a {background} background" for background in BACKGROUNDS)]
    return (*(form.format(color) for color in COLORS for form in forms), *SHAPES)


def prompt(shape: str, color: str, background: str) -> str:
    return f"a {color} {shape} on a {background} background"
