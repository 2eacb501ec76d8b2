"""Purification (the paper's Figure 1b): DDIM-invert a real image with the original
model, then regenerate it with the erased one.  The layout comes back; the erased
concept does not."""

from __future__ import annotations

import torch

from .deltas import WeightDeltas
from .denoiser import Denoiser
from .report import to_pil
from .sampling import ddim_invert, ddim_sample


@torch.no_grad()
def purify(
    denoiser: Denoiser,
    images: torch.Tensor,
    prompts: list[str],
    deltas: WeightDeltas,
    steps: int = 50,
    strength: float = 0.7,
    cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] -> purified images, same size."""
    cond = denoiser.encode(prompts).to(denoiser.device)
    latents = denoiser.encode_images(images.to(denoiser.device)).to(denoiser.dtype)
    noised, start = ddim_invert(denoiser, latents, cond, steps, strength, cfg_scale)
    purified, _, _ = ddim_sample(denoiser, cond, noised, steps, cfg_scale, deltas, start=start)
    return denoiser.decode(purified)


def purify_picture(
    denoiser: Denoiser, picture, prompt: str, deltas: WeightDeltas, steps: int, strength: float, size: int | None = None
):
    """A PIL image of any size and mode in, the purified PIL image out at the same size
    (worked on as RGB at ``size`` pixels square, the model's resolution by default)."""
    import numpy as np
    from PIL import Image

    size = size or denoiser.info.resolution
    rgb = np.array(picture.convert("RGB").resize((size, size), Image.BICUBIC))
    pixels = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    result = purify(denoiser, pixels, [prompt], deltas, steps, strength)[0]
    return to_pil(result.cpu()).resize(picture.size, Image.BICUBIC)
