"""The Concept Erasing tab in a real Stable Diffusion WebUI (A1111 and Forge) server,
headless on the CPU, driven in Chromium: erase from the loaded (full-size, random) SD1.5
model, save a LoRA and a checkpoint, and check through the host's own API that

- the loaded model still renders the same picture at the same seed;
- the LoRA and the checkpoint are listed at once, with no refresh or restart;
- ``<lora:name:1>`` and the saved checkpoint render the same erased picture;
- the host's Interrupt stops an erasure with nothing written;
- the attack section attacks the erasure and its embedding's word works in the next prompt;
- after a checkpoint switch the attack refuses the erasure made on the other checkpoint.

Needs ``A1111_DIR`` and/or ``FORGE_DIR`` (checkouts with their ``repositories/``;
README, "Developing"); ``A1111_PYTHON`` / ``FORGE_PYTHON`` are their interpreters.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from support import ROOT
from support.browser import chromium, fill_text, needs_chromium, start_attack, status, wait_for_status
from support.clip_l import save_clip_l
from support.models import MAKE_CHECKPOINT
from support.servers import free_port, running

pytestmark = needs_chromium
CHECKPOINT = "random-sd15.safetensors"
TINY = {"steps": 2, "trajectories": 1, "sampler_steps": 2, "resolution": 64}  # minutes on a CPU, not hours
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "NO_PROXY": "*"}
CPU = not torch.cuda.is_available()
# Each host's own flags for a CPU run (A1111 runs in fp32 only with all three).
HOSTS = {
    "a1111": ["--no-half", "--precision", "full", "--use-cpu", "all"] if CPU else [],
    "forge": ["--always-cpu", "--do-not-download-clip"] if CPU else ["--do-not-download-clip"],
}


def host_param(name: str):
    variable = f"{name.upper()}_DIR"
    reason = f"set {variable} to a {name} checkout (README: Developing)"
    return pytest.param(name, marks=pytest.mark.skipif(not os.environ.get(variable), reason=reason))


class WebUI:
    def __init__(self, name: str, base: Path, port: int):
        self.name, self.base, self.url = name, base, f"http://127.0.0.1:{port}"
        self.log = base / "server.log"

    def call(self, path: str, body: dict | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.load(response)

    def txt2img(self, prompt: str, checkpoint: str = CHECKPOINT) -> np.ndarray:
        body = {
            "prompt": prompt,
            "seed": 7,
            "steps": 3,
            "width": 64,
            "height": 64,
            "cfg_scale": 3,
            "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": checkpoint},
        }
        image = self.call("/sdapi/v1/txt2img", body)["images"][0]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module", params=[host_param("a1111"), host_param("forge")])
def webui(request, tmp_path_factory):
    name = request.param
    base = tmp_path_factory.mktemp(name)
    for folder in ("models/Stable-diffusion", "models/Lora", "extensions"):
        (base / folder).mkdir(parents=True)
    (base / "extensions" / "concept-erasing").symlink_to(ROOT, target_is_directory=True)
    checkpoint = base / "models/Stable-diffusion" / CHECKPOINT
    subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, "sd1", str(checkpoint)], check=True, cwd=ROOT)
    # A1111 builds SD1's text encoder from openai/clip-vit-large-patch14's config, by name: an offline cache
    snapshot = base / "hf/hub/models--openai--clip-vit-large-patch14/snapshots" / ("0" * 40)
    save_clip_l(snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs/main").write_text("0" * 40)

    port = free_port()
    command = [
        os.environ.get(f"{name.upper()}_PYTHON", sys.executable),
        "launch.py",
        "--skip-prepare-environment",
        "--skip-install",
        "--skip-python-version-check",
        "--skip-torch-cuda-test",
        "--skip-version-check",
        "--no-download-sd-model",
        "--data-dir",
        str(base),
        "--ckpt-dir",
        str(base / "models/Stable-diffusion"),
        "--lora-dir",
        str(base / "models/Lora"),
        "--api",
        "--port",
        str(port),
        *HOSTS[name],
    ]
    server = WebUI(name, base, port)

    def ready() -> bool:  # the API routes come last
        return "Startup time" in server.log.read_text()

    env = {**os.environ, **OFFLINE, "HF_HOME": str(base / "hf")}
    with running(name, command, os.environ[f"{name.upper()}_DIR"], server.log, ready, env=env):
        yield server


@pytest.fixture
def tab(webui):
    """The Concept Erasing tab open in the host's page, with the tiny settings filled in."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1200})
        page.goto(webui.url, timeout=120_000)
        page.locator(".tab-nav button", has_text="Concept Erasing").click(timeout=120_000)  # gradio 3 and 4
        fill_text(page, "erase", "a photo of a cat")
        page.locator("#ce_preserve textarea").first.fill("a dog")
        page.locator("#ce_advanced button, #ce_advanced .label-wrap").first.click()  # open "Advanced"
        for name, value in TINY.items():
            number = page.locator(f"#ce_{name} input[type=number]")
            number.fill(str(value))
            number.press("Tab")
        yield page


def test_erase_in_the_tab_then_use_the_lora_and_checkpoint(webui, tab, tmp_path):
    base_before = webui.txt2img("a photo of a cat")

    fill_text(tab, "name", "no-cat")
    tab.locator("#ce_want_checkpoint input").check()
    tab.locator("#ce_start").click()
    wait_for_status(tab, "step ", 600)
    assert "Erasing 'a photo of a cat'" in status(tab)
    progress = webui.call("/sdapi/v1/progress?skip_current_image=true")["state"]
    assert progress["job"] == "concept_erasing" and progress["sampling_steps"] == TINY["steps"]
    wait_for_status(tab, "Done", 900)
    assert tab.locator("#ce_grid img").count() == 1
    tab.screenshot(path=tmp_path / f"{webui.name}-tab.png", full_page=True)
    lora = webui.base / "models/Lora/no-cat.safetensors"
    assert lora.is_file() and (webui.base / "models/Stable-diffusion/no-cat.safetensors").is_file()

    # Listed at once: the tab refreshed the host's lists itself.
    assert "no-cat" in [entry["name"] for entry in webui.call("/sdapi/v1/loras")]
    assert "no-cat.safetensors" in [entry["title"].split(" ")[0] for entry in webui.call("/sdapi/v1/sd-models")]

    # The loaded model is untouched; the LoRA and the checkpoint both erase, and agree.
    np.testing.assert_array_equal(webui.txt2img("a photo of a cat"), base_before)
    log_before = len(webui.log.read_text())
    with_lora = webui.txt2img("a photo of a cat <lora:no-cat:1>")
    log = webui.log.read_text()[log_before:]
    if webui.name == "forge":  # Forge reports what it loaded; A1111 only logs failures
        assert "skipped 0 keys" in log and "unmatched" not in log and "mismatch" not in log.lower()
    assert np.abs(with_lora - base_before).max() > 0
    erased_checkpoint = webui.txt2img("a photo of a cat", checkpoint="no-cat.safetensors")
    assert np.abs(with_lora - erased_checkpoint).max() <= 2
    np.testing.assert_array_equal(webui.txt2img("a photo of a cat"), base_before)  # back on the original

    # After a generation with the LoRA (A1111 leaves it merged in the weights), the same erasure
    # again starts from the clean model: the same LoRA, tensor for tensor.
    webui.txt2img("a photo of a cat <lora:no-cat:1>")
    fill_text(tab, "name", "again")
    tab.locator("#ce_want_checkpoint input").uncheck()
    tab.locator("#ce_start").click()
    wait_for_status(tab, "again.safetensors", 900)  # the status names what it saved
    first, again = load_file(lora), load_file(webui.base / "models/Lora/again.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)

    attack_the_erasure_and_use_the_word(webui, tab)


def attack_the_erasure_and_use_the_word(webui, tab) -> None:
    """The attack section attacks the last erasure and saves the embedding in the host's
    embeddings folder, where the prompt word reads it at once (no restart, no refresh)."""
    word_before = webui.txt2img("catback")  # not an embedding yet: the word's own tokens
    start_attack(tab, 5, "catback")
    wait_for_status(tab, "Done", 900, "ce_attack_status")
    assert "recovered" in status(tab, "ce_attack_status") and tab.locator("#ce_attack_grid img").count() == 1
    with safe_open(webui.base / "embeddings/catback.safetensors", "pt") as f:
        assert json.loads(f.metadata()["attack.config"])["concept"] == "a photo of a cat"
        assert list(f.keys()) == ["emb_params"]
    log_before = len(webui.log.read_text())
    assert np.abs(webui.txt2img("catback") - word_before).max() > 0
    log = webui.log.read_text()[log_before:]  # the host's own textual inversion read the word
    if webui.name == "forge":
        assert "Used Embedding [catback]" in log
    else:  # A1111 rescans its embeddings folder before a generation (and logs the list only if asked to)
        assert "catback" in webui.call("/sdapi/v1/embeddings")["loaded"]

    # A checkpoint switch (A1111 loads the new weights into the same model) retires the erasure:
    # the attack asks for a new one instead of running on the other checkpoint's weights.
    webui.txt2img("a photo of a cat", checkpoint="no-cat.safetensors")
    fill_text(tab, "attack_name", "after-switch")  # the section is still open
    tab.click("#ce_attack")
    wait_for_status(tab, "loaded another model", 120, "ce_attack_status")
    assert not (webui.base / "embeddings/after-switch.safetensors").exists()


def test_the_hosts_interrupt_stops_the_erasure_and_writes_nothing(webui, tab):
    folders = [webui.base / "models/Lora", webui.base / "models/Stable-diffusion"]
    before = [sorted(folder.iterdir()) for folder in folders]
    fill_text(tab, "name", "interrupted")
    tab.locator("#ce_steps input[type=number]").fill("50")
    tab.locator("#ce_steps input[type=number]").press("Tab")
    tab.locator("#ce_start").click()
    wait_for_status(tab, "step ", 600)
    webui.call("/sdapi/v1/interrupt", {})  # shared.state.interrupt(), as the Interrupt button
    wait_for_status(tab, "Stopped", 300)
    assert "Nothing was saved" in status(tab)
    assert [sorted(folder.iterdir()) for folder in folders] == before
