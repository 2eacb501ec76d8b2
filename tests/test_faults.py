"""Faults and interruptions: the run stops at once with the reason, keeps nothing, and leaves
the model untouched."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch
from support.cli_runs import erase_args, leftovers, run

from erase_engine.files import weights_sha256


def fault_in_the_loop(monkeypatch, fault, at_call: int):
    """Make the denoiser's ``output`` fail (or return ``fault``) from its ``at_call``-th call."""
    from erase_engine.denoiser import Denoiser

    original, calls = Denoiser.output, {"n": 0}

    def output(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= at_call:
            if isinstance(fault, BaseException):
                raise fault
            return original(self, *args, **kwargs) * fault
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "output", output)


@pytest.mark.parametrize(
    "fault, message",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of memory: try fewer"),
        (float("nan"), "the loss became nan at step 1"),
        (float("inf"), "the loss became"),
    ],
    ids=["out-of-memory", "nan-loss", "inf-loss"],
)
def test_faults_in_the_loop_stop_at_once_keep_nothing_and_leave_the_model(
    sd1, tmp_path, capsys, monkeypatch, fault, message
):
    fault_in_the_loop(monkeypatch, fault, at_call=3)  # the first training call: the cache made 2 (CFG batched)
    code, err = run(capsys, *erase_args(sd1, tmp_path / "out.safetensors"))
    assert code == 1 and message in err, err
    assert "Traceback" not in err and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["text encoder", "sampler"])
def test_a_model_that_gives_nan_is_named_before_any_training(sd1, monkeypatch, where):
    """A1111's emphasis rescaling divides by the context's mean: a text encoder whose final
    layer norm has no bias gives a mean of 0, and NaN. Said as such, not as a learning rate."""
    from erase_engine import EraseConfig, erase_concept, load_denoiser
    from erase_engine.denoiser import Conditioning
    from erase_engine.trainer import ErasureFailed

    host = load_denoiser(sd1)
    if where == "text encoder":
        encode = type(host).encode
        monkeypatch.setattr(type(host), "encode", lambda self, p: Conditioning(encode(self, p).context / 0.0))
        message = "the model's text encoder gives NaN or inf for ''"
    else:
        fault_in_the_loop(monkeypatch, float("nan"), at_call=1)
        message = "the model's own samples became NaN or inf"
    phases = []
    config = EraseConfig(erase=["a cat"], steps=2, trajectories=1, sampler_steps=2)
    with pytest.raises(ErasureFailed, match=message):
        erase_concept(host, config, progress=lambda where: phases.append(where.phase))
    assert "training" not in phases  # stopped before the first training step


def test_the_trajectory_cache_shows_progress_and_can_be_stopped(sd1, monkeypatch):
    """The cache (the longest part on a CPU) reports each sampler step, and a stop asked during
    it ends the run there: no training step, nothing kept."""
    from erase_engine import EraseConfig, ErasureCancelled, erase_concept, load_denoiser
    from erase_engine.denoiser import Denoiser

    host = load_denoiser(sd1)
    config = EraseConfig(erase=["a cat"], steps=3, trajectories=1, sampler_steps=4)
    seen = []
    erase_concept(host, config, progress=lambda where: seen.append((where.phase, where.step, where.total)))
    assert seen == [("sampling", s, 4) for s in range(1, 5)] + [("training", s, 3) for s in range(1, 4)]

    calls, output = [], Denoiser.output
    monkeypatch.setattr(
        Denoiser, "output", lambda self, *a, **k: calls.append(k.get("deltas")) or output(self, *a, **k)
    )
    seen.clear()
    with pytest.raises(ErasureCancelled, match="while sampling the trajectory cache, after 2 of 4"):
        erase_concept(host, config, lambda where: seen.append(where.step), should_stop=lambda: len(seen) >= 2)
    assert seen == [1, 2] and len(calls) == 2  # two sampler steps (CFG batched), no student call


def test_the_model_in_memory_is_unchanged_after_success_error_cancel_and_out_of_memory(sd1, monkeypatch):
    """The host's copy, bit for bit (all of it: UNet, VAE, text encoder), whatever the run's outcome."""
    from erase_engine import EraseConfig, ErasureCancelled, erase_concept, load_denoiser
    from erase_engine.trainer import ErasureFailed

    host = load_denoiser(sd1)
    modules = [host.unet, host.vae, *host.text_encoders]
    original = [weights_sha256(m) for m in modules]
    config = EraseConfig(erase=["a cat"], preserve=["a dog"], steps=3, trajectories=1, sampler_steps=2, lr=1e-2)
    assert erase_concept(host, config).losses  # success
    with pytest.raises(ErasureCancelled):
        erase_concept(host, config, should_stop=lambda: True)
    with pytest.raises(ValueError):
        erase_concept(host, EraseConfig(erase=["a cat"], train="xattn", lora_rank=10**6))
    for fault in (torch.OutOfMemoryError("CUDA out of memory"), float("nan")):
        with monkeypatch.context() as patch:
            fault_in_the_loop(patch, fault, at_call=3)
            with pytest.raises(ErasureFailed):
                erase_concept(host, config)
    assert [weights_sha256(m) for m in modules] == original
    assert all(p.grad is None for m in modules for p in m.parameters())  # no gradient reached the host either


@pytest.mark.parametrize(
    ("bar", "longer"),
    [("sampling", ["--sampler-steps", "1000", "--trajectories", "64"]), ("erasing", ["--steps", "100000"])],
)
def test_ctrl_c_mid_run_exits_130_and_leaves_nothing(sd1, tmp_path, bar, longer):
    out = tmp_path / "out.safetensors"
    args = erase_args(sd1, out, *longer)  # the phase under test made long enough to be interrupted
    process = subprocess.Popen(
        [sys.executable, "-m", "erase_engine", *map(str, args)], stderr=subprocess.PIPE, text=True
    )
    progress = ""
    while bar not in progress:  # tqdm's bar for the phase appears once it has started
        char = process.stderr.read(1)
        assert char, f"the CLI ended early: {progress}"
        progress += char
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    err = progress + process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "interrupted; nothing was saved" in err, err
    assert "Traceback" not in err and leftovers(tmp_path) == []
    assert bar == "erasing" or "erasing" not in err  # stopped in the cache, before any training step
