"""Model files: reading state dicts, writing them atomically, the names a user may give
them, and their hashes."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a ``.safetensors`` or ``.ckpt`` file.

    A ``.ckpt`` is unpickled with ``weights_only=True``: a file that holds code is refused.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as error:
            raise ValueError(
                f"{path.name} is not a readable .safetensors file (corrupt or truncated?): {error}"
            ) from None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path.name} holds more than weights and is refused (convert it to .safetensors): {error}"
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path.name} is not a readable .ckpt file (corrupt or truncated?): {error}") from None
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path.name} holds no state dict")
    return checkpoint.get("state_dict", checkpoint), {}


IF_EXISTS = ("refuse", "number", "replace")


def write_safetensors(
    state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str], if_exists: str = "refuse"
) -> Path:
    """Write atomically: a temporary file beside the target, flushed, then given its name.

    ``if_exists``: ``"refuse"`` raises FileExistsError if the name is taken, ``"number"``
    takes the first free ``<stem>_2``, ``<stem>_3``, ... and ``"replace"`` overwrites.  The
    name is claimed atomically (a hard link), so two writers never take the same name.
    Returns the path written.  On any failure, nothing is left behind; temporaries left by
    a killed writer are removed by the next write into the folder.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists must be one of {IF_EXISTS}")
    if path.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {path.name}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} does not exist")
    if if_exists == "refuse" and path.exists():
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    _remove_stale_temporaries(path.parent)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=PARTIAL, dir=path.parent)
    os.close(descriptor)
    try:
        save_file(state, temporary, metadata=metadata)
        _sort_header(temporary)
        # mkstemp and safetensors make 0600; a model file gets the mode a plain write gives (the umask's)
        os.chmod(temporary, 0o666 & ~current_umask())
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())  # on disk before it gets its name: a crash never leaves a short model file
        if if_exists == "replace":
            os.replace(temporary, path)
        else:
            path = _link_to_free_name(temporary, path, numbered=if_exists == "number")
    finally:
        Path(temporary).unlink(missing_ok=True)  # after a link it is only a second name
    return path


PARTIAL = ".partial"


def current_umask() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return umask


def _remove_stale_temporaries(folder: Path) -> None:
    """Temporaries whose writer process is gone (killed between write and rename)."""
    for candidate in folder.glob(f".*{PARTIAL}"):
        pid = candidate.name.removesuffix(PARTIAL).split(".")[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            candidate.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _link_to_free_name(source: str, path: Path, numbered: bool) -> Path:
    candidate, number = path, 1
    while True:
        try:
            os.link(source, candidate)  # fails if the name exists: no check-then-write race
            return candidate
        except FileExistsError:
            if not numbered:
                raise FileExistsError(f"{path} exists; choose another name or allow overwriting") from None
            number += 1
            candidate = path.with_name(f"{path.stem}_{number}{path.suffix}")


def _sort_header(path: str) -> None:
    """Rewrite the JSON header with sorted keys, in place and at the same length.

    safetensors writes its header from a hash map whose order changes from one
    process to the next; sorted, the same erasure gives the same bytes.
    """
    with open(path, "r+b") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
        ordered = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(ordered) > length:
            raise RuntimeError("the sorted safetensors header does not fit in place")
        f.seek(8)
        f.write(ordered.ljust(length, b" "))


WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def model_file_path(folder: str | Path, name: str) -> Path:
    """``folder/<name>.safetensors`` for a name a user typed, refused unless it stays inside ``folder``."""
    stem = name.strip().removesuffix(".safetensors")
    problem = None
    if not stem:
        problem = "it is empty"
    elif any(c in "/\\:" for c in stem) or stem.startswith(".") or any(ord(c) < 32 for c in stem):
        problem = "it holds a path separator, a colon, a control character or a leading dot"
    elif stem.split(".")[0].lower() in WINDOWS_RESERVED:
        problem = f"{stem.split('.')[0]!r} is a reserved file name on Windows"
    elif len(stem.encode()) > 200:
        problem = "it is longer than 200 bytes"
    if problem:
        raise ValueError(f"the output name {name!r} cannot be used: {problem}")
    return Path(folder) / f"{stem}.safetensors"


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(module: nn.Module) -> str:
    """A hash of a module's weights, for models that did not come from a file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
