"""The standalone web app (``erase-concept ui``) driven in a real browser: headless Chromium
through Playwright, on the built-in model.  Skipped where Chromium is absent."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from safetensors import safe_open
from support.browser import chromium, fill_number, fill_text, needs_chromium, start_attack, status, wait_for_status

pytestmark = needs_chromium


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("gradio")
    folder = tmp_path_factory.mktemp("saved")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = folder.parent / "app.log"
    command = [sys.executable, "-m", "erase_engine", "ui", "--port", str(port), "--folder", str(folder)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "NO_PROXY": "*"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield url, folder
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def page(app):
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
        page.goto(app[0])
        page.wait_for_selector("#ce_start")
        yield page


def test_erase_in_the_browser_shows_progress_result_and_downloads_the_lora(app, page, tmp_path):
    _, folder = app
    fill_text(page, "erase", "star")
    fill_text(page, "name", "no-stars")
    page.click("#ce_start")
    wait_for_status(page, "step ", 120)
    seen = status(page)
    assert "Erasing 'star'" in seen and "loss" in seen  # live progress
    wait_for_status(page, "Done", 300)
    assert page.locator("#ce_grid img").count() == 1  # the before/after grid is shown
    page.screenshot(path=tmp_path / "standalone-app.png", full_page=True)

    link = page.locator("#ce_files a").first
    with page.expect_download() as download:
        link.click()
    path = tmp_path / "downloaded.safetensors"
    download.value.save_as(path)
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["erasure.erase"]) == ["star"]
        assert f.keys() and all(k.startswith("lora_unet_") for k in f.keys())
    assert path.read_bytes() == (folder / "no-stars.safetensors").read_bytes()

    # Then attack that erasure from its section: progress, the grid, the embedding in the folder.
    start_attack(page, 20, "star-attack")
    wait_for_status(page, "Attacking the erasure of 'star'", 120, "ce_attack_status")
    wait_for_status(page, "Done", 300, "ce_attack_status")
    assert "recovered" in status(page, "ce_attack_status")
    assert page.locator("#ce_attack_grid img").count() == 1
    with safe_open(folder / "star-attack.safetensors", "pt") as f:
        assert json.loads(f.metadata()["attack.config"])["steps"] == 20


def test_stop_mid_run_saves_nothing(app, page):
    _, folder = app
    before = set(folder.iterdir())
    fill_text(page, "erase", "heart")
    fill_text(page, "name", "stopped")
    # Fixed and long: with auto steps a fast machine can finish before the click lands.
    fill_number(page, "steps", 5000)
    page.click("#ce_start")
    wait_for_status(page, "step ", 120)
    page.click("#ce_stop")
    wait_for_status(page, "Stopped", 60)
    assert "Nothing was saved" in status(page)
    assert set(folder.iterdir()) == before


def test_bad_input_is_reported_in_the_page(app, page):
    fill_text(page, "erase", "   ")
    page.click("#ce_start")
    wait_for_status(page, "Error", 60)
    assert "non-empty concept" in status(page)


def quick_erasure(session, folder, want_lora: bool = False) -> None:
    """A two-step erasure of "star" on the built-in model through the Start button's handler."""
    from erase_engine.frontends.web import FORM
    from erase_engine.parameters import PARAMETERS

    form = {spec.name: spec.default for spec in PARAMETERS} | {
        "model": "builtin:shapes",
        "folder": str(folder),
        "erase": "star",
        "steps": 2,
        "lr": 3e-3,
        "trajectories": 1,
        "sampler_steps": 2,
        "name": "p",
        "want_lora": want_lora,
        "want_checkpoint": False,
    }
    updates = list(session.erase(*(form[name] for name in FORM)))
    assert updates[-1][0].startswith("Done") and updates[-1][1] is not None, updates[-1][0]
    assert len(list(folder.iterdir())) == want_lora  # the LoRA asked for, or nothing


def test_purify_section_uses_the_last_erasure(tmp_path):
    """The interface's purify handler, without a browser: after an erasure, an image in gives
    an image of the same size out; before one, a message."""
    pytest.importorskip("gradio")
    from PIL import Image

    from erase_engine.frontends.web import Session, StandaloneHost

    session = Session(StandaloneHost(folder=str(tmp_path)))
    image = Image.new("RGB", (40, 24), "red")
    assert session.purify(image, "a red star", 2, 0.5) == (None, "Run an erasure first, then give an image.")
    quick_erasure(session, tmp_path)
    purified, message = session.purify(image, "a red star", 2, 0.5)
    assert message == "Purified." and purified.size == (40, 24)


def test_attack_section_attacks_the_last_erasure_saves_the_embedding_and_stops_cleanly(tmp_path):
    """The Attack button's handler, without a browser: before an erasure a message; after one, an
    embedding of the erased concept in the folder and the grid; Stop mid-attack writes nothing;
    a name that is not one word is refused."""
    pytest.importorskip("gradio")
    from erase_engine.frontends.web import Session, StandaloneHost

    session = Session(StandaloneHost(folder=str(tmp_path)))
    assert list(session.attack("", 3, 1, "early", str(tmp_path)))[-1][0].startswith("Run an erasure first")
    quick_erasure(session, tmp_path)

    status, grid, files = list(session.attack("", 3, 1, "probe", str(tmp_path)))[-1]
    path = tmp_path / "probe.safetensors"
    assert status.startswith("Done") and grid is not None and files == [str(path)], status
    with safe_open(path, "pt") as f:
        assert f.get_tensor("emb_params").shape[0] == 1
        assert json.loads(f.metadata()["attack.config"])["concept"] == "star"

    updates = session.attack("", 5000, 1, "stopped", str(tmp_path))
    for status, _, _ in updates:
        if "step " in status:
            session.request_stop()
    assert status.startswith("**Stopped") and "Nothing was saved" in status, status
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe.safetensors"]

    status = list(session.attack("", 3, 1, "two words", str(tmp_path)))[-1][0]
    assert status.startswith("**Error") and "one word" in status, status


def test_results_are_saved_inside_the_job_and_a_model_load_retires_the_last_erasure(tmp_path):
    """Without a browser, on a host that records its calls: the LoRA is saved (and the host told)
    between the job's begin and end, while the host's queue is held, so no checkpoint switch can
    change the weights being written. When the host then loads a model (A1111 loads the new
    weights into the same model object), the attack and purification refuse the last erasure
    instead of running it on other weights, and the session lets the erasure go."""
    pytest.importorskip("gradio")
    import gc
    import weakref

    from PIL import Image

    from erase_engine.frontends.web import Session, StandaloneHost

    class RecordingHost(StandaloneHost):
        def __init__(self, folder: str):
            super().__init__(folder=folder)
            self.calls: list[str] = []

        def begin(self, total):
            self.calls.append("begin")

        def end(self):
            self.calls.append("end")

        def saved(self, kind, path, denoiser):
            self.calls.append(f"saved {kind}")

        def on_model_loaded(self, callback):
            self.model_loaded = callback

    host = RecordingHost(folder=str(tmp_path))
    session = Session(host)
    (tmp_path / "loras").mkdir()
    quick_erasure(session, tmp_path / "loras", want_lora=True)
    assert host.calls == ["begin", "saved lora", "end"]

    erasure = weakref.ref(session.last)
    host.model_loaded()
    gc.collect()
    assert erasure() is None  # nothing in the session holds the old model's erasure
    status = list(session.attack("", 3, 1, "probe", str(tmp_path)))[-1][0]
    assert status.startswith("The host loaded another model"), status
    image = Image.new("RGB", (40, 24), "red")
    assert session.purify(image, "a red star", 2, 0.5)[1].startswith("The host loaded another model")
    assert not (tmp_path / "probe.safetensors").exists()

    (tmp_path / "none").mkdir()
    quick_erasure(session, tmp_path / "none")  # an erasure on the loaded model: both work again
    assert session.purify(image, "a red star", 2, 0.5)[1] == "Purified."
