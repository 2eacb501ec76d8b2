"""A real, headless ComfyUI server with this pack linked in, driven over its HTTP API.

Needs a ComfyUI checkout: ``COMFYUI_DIR=/path/to/ComfyUI`` (and ``COMFYUI_PYTHON`` if ComfyUI
runs in another environment).  The examples in ``examples/api`` run as shipped, shrunk to an
8x8 latent and a few steps so that a full-size model (random weights) finishes in minutes on a CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from . import ROOT
from .models import MAKE_CHECKPOINT
from .servers import free_port, running

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
needs_comfyui = [
    pytest.mark.comfyui,
    pytest.mark.skipif(
        not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real-server test (README: Developing)"
    ),
]
CHECKPOINT = "random-sd15.safetensors"
SMALL = {  # class_type -> inputs that make the shipped examples fast on a CPU
    "EmptyLatentImage": {"width": 64, "height": 64},
    "KSampler": {"steps": 3},
    "AllButOneEraseConcept": {"steps": 3, "trajectories": 1, "sampler_steps": 3, "resolution": 64},
    "AllButOnePurifyImage": {"steps": 3},
    "AllButOneAttackErasure": {"steps": 3},
    "CheckpointLoaderSimple": {"ckpt_name": CHECKPOINT},
    "LoadImage": {"image": "example.png"},
}


class Server:
    def __init__(self, base: Path, port: int, log: Path):
        self.base, self.url, self.log = base, f"http://127.0.0.1:{port}", log

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return json.loads(response.read())

    def post(self, path: str, body: dict | None = None):
        data = json.dumps(body or {}).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read()
        return json.loads(text) if text else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def queue(self, workflow: dict) -> str:
        return self.post("/prompt", {"prompt": workflow, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry["status"].get("completed") is not None and entry["status"]["status_str"] != "":
                return entry
            time.sleep(1)
        raise TimeoutError(f"prompt {prompt_id} did not finish; server log:\n{self.log_text()[-3000:]}")

    def run(self, workflow: dict) -> dict:
        entry = self.wait(self.queue(workflow))
        assert entry["status"]["status_str"] == "success", (entry["status"], self.log_text()[-4000:])
        return entry["outputs"]

    def listed(self, node: str, field: str) -> list[str]:
        return self.get(f"/object_info/{node}")[node]["input"]["required"][field][0]


def example(name: str, **overrides: dict) -> dict:
    workflow = json.loads((ROOT / "examples" / "api" / f"{name}.json").read_text())
    for node in workflow.values():
        node["inputs"].update(SMALL.get(node["class_type"], {}))
        node["inputs"].update(overrides.get(node["class_type"], {}))
    return workflow


def start_server(base: Path, architecture: str, checkpoint: str, *options: str):
    """ComfyUI on the CPU in ``base`` (models, input, output), the pack linked in, one random checkpoint."""
    for folder in ("models/checkpoints", "models/loras", "input", "output", "custom_nodes", "user"):
        (base / folder).mkdir(parents=True)
    (base / "custom_nodes" / "concept-erasing").symlink_to(ROOT, target_is_directory=True)
    # Built in a child process so that its memory (13 GB for SDXL in fp32) is back before ComfyUI starts.
    subprocess.run(
        [sys.executable, "-c", MAKE_CHECKPOINT, architecture, str(base / "models/checkpoints" / checkpoint)],
        check=True,
        cwd=ROOT,
    )
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(base / "input" / "example.png")

    port, log = free_port(), base / "server.log"
    command = [
        os.environ.get("COMFYUI_PYTHON", sys.executable),
        "main.py",
        "--cpu",
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        str(base),
        "--disable-auto-launch",
        "--database-url",
        "sqlite:///:memory:",
        *options,
    ]
    server = Server(base, port, log)

    def ready() -> bool:
        try:
            server.get("/object_info/AllButOneEraseConcept")
            return True
        except OSError:
            return False

    with running("ComfyUI with the pack", command, COMFYUI_DIR, log, ready):
        yield server


def image_array(server: Server, outputs: dict, node: str) -> np.ndarray:
    item = outputs[node]["images"][0]
    folder = server.base / ("output" if item["type"] == "output" else "temp")
    return np.asarray(Image.open(folder / item["subfolder"] / item["filename"]).convert("RGB"), dtype=np.int16)
