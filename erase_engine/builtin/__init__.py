"""The built-in demo model (``builtin:shapes``): a small text-to-image diffusion model
trained on rendered shapes, and the judge that measures what an erasure did."""

from pathlib import Path

BUILTIN_MODEL = "builtin:shapes"  # what ``load_denoiser`` and every front end call it
SHAPES_WEIGHTS = Path(__file__).with_name("shapes.safetensors")
JUDGE_WEIGHTS = Path(__file__).with_name("judge.safetensors")
