"""The denoiser adapter for Stable Diffusion WebUI Forge: its ``shared.sd_model``, used
as it is loaded.

Only importable inside a Forge process.  Forge's model is a ``ForgeDiffusionEngine``
whose UNet patcher holds a ``KModel``: ``apply_model`` takes a sigma and returns x0
(``SigmaDenoiser`` converts), the UNet keeps ldm's names, and its layers are Forge's
own Linear/Conv2d classes.  The adapter works on ``forge_objects_original``, the
checkpoint as loaded, without the LoRAs of the last generation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch
from backend import memory_management, utils
from backend.diffusion_engine.sd15 import StableDiffusion
from backend.diffusion_engine.sd20 import StableDiffusion2
from backend.diffusion_engine.sdxl import StableDiffusionXL
from backend.modules.k_prediction import Prediction

from ..denoiser import (
    Conditioning,
    copying_saved_activations,
    differentiable_encoding,
    single_token_id,
    to_signed_range,
    to_unit_range,
    token_rows,
    word_in_place,
)
from .sigma import SigmaDenoiser

# Forge's engine class -> the engine's architecture name
ARCHITECTURE = {StableDiffusion: "sd1", StableDiffusion2: "sd2", StableDiffusionXL: "sdxl"}
TRAINABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def write_v_prediction_config(checkpoint: Path) -> Path:
    """``name.yaml`` beside a v-prediction checkpoint: Forge's loader takes an SD2-v file's
    prediction type only from such a file (it guesses epsilon otherwise)."""
    config = checkpoint.with_suffix(".yaml")
    config.write_text("model:\n  params:\n    parameterization: v\n")
    return config


def model_family(engine) -> tuple[str, str]:
    """(architecture, prediction type), or a clear error for other models."""
    predictor = engine.forge_objects_original.unet.model.predictor
    prediction = getattr(predictor, "prediction_type", None)
    if (
        type(engine) not in ARCHITECTURE
        or type(predictor) is not Prediction
        or prediction not in ("epsilon", "v_prediction")
        or engine.is_inpaint
    ):
        raise ValueError(
            "concept erasing supports SD1.x, SD2.x and SDXL text-to-image models with a discrete eps or v "
            f"schedule; this model is {type(engine).__name__} with {type(predictor).__name__} {prediction!r}"
            + (" (an inpainting model)" if engine.is_inpaint else "")
        )
    return ARCHITECTURE[type(engine)], prediction


def text_engines(engine) -> list:
    """Forge's text processing engines, in the order of an embedding file's vectors."""
    if isinstance(engine, StableDiffusionXL):
        return [engine.text_processing_engine_l, engine.text_processing_engine_g]
    return [engine.text_processing_engine]


def load_embedding(engine, path: Path) -> None:
    """Load a textual-inversion file into ``engine``'s embedding databases, as Forge does with
    its embeddings folder when it loads a model (it does not rescan the folder later)."""
    for text in text_engines(engine):
        text.embeddings.load_from_file(str(path), path.name)


class ForgeDenoiser(SigmaDenoiser):
    def __init__(self, engine, name: str = "Forge model", sha256: str | None = None):
        architecture, prediction = model_family(engine)
        self.engine = engine
        self.objects = engine.forge_objects_original
        self.patcher = self.objects.unet
        self.base = self.patcher.model  # KModel
        self._use_model(self.base, self.base.predictor.sigmas, architecture, prediction, name)
        self.known_sha256 = sha256
        self._load()
        quantized = {str(layer.module.weight.dtype) for layer in self.unet_layers()} - set(map(str, TRAINABLE_DTYPES))
        if quantized:
            raise ValueError(
                f"this UNet's weights are stored as {', '.join(sorted(quantized))}; concept erasing trains on "
                "fp32, fp16 or bf16 weights: set Forge's 'Diffusion in Low Bits' to Automatic"
            )

    def _load(self) -> None:
        """The UNet, without the last generation's patches, on its device (as a generation would)."""
        memory_management.load_models_gpu([self.patcher])

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.computation_dtype

    @contextmanager
    def _original_objects(self) -> Iterator[None]:
        """The text encoder without LoRA patches: what Forge's processing itself sets before each batch."""
        current = self.engine.forge_objects
        self.engine.forge_objects = self.objects.shallow_copy()
        try:
            yield
        finally:
            self.engine.forge_objects = current

    def encode(self, prompts: list[str]) -> Conditioning:
        with torch.no_grad(), self._original_objects():
            cond = self.engine.get_learned_conditioning(prompts)
        return self._conditioning(cond)

    def _conditioning(self, cond) -> Conditioning:
        """The engine's form of what ``get_learned_conditioning`` returned."""
        self._load()  # the text encoder may have pushed the UNet off the device
        if isinstance(cond, dict):  # SDXL: context and the pooled/size vector
            return Conditioning(cond["crossattn"].to(self.device), {"y": cond["vector"].to(self.device)})
        return Conditioning(cond.to(self.device))

    def encode_with_embedding(self, prompts: list[str], word: str, vectors: list[torch.Tensor]) -> Conditioning:
        """As Forge puts a textual-inversion embedding in a prompt: its vectors take the places of
        the word's tokens in each encoder's token embeddings (before the position embeddings),
        and Forge's own text encoding reads them (SDXL: ``vectors`` for clip_l, then clip_g)."""
        with self._original_objects():
            self.engine.get_learned_conditioning([""])  # loads the encoder; its first call casts its tables to fp32
            tables = [
                (text.text_encoder.transformer.get_input_embeddings(), single_token_id(text.tokenizer, word))
                for text in text_engines(self.engine)
            ]
            # Forge declares get_learned_conditioning under inference mode: its undecorated function
            encode = partial(type(self.engine).get_learned_conditioning.__wrapped__, self.engine)
            with word_in_place(tables, vectors):
                cond = differentiable_encoding(encode, self.objects.clip.cond_stage_model, prompts)
        return self._conditioning(cond)

    def word_vectors(self, text: str) -> list[torch.Tensor]:
        return [
            token_rows(
                engine.text_encoder.transformer.get_input_embeddings().weight,
                engine.tokenizer(text, add_special_tokens=False)["input_ids"],
                text,
            ).float()
            for engine in text_engines(self.engine)
        ]

    def _predict(self, x_t, t, cond, weights):
        if not torch.is_grad_enabled():
            return super()._predict(x_t, t, cond, weights)
        # Forge's UNet is inference code: it adds residuals in place (``x += n``) after autograd
        # saved ``x``.  A pass that autograd records keeps copies of the activations it saves instead.
        with copying_saved_activations():
            return super()._predict(x_t, t, cond, weights)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self._original_objects():
            images = self.engine.decode_first_stage(latents.to(self.dtype))
        self._load()
        return to_unit_range(images)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        with self._original_objects():
            latents = self.engine.encode_first_stage(to_signed_range(images).to(self.device, self.dtype))
        self._load()
        return latents.to(self.device)

    def original_state_dict(self) -> dict[str, torch.Tensor]:
        """What Forge's own ``save_checkpoint`` writes, from the clean (LoRA-free) components."""
        memory_management.load_models_gpu([self.patcher, self.objects.clip.patcher])
        guess = type(self.engine).matched_guesses[0]
        clip = utils.get_state_dict_after_quant(self.objects.clip.cond_stage_model)
        return {
            **utils.get_state_dict_after_quant(self.base.diffusion_model, prefix="model.diffusion_model."),
            **guess.process_clip_state_dict_for_saving(self.engine, clip),
            **utils.get_state_dict_after_quant(self.objects.vae.first_stage_model, prefix="first_stage_model."),
        }
