"""The diffusers adapter's predictions on a checkpoint file, made in a child process (a
host's copy and ours of a full-size SDXL do not fit in 24 GiB together): what a host
adapter must reproduce on the same file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from . import ROOT

PROMPTS = ["a photo of a cat", ""]
CHILD = """
import sys, torch
from pathlib import Path
from erase_engine.hosts.diffusers_loading import load_single_file
checkpoint, prediction, inputs, out = sys.argv[1:]
ours = load_single_file(Path(checkpoint), prediction)
given = torch.load(inputs)
cond = ours.encode(given["prompts"])
with torch.no_grad():
    output = ours.output(given["x"], given["t"], cond)
layers = sorted(layer.ldm_name for layer in ours.unet_layers())
schedule = ours.schedule.alphas_cumprod
torch.save({"alphas_cumprod": schedule, "layers": layers, "context": cond.context, "output": output}, out)
"""


def sample_input(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)), torch.tensor([900, 25])


def reference_outputs(checkpoint: Path, prediction: str, folder: Path, python: str = sys.executable) -> dict:
    """Schedule, layer names, context of ``PROMPTS`` and the prediction at ``sample_input(1)``."""
    x, t = sample_input(1)
    torch.save({"prompts": PROMPTS, "x": x, "t": t}, folder / "inputs.pt")
    arguments = [str(checkpoint), prediction, str(folder / "inputs.pt"), str(folder / "reference.pt")]
    subprocess.run([python, "-c", CHILD, *arguments], check=True, cwd=ROOT)
    return torch.load(folder / "reference.pt")


def assert_matches_reference(host, reference: dict) -> None:
    """A host adapter against ``reference_outputs`` on the same file: schedule, layers,
    conditioning and prediction."""
    torch.testing.assert_close(host.schedule.alphas_cumprod, reference["alphas_cumprod"], rtol=1e-5, atol=1e-7)
    assert sorted(layer.ldm_name for layer in host.unet_layers()) == reference["layers"]
    cond = host.encode(PROMPTS)
    torch.testing.assert_close(cond.context, reference["context"], rtol=1e-4, atol=1e-4)
    x, t = sample_input(1)
    with torch.no_grad():
        torch.testing.assert_close(host.output(x, t, cond), reference["output"], rtol=1e-4, atol=1e-4)
    assert reference["output"].abs().max() > 0.1  # a real prediction, not a zero output
