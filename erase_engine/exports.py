"""Exports: a kohya-format LoRA and a single-file checkpoint, with header metadata."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .architectures import ARCHITECTURES
from .deltas import LoRADelta
from .denoiser import Denoiser
from .files import write_safetensors
from .ldm_layout import UNET_PREFIX
from .trainer import Erasure
from .version import __version__


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
    for key, module in deltas.by_layer.items():
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


def modelspec_architecture(denoiser: Denoiser) -> str:
    """The modelspec architecture of a model (its LoRAs add ``/lora``)."""
    return ARCHITECTURES[denoiser.info.architecture].modelspec_for(denoiser.schedule.prediction_type)


def check_lora_base(metadata: dict[str, str], denoiser: Denoiser) -> None:
    """Refuse a LoRA whose header says it was made for another kind of model."""
    made_for = metadata.get("modelspec.architecture", "").removesuffix("/lora")
    if made_for and made_for != modelspec_architecture(denoiser):
        raise ValueError(
            f"this LoRA was made for another base model ({made_for}), not {modelspec_architecture(denoiser)}"
        )


def erasure_metadata(
    erasure: Erasure, denoiser: Denoiser, title: str, lora: tuple[int, float] | None = None
) -> dict[str, str]:
    """Header metadata: what was erased, how, from which model (all values are strings).

    ``lora`` is the exported (rank, alpha) for a LoRA file, None for a checkpoint.
    """
    config, objective, info = erasure.config, erasure.objective, denoiser.info
    kohya_version = ARCHITECTURES[info.architecture].kohya_version
    spec_architecture = modelspec_architecture(denoiser)
    erased = ", ".join(f"{e} -> {a}" if a else e for e, a in config.pairs())
    description = f"'{erased}' erased with {config.method} ({config.train}, {erasure.scores[-1][0]} steps)."
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
        "erasure.score": json.dumps(erasure.score.as_dict()),
        "erasure.steps_run": str(erasure.scores[-1][0]),
        "erasure.stopped": erasure.stopped,
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
            "ss_steps": str(erasure.scores[-1][0]),
            "ss_max_train_steps": str(config.most_steps),
            "ss_learning_rate": str(config.lr),
            "ss_unet_lr": str(config.lr),
            "ss_text_encoder_lr": "0",
            "ss_network_train_unet_only": "True",
            "ss_seed": str(config.seed),
            "ss_training_comment": description,
            "ss_tag_frequency": json.dumps({"erased": {e: 1 for e in config.erase}}),
        }
    return metadata


def save_lora(erasure: Erasure, path: str | Path, svd_rank: int | None = None, if_exists: str = "refuse") -> Path:
    """The erasure as a kohya LoRA (full-rank deltas factored at ``svd_rank``)."""
    state = lora_state_dict(erasure, svd_rank)
    rank = max(int(v.shape[0]) for k, v in state.items() if k.endswith("lora_down.weight"))
    alpha = erasure.deltas.alpha if erasure.deltas.is_lora else float(svd_rank)
    metadata = erasure_metadata(erasure, erasure.denoiser, Path(path).stem, lora=(rank, alpha))
    return write_safetensors(state, path, metadata, if_exists)


def save_checkpoint(
    erasure: Erasure, path: str | Path, if_exists: str = "refuse", denoiser: Denoiser | None = None
) -> Path:
    """The model with the erasure merged, as one single-file checkpoint; ``denoiser`` is the
    model to merge into when it is not the one trained on (the same model, with its VAE)."""
    denoiser = denoiser or erasure.denoiser
    metadata = erasure_metadata(erasure, denoiser, Path(path).stem) | denoiser.reload_metadata()
    return write_safetensors(merged_state_dict(erasure, denoiser), path, metadata, if_exists)
