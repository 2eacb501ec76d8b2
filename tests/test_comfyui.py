"""The node pack inside a real, headless ComfyUI server (CPU), driven over its HTTP API
(``support.comfyui``: README, "Developing", gives the recipe)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from support import ROOT
from support.browser import chromium, needs_chromium
from support.comfyui import CHECKPOINT, COMFYUI_DIR, example, image_array, needs_comfyui, start_server

from erase_engine.parameters import PARAMETERS

pytestmark = needs_comfyui


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("comfyui"), "sd1", CHECKPOINT)


def test_pack_registers_its_nodes(server):
    info = server.get("/object_info")
    names = {k: v["display_name"] for k, v in info.items() if k.startswith("AllButOne")}
    assert names == {
        "AllButOneEraseConcept": "Erase Concept",
        "AllButOneSaveErasedLoRA": "Save Erased LoRA",
        "AllButOneSaveErasedCheckpoint": "Save Erased Checkpoint",
        "AllButOnePurifyImage": "Purify Image",
        "AllButOneAttackErasure": "Attack Erasure (does it come back?)",
    }
    assert all(info[k]["category"] == "concept erasing" for k in names)


def test_the_erase_node_shows_the_parameter_tables_defaults_and_ranges(server):
    """What ComfyUI's frontend receives for each widget of Erase Concept, against the table."""
    inputs = server.get("/object_info/AllButOneEraseConcept")["AllButOneEraseConcept"]["input"]
    for spec in PARAMETERS:
        section = inputs["optional" if spec.advanced else "required"]
        kind, options = section[spec.name]
        assert options["default"] == spec.default, spec.name
        if spec.choices:  # a combo: its options as the first element, or under "options"
            assert list(kind if isinstance(kind, list) else options["options"]) == list(spec.choices), spec.name
        elif spec.kind is not str:
            assert (kind, options["min"], options["max"]) == (
                {int: "INT", float: "FLOAT"}[spec.kind],
                spec.form_minimum,
                spec.maximum,
            ), spec.name
    assert list(inputs["required"])[2:] == [spec.name for spec in PARAMETERS if not spec.advanced]


def test_a_erase_then_sample_same_seed_and_the_loaded_model_is_untouched(server):
    outputs = server.run(example("a_erase_and_compare"))
    before, after = image_array(server, outputs, "10"), image_array(server, outputs, "11")
    assert before.shape == after.shape == (64, 64, 3)
    assert np.abs(before - after).max() > 0  # the erased MODEL samples differently at the same seed
    preview = image_array(server, outputs, "12")
    from erase_engine.report import HEADER, TILE

    tile = 64 * -(-TILE // 64)  # the 64-px samples scaled up by a whole factor
    assert preview.shape[0] == HEADER + 2 * 3 * tile  # rows: 3 prompts (erase + 2 preserve), before and after

    # The MODEL that came in (ComfyUI's cached loader output, same node id) saved by the stock node.
    saved = server.run(
        {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
            "2": {
                "class_type": "CheckpointSave",
                "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "filename_prefix": "checkpoints/base"},
            },
        }
    )
    assert saved is not None
    original = load_file(server.base / "models" / "checkpoints" / CHECKPOINT)
    (written,) = (server.base / "output" / "checkpoints").glob("base*.safetensors")
    after_erasure = load_file(written)
    unet = [k for k in original if k.startswith("model.diffusion_model.")]
    assert len(unet) == 686
    for key in unet:  # loaded from fp16, held in fp32 on the CPU: bit-identical after the upcast
        assert torch.equal(after_erasure[key], original[key].to(after_erasure[key].dtype)), key

    again = server.run(example("a_erase_and_compare"))  # cached erasure, sampled again: same pictures
    assert np.array_equal(image_array(server, again, "10"), before)


def test_b_save_lora_and_checkpoint_then_c_stock_loaders_use_them(server):
    workflow = example("b_erase_and_save")
    outputs = server.run(workflow)
    rank = workflow["2"]["inputs"]["lora_rank"]
    lora_name = Path(outputs["20"]["text"][0]).name
    checkpoint_name = Path(outputs["21"]["text"][0]).name
    lora_path = server.base / "models" / "loras" / lora_name
    with safe_open(lora_path, "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    modules = {k.rsplit(".", 2)[0] for k in keys if k.endswith("lora_down.weight")}
    assert len(modules) == 64  # SD1.5: 16 transformer blocks x attn2.{to_q, to_k, to_v, to_out.0}
    assert all(k.startswith("lora_unet_") for k in keys)
    assert keys == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert json.loads(metadata["erasure.erase"]) == ["Van Gogh"] and metadata["ss_network_dim"] == str(rank)
    assert lora_name in server.listed("LoraLoader", "lora_name")  # no restart needed
    assert checkpoint_name in server.listed("CheckpointLoaderSimple", "ckpt_name")
    assert not list(server.base.rglob("*.partial"))

    log_before = len(server.log_text())
    lora_out = server.run(example("c_load_erased_lora", LoraLoader={"lora_name": lora_name}))
    log = server.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log
    # The stock LoraLoader reproduces the erased MODEL of Erase Concept: same seed, same picture.
    erased = server.run(example("a_erase_and_compare"))
    difference = np.abs(image_array(server, lora_out, "10") - image_array(server, erased, "11"))
    assert difference.max() <= 2, difference.max()

    # The stock checkpoint loader loads the erased checkpoint; it samples what the erased MODEL samples.
    merged = server.run(
        example(
            "c_load_erased_lora",
            LoraLoader={"lora_name": lora_name, "strength_model": 0.0, "strength_clip": 0.0},
            CheckpointLoaderSimple={"ckpt_name": checkpoint_name},
        )
    )
    difference = np.abs(image_array(server, merged, "10") - image_array(server, erased, "11"))
    assert difference.max() <= 2, difference.max()

    # Saving again never overwrites: the second file gets a counter suffix.
    again = server.run(example("b_erase_and_save"))
    assert Path(again["20"]["text"][0]).name == lora_name.replace(".safetensors", "_2.safetensors")


def test_d_purify_an_image(server):
    outputs = server.run(example("d_purify_image"))
    purified = image_array(server, outputs, "42")
    original = np.asarray(Image.open(server.base / "input" / "example.png"), dtype=np.int16)
    assert purified.shape == original.shape
    assert np.abs(purified - original).mean() > 1  # regenerated, not passed through


def test_e_attack_saves_an_embedding_that_comfyuis_prompt_word_loads(server):
    outputs = server.run(example("e_attack_erasure"))
    path = server.base / "models" / "embeddings" / outputs["30"]["text"][0]
    with safe_open(path, "pt") as f:
        vectors, metadata = f.get_tensor("emb_params"), f.metadata()
    assert vectors.shape == (1, 768) and json.loads(metadata["attack.config"])["concept"] == "Van Gogh"
    from erase_engine.report import HEADER, TILE

    grid = image_array(server, outputs, "31")
    assert grid.shape[0] == HEADER + 3 * 64 * -(-TILE // 64)  # original, erased, erased + attack

    # The stock text encoder reads the file for embedding:<name> (no warning that it does not exist),
    # and the erased MODEL draws something else with it than with the concept's words, same seed.
    log_before = len(server.log_text())
    asked = {}
    for word in ("Van Gogh", f"embedding:{path.stem}"):
        workflow = example("e_attack_erasure")
        del workflow["30"], workflow["31"]
        workflow.update(sampled_with(["2", 0], f"a painting, {word}"))
        asked[word] = image_array(server, server.run(workflow), "54")
    assert "does not exist" not in server.log_text()[log_before:]
    assert np.abs(asked["Van Gogh"] - asked[f"embedding:{path.stem}"]).max() > 0


def test_e_cancel_mid_attack_writes_no_embedding(server):
    """Cancel while the attack trains (its erasure cached from the run before): no file."""
    folder = server.base / "models" / "embeddings"
    before = set(folder.iterdir()) if folder.exists() else set()
    prompt_id = server.queue(example("e_attack_erasure", AllButOneAttackErasure={"steps": 5000, "seed": 5}))
    deadline = time.monotonic() + 300
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(30)  # the erasure is cached: into the attack (its sampler, then ~5 s per step)
    server.post("/interrupt")
    entry = server.wait(prompt_id)
    messages = dict((kind, body) for kind, body in entry["status"]["messages"])
    assert "2" in messages["execution_cached"]["nodes"]  # the erasure was cached: Cancel hit the attack
    assert messages["execution_interrupted"]["node_id"] == "30"
    assert set(folder.iterdir()) == before and not list(server.base.rglob("*.partial"))


def test_a_robust_erasure_learns_its_adversary_through_comfyuis_text_encoder(server):
    """robust on: the adversary's word is learned through ComfyUI's own CLIP (its weights made as
    inference tensors), and the erased MODEL samples differently at the same seed."""
    outputs = server.run(example("a_erase_and_compare", AllButOneEraseConcept={"robust": "on", "seed": 3}))
    before, after = image_array(server, outputs, "10"), image_array(server, outputs, "11")
    assert before.shape == after.shape and np.abs(before - after).max() > 0


def test_the_adapters_embedding_is_comfyuis_own_embedding_word(server):
    """In a ComfyUI process: the adapter's differentiable encoding with learned vectors equals what
    ComfyUI's tokenizer and text encoder make of the same vectors saved as ``embedding:<name>``."""
    script = ROOT / "tests" / "support" / "comfyui_embedding.py"
    command = [os.environ.get("COMFYUI_PYTHON", sys.executable), str(script)]
    folder = server.base / "probe-embeddings"
    folder.mkdir(exist_ok=True)
    checkpoint = server.base / "models" / "checkpoints" / CHECKPOINT
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(COMFYUI_DIR), str(ROOT)])}
    done = subprocess.run(
        [*command, str(checkpoint), str(folder)], cwd=COMFYUI_DIR, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["difference"] == 0.0, figures
    assert figures["changed"] > 0.1 and figures["gradient"] > 0, figures


def sampled_with(model: list, prompt: str) -> dict:
    """Nodes 50-54: ``model`` samples ``prompt`` with stock nodes (8x8 latent, 3 steps, seed 0)."""
    return {
        "50": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "51": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "52": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "53": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "positive": ["50", 0],
                "negative": ["51", 0],
                "latent_image": ["52", 0],
                "seed": 0,
                "steps": 3,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "54": {
            "class_type": "SaveImage",
            "inputs": {
                "images": ["55", 0],
                "filename_prefix": "attack/sampled",
            },
        },
        "55": {"class_type": "VAEDecode", "inputs": {"samples": ["53", 0], "vae": ["1", 2]}},
    }


EXAMPLES = ["a_erase_and_compare", "b_erase_and_save", "c_load_erased_lora", "d_purify_image", "e_attack_erasure"]


@needs_chromium
def test_ui_examples_are_the_api_examples_in_the_real_web_ui(server, tmp_path):
    """Each examples/ui workflow, loaded by ComfyUI's own frontend, queues exactly its API twin.

    ``UPDATE_EXAMPLES=1`` writes examples/ui from examples/api instead (through the same frontend).
    A screenshot of example (a) is left in the test's folder (README's picture).
    """
    update = os.environ.get("UPDATE_EXAMPLES") == "1"
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 2200, "height": 1300})
        page.goto(server.url, wait_until="networkidle")
        page.wait_for_function("window.app && window.app.graph", timeout=120_000)
        page.keyboard.press("Escape")  # the template gallery shown at first start
        page.evaluate("async () => window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false)")
        for name in EXAMPLES:
            api = json.loads((ROOT / "examples" / "api" / f"{name}.json").read_text())
            ui_file = ROOT / "examples" / "ui" / f"{name}.json"
            if update:
                page.evaluate(EXPORT_UI, api)
                ui_file.parent.mkdir(exist_ok=True)
                # stringified in the page: a JSON round trip drops undefined fields (Python would write null)
                workflow = json.loads(
                    page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).workflow)")
                )
                ui_file.write_text(json.dumps(workflow, indent=2) + "\n")
            page.evaluate("async (ui) => { await window.app.loadGraphData(ui); }", json.loads(ui_file.read_text()))
            assert page.get_by_text("Invalid workflow").count() == 0, name  # the frontend's schema check
            queued = page.evaluate("async () => (await window.app.graphToPrompt()).output")
            assert {k: (v["class_type"], v["inputs"]) for k, v in queued.items()} == {
                k: (v["class_type"], v["inputs"]) for k, v in api.items()
            }, name
            if name == EXAMPLES[0]:
                page.mouse.click(1100, 1250)
                page.keyboard.press(".")  # fit the graph to the window
                page.wait_for_timeout(1000)
                page.screenshot(path=tmp_path / "comfyui-example-a.png")
        browser.close()
    assert (tmp_path / "comfyui-example-a.png").stat().st_size > 50_000


EXPORT_UI = """async (api) => {
    await window.app.loadApiJson(api, "example.json");
    for (const node of window.app.graph.nodes)
        for (const widget of node.widgets ?? [])
            if (widget.name === "control_after_generate") widget.value = "fixed";  // same seed every run
    window.app.graph.arrange(60);
}"""


def test_cancel_mid_erasure_writes_nothing_and_leaves_the_model_alone(server):
    loras = set((server.base / "models" / "loras").iterdir())
    workflow = example("b_erase_and_save", AllButOneEraseConcept={"steps": 500, "seed": 7})
    prompt_id = server.queue(workflow)
    deadline = time.monotonic() + 300
    while not server.get("/queue")["queue_running"] and time.monotonic() < deadline:
        time.sleep(1)
    time.sleep(30)  # into the training loop (3 sampler steps, then ~5 s per training step)
    server.post("/interrupt")
    entry = server.wait(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert any(message[0] == "execution_interrupted" for message in entry["status"]["messages"])
    assert set((server.base / "models" / "loras").iterdir()) == loras
    assert not list(server.base.rglob("*.partial"))
    server.run(example("a_erase_and_compare"))  # the server and its models still work
