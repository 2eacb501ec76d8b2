"""Host servers (ComfyUI, Forge, A1111) started for a test, on a free loopback port."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running(
    name: str, command: list[str], cwd: str, log: Path, ready: Callable[[], bool], env: dict | None = None
) -> Iterator[subprocess.Popen]:
    """``command`` started in ``cwd`` (output into ``log``); entered once ``ready()``, stopped on exit."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{name} did not start:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)
