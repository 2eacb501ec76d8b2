"""``erase-concept`` end to end on a tiny diffusers folder, in a subprocess like a user runs it."""

import json
import subprocess
import sys

from safetensors import safe_open
from support import FAST

from erase_engine import load_denoiser


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "erase_engine", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def test_cli_writes_lora_checkpoint_and_report(tiny_model_dirs, tmp_path):
    out, ckpt, report = tmp_path / "cat.safetensors", tmp_path / "cat-ckpt.safetensors", tmp_path / "report"
    result = run_cli(
        "--model", tiny_model_dirs["sd1"], "--erase", "a cat", "--into", "a dog", "--preserve", "a car", "a tree",
        "--out", out, "--save-checkpoint", ckpt, "--report", report, *FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "sampling: 100%" in result.stderr  # the trajectory cache's bar, then the training's
    assert "erasing: 100%" in result.stderr and "| 2/2 " in result.stderr
    with safe_open(str(out), "pt") as f:
        assert any(k.endswith(".lora_up.weight") for k in f.keys())
        assert json.loads(f.metadata()["erasure.preserve"]) == ["a car", "a tree"]
        lora_score = json.loads(f.metadata()["erasure.score"])
        assert f.metadata()["erasure.steps_run"] == "2"
    assert load_denoiser(ckpt).info.architecture == "sd1"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["score"] == lora_score and set(lora_score["preserve_drift_by_prompt"]) == {"a car", "a tree"}
    assert summary["config"]["erase"] == ["a cat"] and len(summary["final_losses"]) > 0
    assert set(summary["pixel_change"]) == {"a cat", "a car", "a tree"}
    from PIL import Image

    assert summary["steps_run"] == 2 and set(summary["score"]) >= {"remaining", "uncond_drift", "preserve_drift"}
    assert [s["step"] for s in summary["scores"]] == [0, 2]
    grid = Image.open(report / "grid.png")
    side = load_denoiser(tiny_model_dirs["sd1"]).info.resolution
    tile = side * -(-128 // side)  # samples scaled up by a whole factor to at least 128 px
    assert grid.height == 28 + 2 * 3 * tile  # a header, then original and erased rows for three prompts
    assert Image.open(report / "training.png").size == (900, 360)
    assert "held-out score: remaining" in result.stdout


def test_same_seed_gives_the_same_file(tiny_model_dirs, tmp_path):
    files = []
    for name in ("a", "b"):
        path = tmp_path / name / "same.safetensors"
        path.parent.mkdir()
        result = run_cli("--model", tiny_model_dirs["sd2"], "--erase", "a cat", "--out", path, "--seed", "3", *FAST)
        assert result.returncode == 0, result.stderr
        files.append(path.read_bytes())
    assert files[0] == files[1]


def test_bad_input_gives_a_clear_message_and_no_file(tiny_model_dirs, tmp_path):
    bad_flag = run_cli("--model", tiny_model_dirs["sd1"], "--erase", "a cat", "--bogus")
    assert bad_flag.returncode == 2 and "unrecognized arguments: --bogus" in bad_flag.stderr

    missing = run_cli("--model", tmp_path / "nowhere", "--erase", "a cat", "--out", tmp_path / "x.safetensors", *FAST)
    assert missing.returncode != 0 and "no model at" in missing.stderr
    assert "Traceback" not in missing.stderr

    esd_into = run_cli("--model", tiny_model_dirs["sd1"], "--erase", "a cat", "--into", "a dog", "--method", "esd")
    assert esd_into.returncode == 2 and "without an alternative" in esd_into.stderr

    wrong_suffix = run_cli("--model", tiny_model_dirs["sd1"], "--erase", "a cat", "--out", tmp_path / "x.pt")
    assert wrong_suffix.returncode == 2 and ".safetensors" in wrong_suffix.stderr
    assert list(tmp_path.iterdir()) == []


def test_bench_speed_reports_both_loops_in_one_run(tmp_path):
    out = tmp_path / "speed.json"
    result = run_cli("bench-speed", "--device", "cpu", "--shape", "tiny", "--steps", "2", "--json", out)
    assert result.returncode == 0, result.stderr
    row = json.loads(out.read_text())
    for key in (
        "device",
        "model",
        "baseline_s_per_step",
        "engine_s_per_step",
        "engine_s_per_erasure",
        "speedup",
        "peak_mem_gib",
    ):
        assert key in row, key
    assert row["device"] == "cpu" and row["model"] == "tiny"
    assert row["speedup"] == row["baseline_s_per_erasure"] / row["engine_s_per_erasure"]
    assert row["engine_s_per_erasure"] > row["engine_cache_s"] > 0 and row["unet_forward_gflop"] > 0
    assert "seconds per step" in result.stdout and "ESD-style" in result.stdout
