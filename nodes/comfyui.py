"""ComfyUI nodes: each one translates its inputs and calls ``erase_engine``."""

from __future__ import annotations

from dataclasses import dataclass

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import numpy as np
import torch

from ..erase_engine.comfy_denoiser import ComfyDenoiser
from ..erase_engine.deltas import TRAINABLE_SETS
from ..erase_engine.export import lora_state_dict, model_file_path, save_checkpoint, save_lora
from ..erase_engine.objective import PRESETS
from ..erase_engine.purify import purify
from ..erase_engine.report import before_after_images, grid_image
from ..erase_engine.trainer import PRESET_VALUE, EraseConfig, Erasure, erase_concept

CATEGORY = "concept erasing"
ATTACHMENT = "concept_erasure"  # the ERASURE rides on the erased MODEL too, for Purify Image


@dataclass
class ErasureResult:
    """The ERASURE type: the trained deltas plus the model description the exports record."""

    erasure: Erasure
    denoiser: ComfyDenoiser


def comfy_patches(erasure: Erasure) -> dict[str, torch.Tensor]:
    """The erasure as a kohya-keyed state dict ComfyUI's LoRA loader applies
    (full-rank deltas as exact ``.diff`` patches)."""
    if erasure.deltas.is_lora:
        return lora_state_dict(erasure)
    return {f"{key}.diff": erasure.deltas.delta(key).detach() for key in erasure.deltas.deltas}


def image_batch(picture) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: [1, H, W, 3] floats in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def advanced(value: float, tooltip: str) -> tuple:
    return ("FLOAT", {"default": value, "min": -1.0, "max": 100.0, "step": 0.05, "advanced": True, "tooltip": tooltip})


class EraseConcept:
    CATEGORY = CATEGORY
    FUNCTION = "erase"
    RETURN_TYPES = ("MODEL", "ERASURE", "IMAGE")
    RETURN_NAMES = ("erased_model", "erasure", "preview")
    OUTPUT_TOOLTIPS = (
        "The input model with the erasure applied as a patch (the input model is unchanged).",
        "The trained deltas, for Save Erased LoRA / Save Erased Checkpoint / Purify Image.",
        "Before (top) and after (bottom) for the erased and preserved prompts, same seeds.",
    )
    DESCRIPTION = "Erase a concept from the model (All but One, AAAI 2024), optionally replacing it."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "clip": ("CLIP",),
                "erase": ("STRING", {"default": "", "tooltip": "The concept to erase, e.g. 'Van Gogh'."}),
                "alternative": ("STRING", {"default": "", "tooltip": "What to draw instead (empty: nothing)."}),
                "preserve": ("STRING", {"default": "", "multiline": True, "tooltip": "Prompts to keep, one per line."}),
                "method": (sorted(PRESETS), {"default": "surgical"}),
                "trainable": (list(TRAINABLE_SETS), {"default": "xattn", "tooltip": "Which UNet layers change."}),
                "lora_rank": ("INT", {"default": 4, "min": 0, "max": 256, "tooltip": "0: full-rank deltas."}),
                "steps": ("INT", {"default": 200, "min": 1, "max": 100000}),
                "learning_rate": ("FLOAT", {"default": 1e-4, "min": 1e-7, "max": 1.0, "step": 1e-5, "round": 1e-7}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
            },
            "optional": {
                "vae": ("VAE", {"tooltip": "Decodes the preview (without it, a rough latent preview)."}),
                "eta": advanced(PRESET_VALUE, "Negative guidance on the erased concept (-1: the method's)."),
                "lambda_u": advanced(PRESET_VALUE, "Weight of the unconditional-score term (-1: the method's)."),
                "lambda_p": advanced(PRESET_VALUE, "Weight of the preserve term (-1: the method's)."),
                "trajectories": ("INT", {"default": 4, "min": 1, "max": 64, "advanced": True}),
                "sampler_steps": ("INT", {"default": 50, "min": 1, "max": 1000, "advanced": True}),
                "sampler_cfg": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 30.0, "step": 0.5, "advanced": True}),
                "resolution": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 4096,
                        "step": 8,
                        "advanced": True,
                        "tooltip": "Image size the erasure trains at (0: the model's native).",
                    },
                ),
            },
        }

    def erase(
        self,
        model,
        clip,
        erase,
        alternative,
        preserve,
        method,
        trainable,
        lora_rank,
        steps,
        learning_rate,
        seed,
        vae=None,
        eta=PRESET_VALUE,
        lambda_u=PRESET_VALUE,
        lambda_p=PRESET_VALUE,
        trajectories=4,
        sampler_steps=50,
        sampler_cfg=3.0,
        resolution=0,
    ):
        config = EraseConfig.from_form(
            erase,
            alternative,
            preserve,
            lora_rank,
            resolution,
            method=method,
            train=trainable,
            steps=steps,
            lr=learning_rate,
            seed=seed,
            eta=eta,
            lambda_u=lambda_u,
            lambda_p=lambda_p,
            trajectories=trajectories,
            sampler_steps=sampler_steps,
            sampler_cfg=sampler_cfg,
        )
        bar = comfy.utils.ProgressBar(steps)

        def progress(step: int, total: int, losses: dict[str, float]) -> None:
            comfy.model_management.throw_exception_if_processing_interrupted()
            bar.update_absolute(step, total)

        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs autograd
            denoiser = ComfyDenoiser(model, clip, vae)
            erasure = erase_concept(denoiser, config, progress=progress)
            prompts = list(dict.fromkeys(config.erase + config.preserve[:3]))
            seeds = [seed + i for i in range(2)]
            before, after = before_after_images(denoiser, erasure, prompts, seeds, steps=sampler_steps)
        erased_model, _ = comfy.sd.load_lora_for_models(model, None, comfy_patches(erasure), 1.0, 0)
        result = ErasureResult(erasure, denoiser)
        erased_model.set_attachments(ATTACHMENT, result)
        return (erased_model, result, image_batch(grid_image(prompts, before, after)))


def save_into(folder_kind: str) -> tuple:
    return ("STRING", {"default": "erased", "tooltip": f"File name in the first '{folder_kind}' folder (no path)."})


class SaveNode:
    """What the two save nodes share: an output node returning the path it wrote."""

    CATEGORY = CATEGORY
    FUNCTION = "save"
    OUTPUT_NODE = True
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)

    @staticmethod
    def written(path) -> dict:
        return {"ui": {"text": [path.name]}, "result": (str(path),)}


class SaveErasedLoRA(SaveNode):
    DESCRIPTION = "Write the erasure as a kohya LoRA into models/loras (an existing file is never overwritten)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "erasure": ("ERASURE",),
                "name": save_into("loras"),
                "svd_rank": (
                    "INT",
                    {
                        "default": 16,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "LoRA rank for full-rank deltas (LoRA deltas keep theirs).",
                    },
                ),
            }
        }

    def save(self, erasure: ErasureResult, name: str, svd_rank: int):
        path = model_file_path(folder_paths.get_folder_paths("loras")[0], name)
        written = save_lora(erasure.erasure, erasure.denoiser, path, svd_rank=svd_rank, if_exists="number")
        return self.written(written)


class SaveErasedCheckpoint(SaveNode):
    DESCRIPTION = "Write model + erasure as one checkpoint into models/checkpoints (never overwriting)."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model the erasure was trained on (not the erased one)."}),
                "clip": ("CLIP",),
                "vae": ("VAE",),
                "erasure": ("ERASURE",),
                "name": save_into("checkpoints"),
            }
        }

    def save(self, model, clip, vae, erasure: ErasureResult, name: str):
        path = model_file_path(folder_paths.get_folder_paths("checkpoints")[0], name)
        denoiser = ComfyDenoiser(model, clip, vae)
        if denoiser.info.architecture != erasure.denoiser.info.architecture:
            raise ValueError(
                f"this erasure was trained on an {erasure.denoiser.info.architecture} model, "
                f"the MODEL given is {denoiser.info.architecture}"
            )
        written = save_checkpoint(erasure.erasure, denoiser, path, if_exists="number")
        return self.written(written)


class PurifyImage:
    CATEGORY = CATEGORY
    FUNCTION = "purify"
    RETURN_TYPES = ("IMAGE",)
    DESCRIPTION = "DDIM-invert the image with the original model, regenerate it with the erased one."

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "vae": ("VAE",),
                "clip": ("CLIP",),
                "model": ("MODEL", {"tooltip": "The original model."}),
                "prompt": ("STRING", {"default": "", "multiline": True, "tooltip": "What the image shows."}),
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
                "strength": (
                    "FLOAT",
                    {
                        "default": 0.7,
                        "min": 0.05,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "How far to invert: more removes more, keeps less.",
                    },
                ),
            },
            "optional": {
                "erasure": ("ERASURE",),
                "erased_model": ("MODEL", {"tooltip": "Instead of ERASURE: the MODEL output of Erase Concept."}),
            },
        }

    def purify(self, image, vae, clip, model, prompt, steps, strength, erasure=None, erased_model=None):
        if erasure is None and erased_model is not None:
            erasure = erased_model.get_attachment(ATTACHMENT)
        if erasure is None:
            raise ValueError("connect an ERASURE, or the erased MODEL that Erase Concept returned")
        with torch.inference_mode(False):
            denoiser = ComfyDenoiser(model, clip, vae)
            deltas = erasure.erasure.deltas.to(denoiser.device)
            images = image.movedim(-1, 1)[:, :3].clone()
            purified = purify(denoiser, images, [prompt] * len(images), deltas, steps, strength)
        return (purified.movedim(1, -1).cpu(),)


NODE_CLASS_MAPPINGS = {
    "AllButOneEraseConcept": EraseConcept,
    "AllButOneSaveErasedLoRA": SaveErasedLoRA,
    "AllButOneSaveErasedCheckpoint": SaveErasedCheckpoint,
    "AllButOnePurifyImage": PurifyImage,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AllButOneEraseConcept": "Erase Concept",
    "AllButOneSaveErasedLoRA": "Save Erased LoRA",
    "AllButOneSaveErasedCheckpoint": "Save Erased Checkpoint",
    "AllButOnePurifyImage": "Purify Image",
}
