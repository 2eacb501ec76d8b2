"""The command line run in the test's own process (the model loads in a second, not the
ten a subprocess takes), and what a run left behind."""

from __future__ import annotations

from pathlib import Path

from erase_engine.frontends import cli

from . import FAST


def run(capsys, *args) -> tuple[int, str]:
    """The CLI's exit code and what it printed on stderr."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def erase_args(model, out, *extra):
    return ["--model", model, "--erase", "a cat", "--out", out, *FAST, *extra]
