"""The built-in model, its judge and the benchmark, at a size CI affords."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from erase_engine import EraseConfig, load_denoiser
from erase_engine.benchmarks import efficacy as bench
from erase_engine.builtin.judge import accuracy, foreground_mask, load_judge, mask_iou
from erase_engine.builtin.render import SHAPES, Scenes, render, shape_masks


@pytest.fixture(scope="module")
def shapes():
    return load_denoiser("builtin:shapes")


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def test_builtin_model_loads_offline_through_the_sd1_path(shapes):
    assert shapes.info.architecture == "sd1" and shapes.info.resolution == 32
    assert shapes.tokenizers[0].vocab_size == 49408
    images = bench.sample(shapes, ["a red star on a white background", ""], seed=0)
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1


def test_judge_scores_fresh_renders(judge):
    scores = accuracy(judge, 1024, seed=4242)  # renders the judge never saw (other seed)
    print(scores)
    assert min(scores.values()) >= 0.95


def test_foreground_mask_finds_the_rendered_shape():
    scenes = Scenes.random(64, torch.Generator().manual_seed(5))
    coords = (torch.arange(32, dtype=torch.float32) + 0.5) / 32 * 2 - 1
    v, u = torch.meshgrid(-coords, coords, indexing="ij")
    x = (u[None] - scenes.center[:, 0, None, None]) / scenes.scale[:, None, None]
    y = (v[None] - scenes.center[:, 1, None, None]) / scenes.scale[:, None, None]
    truth = shape_masks(scenes.shape, x, y)  # pixel centres inside the shape
    assert float(mask_iou(foreground_mask(render(scenes)), truth).mean()) > 0.85


def test_the_model_draws_what_it_is_asked(shapes, judge):
    """Every shape with a fixed color, every color with a fixed shape: the judge agrees."""
    group = bench.Group()
    for shape in range(len(SHAPES)):
        for _ in range(4):
            group.add(shape, shape % 6, "white")
    images = bench.sample(shapes, group.prompts, seed=300)
    shape_pred, color_pred = judge.classify(images)
    print("shape", float((shape_pred == group.wanted("shape")).float().mean()))
    assert float((shape_pred == group.wanted("shape")).float().mean()) >= 0.8
    assert float((color_pred == group.wanted("color")).float().mean()) >= 0.8


def test_an_erasure_at_the_defaults_removes_the_concept_and_keeps_the_others(shapes, judge):
    erase = "heart"
    config = EraseConfig(erase=[erase], preserve=bench.default_preserve(erase))  # the defaults: auto steps and lr
    result, _ = bench.run_bench(shapes, judge, config, samples=64)
    print(result)
    assert result["erase_acc_before"] >= 0.9
    assert result["erase_acc_after"] <= 0.2
    assert result["preserve_acc_after"] >= result["preserve_acc_before"] - 0.05
    assert result["layout_box_iou"] >= 0.6  # the object stays where it was


def test_purify_command_round_trip(shapes, judge, tmp_path):
    lora = tmp_path / "star.safetensors"
    cli = [sys.executable, "-m", "erase_engine"]
    erased = subprocess.run(
        [*cli, "--erase", "star", "--out", str(lora)],  # the defaults
        capture_output=True,
        text=True,
    )
    assert erased.returncode == 0, erased.stderr
    star = bench.sample(shapes, ["a yellow star on a black background"], seed=11)
    assert int(judge.classify(star)[0][0]) == SHAPES.index("star")
    Image.fromarray((star[0].permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(tmp_path / "in.png")
    purified = subprocess.run(
        [*cli, "purify", "--lora", str(lora), "--image", str(tmp_path / "in.png"), "--prompt",
         "a yellow star on a black background", "--out", str(tmp_path / "out.png")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert purified.returncode == 0, purified.stderr
    out = torch.from_numpy(np.array(Image.open(tmp_path / "out.png"))).permute(2, 0, 1)[None].float() / 255
    assert out.shape == star.shape
    assert int(judge.classify(out)[0][0]) != SHAPES.index("star")
    assert float(mask_iou(foreground_mask(star), foreground_mask(out))[0]) > 0.3
