"""Fixtures: tiny SD1 / SD2-v / SDXL models built in code (no network), and what they give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file
from support.cli_runs import erase_args, run
from support.models import ARCHITECTURES, build_tiny_model

from erase_engine import load_denoiser
from erase_engine.hosts.diffusers_configs import CONFIG_METADATA_KEY


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_tiny_model(root / f"tiny-{arch}", arch) for arch in ARCHITECTURES}


@pytest.fixture(params=ARCHITECTURES)
def architecture(request) -> str:
    return request.param


@pytest.fixture
def tiny_denoiser(tiny_model_dirs, architecture):
    return load_denoiser(tiny_model_dirs[architecture])


@pytest.fixture
def sd1(tiny_model_dirs):
    return tiny_model_dirs["sd1"]


@pytest.fixture
def sd1_file(tiny_model_dirs, tmp_path_factory):
    """The tiny SD1 model as a single file in the original layout."""
    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    model = load_denoiser(tiny_model_dirs["sd1"])
    state = {k: v.contiguous() for k, v in model.original_state_dict().items()}
    save_file(state, str(path), {CONFIG_METADATA_KEY: json.dumps(model.diffusers_configs(), default=str)})
    return path


@pytest.fixture
def sd1_lora(sd1, tmp_path_factory, capsys):
    """A LoRA erased from the tiny SD1 model by the CLI."""
    out = tmp_path_factory.mktemp("lora") / "cat.safetensors"
    assert run(capsys, *erase_args(sd1, out))[0] == 0
    return out


@pytest.fixture(scope="session")
def shapes():
    """The built-in model."""
    return load_denoiser("builtin:shapes")


@pytest.fixture(scope="session")
def judge():
    """The built-in model's judge."""
    from erase_engine.builtin.judge import load_judge

    return load_judge()
