"""What the tests share: the repository's root, tiny models built in code, host servers,
the browser, and reference predictions.  Test modules import from here, never from each other."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The fewest steps that still run every part of an erasure (cache, training, export).
FAST = ["--steps", "2", "--trajectories", "1", "--sampler-steps", "2", "--lr", "1e-3"]
