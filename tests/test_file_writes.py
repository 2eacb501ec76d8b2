"""Writing files: atomic, never clobbering, nothing left by a failed or killed writer, and
headers that store what a user typed faithfully and stay small."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support import FAST, ROOT
from support.cli_runs import erase_args, leftovers, run

from erase_engine.files import write_safetensors


def test_disk_full_while_writing_leaves_nothing(sd1, tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = run(capsys, *erase_args(sd1, tmp_path / "out.safetensors"))
    assert code == 1 and "No space left on device" in err and "nothing was saved" in err, err
    assert leftovers(tmp_path) == []


def test_a_writer_killed_before_the_rename_leaves_a_temporary_the_next_write_removes(tmp_path):
    child = f"""
import os, sys, torch
sys.path.insert(0, {str(ROOT)!r})
from erase_engine import files
os.replace = lambda *a: os.kill(os.getpid(), 9)  # killed between the write and the rename
files.write_safetensors({{"x": torch.zeros(4)}}, {str(tmp_path / "model.safetensors")!r}, {{}}, "replace")
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    stale = [p for p in leftovers(tmp_path) if p.endswith(".partial")]
    assert len(stale) == 1 and stale[0].startswith(".model.")  # hidden, and no loader lists .partial files
    write_safetensors({"y": torch.ones(2)}, tmp_path / "other.safetensors", {})
    assert leftovers(tmp_path) == ["other.safetensors"]


@pytest.mark.parametrize("if_exists", ["refuse", "number"])
def test_two_writers_of_the_same_name_never_clobber_each_other(tmp_path, if_exists):
    path, results, barrier = tmp_path / "same.safetensors", [], threading.Barrier(4)

    def writer(value: float) -> None:
        barrier.wait()
        try:
            results.append(write_safetensors({"v": torch.full((1000,), value)}, path, {}, if_exists))
        except FileExistsError as error:
            results.append(error)

    threads = [threading.Thread(target=writer, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = [r for r in results if isinstance(r, Path)]
    values = sorted(float(load_file(p)["v"][0]) for p in written)
    assert values == sorted(set(values))  # every file holds one writer's data, whole
    if if_exists == "refuse":
        assert len(written) == 1 and sum(isinstance(r, FileExistsError) for r in results) == 3
    else:
        assert sorted(p.name for p in written) == [
            "same.safetensors",
            "same_2.safetensors",
            "same_3.safetensors",
            "same_4.safetensors",
        ]
    assert not [p for p in leftovers(tmp_path) if p.endswith(".partial")]


UNTRUSTED = [
    'Van Gogh", "erasure.preset": "esd',  # would close the JSON string if it were pasted in
    "line one\nline two\r\n\ttabbed",
    "日本語のプロンプト 🎨 émigré",
    "<script>alert(1)</script> ${HOME} $(rm -rf /) `id` %s {0}",
    "\\u0000 backslashes \\\\ and a real NUL-free end",
]


def test_untrusted_prompts_are_stored_faithfully_and_never_interpreted(sd1, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    args = [
        "--model",
        sd1,
        "--erase",
        UNTRUSTED[0],
        "--into",
        UNTRUSTED[2],
        "--preserve",
        *UNTRUSTED[1:],
        "--out",
        out,
        *FAST,
    ]
    code, err = run(capsys, *args)
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["erasure.erase"]) == [UNTRUSTED[0]]
    assert json.loads(metadata["erasure.into"]) == [UNTRUSTED[2]]
    assert json.loads(metadata["erasure.preserve"]) == [p.strip() for p in UNTRUSTED[1:]]
    assert metadata["erasure.preset"] == "surgical"  # the quote in the prompt did not reach the structure


def test_metadata_stays_bounded_at_the_largest_allowed_input(sd1, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    preserve = [f"{i:02d}" + "p" * 998 for i in range(64)]
    code, err = run(
        capsys,
        "--model",
        sd1,
        "--erase",
        "e" * 1000,
        "--into",
        "i" * 1000,
        "--preserve",
        *preserve,
        "--out",
        out,
        *FAST,
        "--steps",
        "1",
    )
    assert code == 0, err
    header = int.from_bytes(out.read_bytes()[:8], "little")
    assert header < 300_000, header  # 66 prompts of 1,000 characters, each stored a few times, and no more


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_written_model_gets_the_mode_a_plain_write_would_give(tmp_path, umask):
    """Other accounts (a file browser, another user of a shared server) read model files as
    they read any other file: the umask decides, not the temporary file's 0600."""
    previous = os.umask(umask)
    try:
        for if_exists in ("refuse", "replace"):
            path = write_safetensors({"x": torch.zeros(2)}, tmp_path / f"{if_exists}.safetensors", {}, if_exists)
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, if_exists
    finally:
        os.umask(previous)
