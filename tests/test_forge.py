"""The Forge adapter inside a real Forge process: Forge's own loader builds its model
from a full-size random SD1.5, SD2-v or SDXL checkpoint, and

- the adapter's predictions match the diffusers adapter's on the same file;
- an erasure leaves Forge's model bit-identical;
- Forge's own LoRA loader takes every key of the exported LoRA and its patched UNet
  predicts what the trained student predicted; Forge's loader reads the exported
  checkpoint back to the same predictions (SD1.5, SD2-v: a second SDXL does not fit).

Needs ``FORGE_DIR`` (a Stable Diffusion WebUI Forge checkout with its
``repositories/huggingface_guess``) and Forge's Python packages; run it with Forge's
interpreter (README, "Developing").  Skipped with the reason otherwise.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT
from support.models import MAKE_CHECKPOINT
from support.reference import PROMPTS, assert_matches_reference, reference_outputs, sample_input

FORGE_DIR = os.environ.get("FORGE_DIR")
pytestmark = pytest.mark.skipif(
    not FORGE_DIR, reason="set FORGE_DIR to a Forge checkout and run with Forge's Python (README: Developing)"
)


@pytest.fixture(scope="module")
def forge(tmp_path_factory):
    """Forge's modules, initialised as its launcher would (its data folder a temporary one)."""
    data = tmp_path_factory.mktemp("forge-data")
    sys.path[:0] = [FORGE_DIR, str(Path(FORGE_DIR) / "repositories" / "huggingface_guess")]
    os.environ["IGNORE_CMD_ARGS_ERRORS"] = "1"  # Forge parses sys.argv, which is pytest's here
    cpu = [] if torch.cuda.is_available() else ["--always-cpu"]
    argv, sys.argv = sys.argv, [sys.argv[0], "--data-dir", str(data), *cpu]
    try:
        from modules import shared_init

        shared_init.initialize()
        from backend import memory_management
        from backend.loader import forge_loader
        from backend.patcher.lora import load_lora, model_lora_keys_unet
    finally:
        sys.argv = argv
    return forge_loader, memory_management, load_lora, model_lora_keys_unet


PREDICTION = {"sd1": "epsilon", "sd2": "v_prediction", "sdxl": "epsilon"}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def loaded(request, forge, tmp_path_factory):
    """Forge's model from a random checkpoint, and the diffusers adapter's predictions on the
    same file (made in a child process: two SDXL models at once do not fit in 24 GiB)."""
    from erase_engine.hosts.forge import ForgeDenoiser, write_v_prediction_config

    gc.collect()  # the previous model (Forge's objects hold reference cycles) before the next is built
    architecture, folder = request.param, tmp_path_factory.mktemp("checkpoints")
    path = folder / f"random-{architecture}.safetensors"
    subprocess.run([sys.executable, "-c", MAKE_CHECKPOINT, architecture, str(path)], check=True, cwd=ROOT)
    if architecture == "sd2":  # the v-prediction config Forge needs beside an SD2-v file
        write_v_prediction_config(path)
    reference = reference_outputs(path, PREDICTION[architecture], folder)
    engine = forge[0](str(path))
    yield architecture, engine, ForgeDenoiser(engine, "random"), reference
    forge[1].unload_all_models()  # Forge's memory manager holds the model until told
    path.unlink()  # full-size checkpoints: gigabytes each


def unet_and_text_encoder_hash(engine) -> str:
    from erase_engine.files import weights_sha256

    objects = engine.forge_objects_original
    return weights_sha256(objects.unet.model) + weights_sha256(objects.clip.cond_stage_model)


def test_forge_adapter_matches_the_diffusers_adapter_on_the_same_file(loaded):
    architecture, _, host, reference = loaded
    assert host.info.architecture == architecture
    assert host.schedule.prediction_type == PREDICTION[architecture]
    assert_matches_reference(host, reference)


def test_erasure_leaves_forge_model_alone_and_forge_reads_back_the_lora_and_checkpoint(forge, loaded, tmp_path):
    from erase_engine import EraseConfig, erase_concept
    from erase_engine.exports import lora_state_dict, save_checkpoint
    from erase_engine.hosts.forge import ForgeDenoiser, write_v_prediction_config

    forge_loader, memory_management, load_lora, model_lora_keys_unet = forge
    architecture, engine, host, _ = loaded
    x, t = sample_input(2)
    cond = host.encode(PROMPTS[:1]).repeat(2)  # Forge casts the text encoder's embeddings at its first load
    before = unet_and_text_encoder_hash(engine)
    with torch.no_grad():
        base_before = host.output(x, t, cond)

    small = {"train": "xattn-kv"} if architecture == "sdxl" else {"preserve": ["a dog"]}  # fp32 SDXL: 24 GiB
    config = EraseConfig(erase=[PROMPTS[0]], steps=3, lr=1e-2, trajectories=1, sampler_steps=3, resolution=64, **small)
    erasure = erase_concept(host, config)
    assert unet_and_text_encoder_hash(engine) == before
    with torch.no_grad():
        student = host.output(x, t, cond, erasure.deltas)
        torch.testing.assert_close(host.output(x, t, cond), base_before, rtol=0, atol=0)
    assert (student - base_before).abs().max() > 1e-4  # the erasure changed the prediction

    # Forge's LoRA loader: every key matched, and its patched UNet predicts what the student did.
    patcher = engine.forge_objects_original.unet
    patches, unmatched = load_lora(lora_state_dict(erasure), model_lora_keys_unet(patcher.model))
    assert not unmatched
    patched = patcher.clone()
    assert set(patched.add_patches(filename="erased", patches=patches, strength_patch=1.0)) == set(patches)
    memory_management.load_models_gpu([patched])
    with torch.no_grad():
        torch.testing.assert_close(host.output(x, t, cond), student, rtol=1e-4, atol=1e-4)
    memory_management.load_models_gpu([patcher])  # unpatches: Forge restores its backup
    assert unet_and_text_encoder_hash(engine) == before

    if architecture == "sdxl":  # a second SDXL (the reloaded checkpoint) does not fit in 24 GiB
        return
    # The exported checkpoint, loaded by Forge's own loader, predicts what the student did.
    path = save_checkpoint(erasure, tmp_path / "erased.safetensors")
    if host.schedule.prediction_type == "v_prediction":
        write_v_prediction_config(path)  # as the tab does after saving in Forge
    reloaded = ForgeDenoiser(forge_loader(str(path)), "erased")
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.output(x, t, reloaded.encode(PROMPTS[:1]).repeat(2)), student, rtol=1e-4, atol=1e-4
        )


def test_the_adapters_embedding_is_forges_own_embedding_word(loaded, tmp_path):
    """The attack's differentiable encoding, with two learned vectors in each text encoder, is
    Forge's own encoding of a prompt that names the same vectors saved as an embedding file
    and loaded by Forge's embedding database; the vectors change it and get a gradient."""
    from types import SimpleNamespace

    from backend.text_processing.classic_engine import ClassicTextProcessingEngine
    from safetensors.torch import save_file

    from erase_engine.attack import embedding_state_dict
    from erase_engine.hosts.forge import load_embedding

    _, engine, host, _ = loaded
    torch.manual_seed(0)
    vectors = [
        (start.mean(0, keepdim=True).repeat(2, 1) + 0.05 * torch.randn(2, start.shape[1])).requires_grad_(True)
        for start in host.word_vectors("star")
    ]
    ours = host.encode_with_embedding(["a sks sks on a black background"], "sks", vectors)
    (ours.context.pow(2).sum() + sum(extra.pow(2).sum() for extra in ours.extras.values())).backward()
    assert all(float(v.grad.abs().sum()) > 0 for v in vectors)

    path = tmp_path / "probe.safetensors"
    save_file(embedding_state_dict(SimpleNamespace(vectors=vectors)), path)
    databases = [e.embeddings for e in vars(engine).values() if isinstance(e, ClassicTextProcessingEngine)]
    assert len(databases) == len(vectors)
    load_embedding(engine, path)  # what the tab does after an attack; Forge's own loader of a file
    try:
        forges = host.encode(["a probe on a black background"])
    finally:
        for database in databases:
            database.register_embedding_by_name(None, "probe")
    plain = host.encode(["a star on a black background"])
    pairs = [(ours.context, forges.context)] + [(ours.extras[k], forges.extras[k]) for k in ours.extras]
    assert [float((mine.detach() - theirs).abs().max()) for mine, theirs in pairs] == [0.0] * len(pairs)
    assert float((forges.context - plain.context).abs().max()) > 0.1


def test_a_robust_erasure_learns_its_adversary_through_forges_text_encoder(loaded):
    """robust on: the adversary's word is learned through Forge's text encoder (its weights
    loaded as inference tensors), the score measures the concept asked through it, and
    Forge's model is left as it was."""
    from erase_engine import EraseConfig, erase_concept

    architecture, engine, host, _ = loaded
    if architecture != "sd1":
        pytest.skip("one family is enough here: the embedding test checks the word's path on all three")
    before = unet_and_text_encoder_hash(engine)
    config = EraseConfig(erase=[PROMPTS[0]], robust="on", steps=2, trajectories=1, sampler_steps=2, resolution=64)
    erasure = erase_concept(host, config)
    assert erasure.score.adversary_remaining is not None and len(erasure.losses) == 2
    assert unet_and_text_encoder_hash(engine) == before
