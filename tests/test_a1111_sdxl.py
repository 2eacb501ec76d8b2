"""The A1111 adapter on A1111's own SDXL (sgm ``DiffusionEngine``), inside an A1111 process:
A1111's loader builds the model from a full-size random SDXL checkpoint, and

- the adapter's predictions match the diffusers adapter's on the same file;
- an erasure leaves A1111's model bit-identical;
- A1111's own Lora code matches every module of the exported LoRA and reads each as the
  weight update that was trained.

Needs ``A1111_DIR`` (an A1111 checkout with its ``repositories/``, where sgm lives) and
A1111's Python packages; run it with A1111's interpreter, and ``ENGINE_PYTHON`` an
interpreter with this project's requirements (diffusers) for the reference (README,
"Developing").
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import ROOT
from support.clip_l import save_clip_l
from support.models import MAKE_CHECKPOINT
from support.reference import PROMPTS, assert_matches_reference, reference_outputs

A1111_DIR = os.environ.get("A1111_DIR")
pytestmark = pytest.mark.skipif(
    not A1111_DIR, reason="set A1111_DIR to an A1111 checkout and run with A1111's Python (README: Developing)"
)
ENGINE_PYTHON = os.environ.get("ENGINE_PYTHON", sys.executable)  # A1111's own may not import diffusers' models


@pytest.fixture(scope="module")
def a1111(tmp_path_factory):
    """A1111 initialised as its launcher would, its SDXL model loaded; the reference predictions."""
    folder = tmp_path_factory.mktemp("a1111")
    checkpoints = folder / "models/Stable-diffusion"
    checkpoints.mkdir(parents=True)
    path = checkpoints / "random-sdxl.safetensors"
    subprocess.run([ENGINE_PYTHON, "-c", MAKE_CHECKPOINT, "sdxl", str(path)], check=True, cwd=ROOT)
    reference = reference_outputs(path, "epsilon", folder, ENGINE_PYTHON)

    # A1111 reads a config beside the checkpoint first: SDXL's own, its first text encoder (CLIP-L,
    # loaded by name from a model hub otherwise) pointed at a local folder with its config and tokenizer.
    from omegaconf import OmegaConf

    config = OmegaConf.load(Path(A1111_DIR) / "repositories/generative-models/configs/inference/sd_xl_base.yaml")
    config.model.params.conditioner_config.params.emb_models[0].params.version = str(save_clip_l(folder / "clip-l"))
    OmegaConf.save(config, path.with_suffix(".yaml"))
    cpu = [] if torch.cuda.is_available() else ["--use-cpu", "all"]
    arguments = ["--no-half", "--precision", "full", *cpu, "--data-dir", str(folder), "--ckpt", str(path)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IGNORE_CMD_ARGS_ERRORS", "1")
        patch.setattr(sys, "argv", [sys.argv[0], "--lora-dir", str(folder / "models/Lora"), *arguments])
        patch.chdir(A1111_DIR)
        sys.path[:0] = [A1111_DIR]
        from modules import initialize

        initialize.imports()
        initialize.initialize()
        from modules import shared

        model = shared.sd_model  # waits for the load
    path.unlink()  # loaded: the file is gigabytes
    return model, reference, folder


def test_a1111_sdxl_adapter_matches_the_diffusers_adapter_on_the_same_file(a1111):
    from erase_engine.hosts.a1111 import A1111Denoiser

    model, reference, _ = a1111
    host = A1111Denoiser(model, "random")
    assert host.is_sdxl and host.info.architecture == "sdxl" and host.schedule.prediction_type == "epsilon"
    assert_matches_reference(host, reference)


def test_a1111_sdxl_erasure_then_a1111_reads_every_lora_module_as_trained(a1111):
    from erase_engine import EraseConfig, erase_concept
    from erase_engine.exports import save_lora
    from erase_engine.files import weights_sha256
    from erase_engine.hosts.a1111 import A1111Denoiser

    model, _, folder = a1111
    host = A1111Denoiser(model, "random")
    before = weights_sha256(model)
    # Only the key/value projections and no preserve prompt: an fp32 SDXL training on a 24 GiB machine
    config = EraseConfig(
        erase=[PROMPTS[0]], train="xattn-kv", steps=3, lr=1e-2, trajectories=1, sampler_steps=3, resolution=64
    )
    erasure = erase_concept(host, config)
    assert weights_sha256(model) == before
    assert all(p.grad is None for p in model.parameters())

    # A1111's own Lora code reads the file: every module matched, each weight update (its
    # up @ down * alpha / rank) the delta that was trained.  (Applying it in a forward pass
    # makes A1111 back up every weight of the model: a second fp32 SDXL, more than 24 GiB.)
    save_lora(erasure, folder / "models/Lora/erased.safetensors")
    import networks  # A1111's built-in Lora extension, on sys.path once A1111 loaded its scripts

    networks.list_available_networks()
    net = networks.load_network("erased", networks.available_networks["erased"])
    trained = {
        key.replace("lora_unet_", "diffusion_model_", 1): key for key in erasure.deltas.by_layer
    }  # kohya -> A1111
    assert set(net.modules) == set(trained)
    with torch.no_grad():
        for key, module in net.modules.items():
            update, _ = module.calc_updown(module.sd_module.weight)
            expected = erasure.deltas.delta(trained[key])
            torch.testing.assert_close(update.reshape(expected.shape), expected, rtol=1e-4, atol=1e-7)
