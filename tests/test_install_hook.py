"""``install.py``, the A1111/Forge installer hook, with the host's ``launch`` module
stood in for: it installs only what is missing, never a host-owned package nor diffusers
(which the tab does not use), and holds pip to every version already installed (so a
missing package cannot upgrade the host's)."""

from __future__ import annotations

import runpy
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
from support import ROOT


def run_hook(monkeypatch, installed: set[str]) -> list[tuple[str, str]]:
    """Run install.py with a ``launch`` whose only installed packages (by name) are ``installed``;
    return the pip calls, each with the constraints file's text at the time of the call."""
    calls = []

    def run_pip(command: str, description: str) -> None:
        constraints = Path(command.split(" -c ")[1].strip('"'))
        calls.append((command, constraints.read_text()))

    launch = types.SimpleNamespace(is_installed=lambda name: name in installed, run_pip=run_pip)
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(ROOT / "install.py"))
    return calls


def requirement_names() -> list[str]:
    lines = (line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines())
    return [line.split(">")[0].split("<")[0].split("=")[0] for line in lines if line]


def test_installs_each_missing_requirement_held_to_the_installed_versions(monkeypatch):
    names = requirement_names()
    assert {"diffusers", "safetensors", "tqdm"} <= set(names) and "torch" not in names
    calls = run_hook(monkeypatch, installed={"safetensors"})
    expected = [n for n in names if n not in {"safetensors", "transformers", "diffusers"}]
    assert expected and [command.split('"')[1].split(">")[0] for command, _ in calls] == expected
    for command, constraints in calls:
        assert command.startswith('install "') and " -c " in command
        pinned = dict(line.split("==", 1) for line in constraints.splitlines())
        assert pinned["torch"] == metadata.version("torch")  # the host's torch cannot move
        assert pinned["numpy"] == metadata.version("numpy")


def test_nothing_missing_means_no_pip_call(monkeypatch):
    assert run_hook(monkeypatch, installed=set(requirement_names())) == []


@pytest.mark.parametrize("owned", ["torch", "gradio", "transformers", "diffusers"])
def test_a_host_owned_package_or_diffusers_is_never_installed(monkeypatch, owned, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(f"{owned}>=1\n")
    monkeypatch.setattr(Path, "with_name", lambda self, name: requirements)
    assert run_hook(monkeypatch, installed=set()) == []
