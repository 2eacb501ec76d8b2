"""Exports: a kohya-format LoRA and a single-file checkpoint, with header metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from . import __version__
from .deltas import LoRADelta
from .denoiser import Denoiser
from .ldm_layout import UNET_PREFIX
from .trainer import Erasure

_ARCHITECTURE = {  # (kohya ss_base_model_version, modelspec architecture)
    "sd1": ("sd_v1", "stable-diffusion-v1"),
    "sd2": ("sd_v2", "stable-diffusion-v2"),
    "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base"),
}


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of a full delta: ``up @ down ~= delta`` (kohya shapes)."""
    matrix = delta.detach().float().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
    extra = (1,) * (delta.ndim - 2)
    return down.reshape(rank, *delta.shape[1:]), up.reshape(*up.shape, *extra)


def lora_state_dict(erasure: Erasure, svd_rank: int | None = None) -> dict[str, torch.Tensor]:
    """``lora_unet_<ldm path>.lora_down.weight / .lora_up.weight / .alpha``.

    LoRA deltas are stored as trained; full-rank deltas are factored by SVD at
    ``svd_rank`` (alpha = rank, so the file's scale is 1).
    """
    deltas = erasure.deltas
    if not deltas.is_lora and not svd_rank:
        raise ValueError("full-rank deltas need a rank for the LoRA export (SVD extraction)")
    state = {}
    for key, module in deltas.deltas.items():
        if isinstance(module, LoRADelta):
            down, up, alpha = module.factors()
        else:
            down, up = svd_factors(module(), svd_rank)
            alpha = float(down.shape[0])
        state[f"{key}.lora_down.weight"] = down.float().cpu().contiguous()
        state[f"{key}.lora_up.weight"] = up.float().cpu().contiguous()
        state[f"{key}.alpha"] = torch.tensor(alpha)
    return state


def merged_state_dict(erasure: Erasure, denoiser: Denoiser) -> dict[str, torch.Tensor]:
    """The whole model in the original layout with ``W + delta`` in the UNet."""
    state = dict(denoiser.original_state_dict())
    for key, layer in erasure.deltas.layers.items():
        name = f"{UNET_PREFIX}{layer.ldm_name}.weight"
        if name not in state:
            raise KeyError(f"{name} is not in the model's original state dict")
        base = state[name]
        merged = base.float() + erasure.deltas.delta(key).detach().float().cpu().reshape(base.shape)
        state[name] = merged.to(base.dtype)
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def model_architecture(denoiser: Denoiser) -> str:
    """The modelspec architecture of a model (its LoRAs add ``/lora``)."""
    architecture = _ARCHITECTURE[denoiser.info.architecture][1]
    if denoiser.info.architecture == "sd2" and denoiser.schedule.prediction_type == "v_prediction":
        architecture += "-768-v"
    return architecture


def check_lora_base(metadata: dict[str, str], denoiser: Denoiser) -> None:
    """Refuse a LoRA whose header says it was made for another kind of model."""
    made_for = metadata.get("modelspec.architecture", "").removesuffix("/lora")
    if made_for and made_for != model_architecture(denoiser):
        raise ValueError(f"this LoRA was made for another base model ({made_for}), not {model_architecture(denoiser)}")


def erasure_metadata(
    erasure: Erasure, denoiser: Denoiser, title: str, lora: tuple[int, float] | None = None
) -> dict[str, str]:
    """Header metadata: what was erased, how, from which model (all values are strings).

    ``lora`` is the exported (rank, alpha) for a LoRA file, None for a checkpoint.
    """
    config, objective, info = erasure.config, erasure.objective, denoiser.info
    kohya_version = _ARCHITECTURE[info.architecture][0]
    spec_architecture = model_architecture(denoiser)
    erased = ", ".join(f"{e} -> {a}" if a else e for e, a in config.pairs())
    description = f"'{erased}' erased with {config.method} ({config.train}, {config.steps} steps)."
    hyperparameters = {**config.as_dict(), "eta": objective.eta, "lambda_u": objective.lambda_u}
    hyperparameters["lambda_p"] = objective.lambda_p
    metadata = {
        "erasure.engine": "erase_engine",
        "erasure.engine_version": __version__,
        "erasure.method": "all-but-one guidance surgery (AAAI 2024)",
        "erasure.preset": config.method,
        "erasure.erase": json.dumps(config.erase),
        "erasure.into": json.dumps(config.into),
        "erasure.preserve": json.dumps(config.preserve),
        "erasure.hyperparameters": json.dumps(hyperparameters, sort_keys=True),
        "erasure.base_model": info.name,
        "erasure.base_model_sha256": denoiser.sha256,
        "erasure.final_loss": json.dumps(erasure.losses[-1] if erasure.losses else {}),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": spec_architecture + ("/lora" if lora else ""),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title,
        "modelspec.description": description,
        "modelspec.resolution": f"{info.resolution}x{info.resolution}",
        "modelspec.prediction_type": "v" if denoiser.schedule.prediction_type == "v_prediction" else "epsilon",
    }
    if lora:
        metadata |= {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(lora[0]),
            "ss_network_alpha": str(lora[1]),
            "ss_base_model_version": kohya_version,
            "ss_v2": str(info.architecture == "sd2"),
            "ss_sd_model_name": info.name,
            "ss_new_sd_model_hash": denoiser.sha256,
            "ss_output_name": title,
            "ss_steps": str(config.steps),
            "ss_max_train_steps": str(config.steps),
            "ss_learning_rate": str(config.lr),
            "ss_unet_lr": str(config.lr),
            "ss_text_encoder_lr": "0",
            "ss_network_train_unet_only": "True",
            "ss_seed": str(config.seed),
            "ss_training_comment": description,
            "ss_tag_frequency": json.dumps({"erased": {e: 1 for e in config.erase}}),
        }
    return metadata


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
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; a model file is as readable as any other
    try:
        save_file(state, temporary, metadata=metadata)
        _sort_header(temporary)
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


def save_lora(
    erasure: Erasure, denoiser: Denoiser, path: str | Path, svd_rank: int | None = None, if_exists: str = "refuse"
) -> Path:
    state = lora_state_dict(erasure, svd_rank)
    rank = max(int(v.shape[0]) for k, v in state.items() if k.endswith("lora_down.weight"))
    alpha = erasure.deltas.alpha if erasure.deltas.is_lora else float(svd_rank)
    metadata = erasure_metadata(erasure, denoiser, Path(path).stem, lora=(rank, alpha))
    return write_safetensors(state, path, metadata, if_exists)


def save_checkpoint(erasure: Erasure, denoiser: Denoiser, path: str | Path, if_exists: str = "refuse") -> Path:
    from .loading import CONFIG_METADATA_KEY

    metadata = erasure_metadata(erasure, denoiser, Path(path).stem)
    configs = getattr(denoiser, "diffusers_configs", None)
    if configs is not None:  # lets this engine reload the file offline whatever its size
        metadata[CONFIG_METADATA_KEY] = json.dumps(configs(), sort_keys=True, default=str)
    return write_safetensors(merged_state_dict(erasure, denoiser), path, metadata, if_exists)


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
