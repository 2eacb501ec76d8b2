"""Data parallelism through torch.distributed (gloo, CPU): an erasure run by ``torchrun`` on two
processes writes the LoRA one process writes with the same global batch and seed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from support import ROOT

from erase_engine.parallel import Ranks

# Two concepts in two contexts and two preserve prompts: each step's batch of four erased
# prompts and two preserve prompts splits across the ranks; auto steps exercise the agreed stop.
RUN = [
    "--erase", "a cat", "a dog", "--contexts", "{}", "a photo of {}", "--preserve", "a car", "a tree",
    "--trajectories", "2", "--sampler-steps", "3", "--lr", "1e-3", "--max-steps", "6", "--stop-at", "0.9",
]  # fmt: skip
# The least a trained delta's largest entry moves (a LoRA's up starts at zero): the erasure
# trained, so the comparisons below can tell two erasures apart.
TRAINED = 1e-3
# Adam divides a step by the gradient's size, so an entry whose gradient is near zero, summed in
# another order, moves by another share of the rate: a whole tensor is compared, by its norm
# (measured on one CPU: 0.08 % apart on two processes, 0.25 % in pieces; where 1e-5 absolute per
# entry, or 1 % of the largest entry, held on others but not there).
RELATIVE_NORM = 0.02


def apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far ``b`` is from ``a``, relative to ``a``'s norm."""
    return float((a - b).norm() / a.norm().clamp_min(1e-30))


def run(*command: str) -> str:
    """What the command printed (it must succeed)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.parametrize("robust", ["off", "on"])
def test_two_processes_write_the_one_process_lora(sd1, tmp_path, robust):
    """(robust: every rank runs the same attack and draws the sentence each row of the whole
    batch asks the adversary's word in, so its rows are those of one process)"""
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    given = [*RUN, "--robust", robust]
    alone = run(sys.executable, "-m", "erase_engine", "--model", str(sd1), *given, "--out", str(one))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    shared = run(*torchrun, "-m", "erase_engine", "--model", str(sd1), *given, "--out", str(two))
    # the same steps, the same reason to stop and the same held-out score (its prompts split too)
    assert shared.splitlines()[0] == alone.splitlines()[0] and "held-out score" in alone
    single, parallel = load_file(one), load_file(two)
    assert single.keys() == parallel.keys()
    moved = max(float(t.abs().max()) for k, t in single.items() if k.endswith("lora_up.weight"))
    assert moved > TRAINED  # the erasure trained: the comparison can tell
    for key, tensor in single.items():
        assert apart(tensor, parallel[key]) <= RELATIVE_NORM, key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors", "two.safetensors"]  # rank 0 wrote


@pytest.mark.parametrize(("size", "count"), [(2, 5), (3, 7), (4, 2), (1, 4)])
def test_each_row_belongs_to_exactly_one_rank(size, count):
    everyone = [Ranks(r, size) for r in range(size)]
    assert sorted(i for r in everyone for i in r.own(count)) == list(range(count))
    shares = [range(count)[r.share(count)] for r in everyone]
    assert [i for s in shares for i in s] == list(range(count))  # contiguous, in order


@pytest.mark.parametrize("robust", ["off", "on"])
def test_a_batch_run_in_pieces_trains_the_same_deltas(sd1, monkeypatch, robust):
    """A step's rows split into pieces of one row of each kind (their gradients added) train
    what the whole batch in one call trains (robust: the adversary's rows too)."""
    from erase_engine import EraseConfig, erase_concept, load_denoiser, trainer

    denoiser = load_denoiser(sd1)
    config = EraseConfig(
        erase=["a cat", "a dog"],
        contexts=["{}", "a photo of {}"],
        preserve=["a car", "a tree", "a house"],
        steps=4,
        trajectories=2,
        sampler_steps=3,
        lr=1e-3,
        robust=robust,
    )
    gradients = []  # each step's, as the optimizer gets them
    adam_step = torch.optim.AdamW.step

    def recording_step(optimizer, *args, **kwargs):
        gradients.append([p.grad.clone() for group in optimizer.param_groups for p in group["params"]])
        return adam_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    whole = erase_concept(denoiser, config)
    first_step = gradients[0]
    calls = []
    piece = trainer.backward_piece
    monkeypatch.setattr(trainer, "backward_piece", lambda *a: calls.append(a[3]) or piece(*a))
    monkeypatch.setattr(trainer, "MICRO_BATCH_ROWS", 1)
    gradients.clear()
    split = erase_concept(denoiser, config)
    assert len(calls) == 4 * 4 and all(len(d.erase) == 1 and len(d.preserve) <= 1 for d in calls)
    # At the same weights the pieces' gradients add up to the batch's (float32 order alone: 3e-5 of
    # each tensor's largest entry measured; the LoRA's down projections get none yet, its up is zero).
    assert any(float(g.abs().max()) > 0 for g in first_step)
    for a, b in zip(first_step, gradients[0], strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-3 * float(a.abs().max()))
    for a, b in zip(whole.deltas.parameters(), split.deltas.parameters(), strict=True):
        assert apart(a, b) <= RELATIVE_NORM
    assert max(float(p.abs().max()) for p in whole.deltas.parameters()) > TRAINED
    assert [x["loss"] for x in split.losses] == pytest.approx([x["loss"] for x in whole.losses], rel=1e-4)
