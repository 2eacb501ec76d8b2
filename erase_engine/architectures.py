"""The model families the engine erases from, and what each host's model tells about them.

Every host names its families its own way (ComfyUI's config class, Forge's engine class,
A1111's context width, a file's keys); each adapter maps its name to one row here, and
everything else (native resolution, the names the exports record) is read from the row.
"""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED = "Stable Diffusion 1.x, 2.x and XL"
LATENT_CHANNELS = 4  # every supported family's VAE
VAE_SCALE_FACTOR = 8  # image pixels per latent pixel, likewise


@dataclass(frozen=True)
class BaseModelInfo:
    """What an export records about the model the erasure started from."""

    name: str
    architecture: str  # "sd1", "sd2" or "sdxl"
    resolution: int  # native image size in pixels


@dataclass(frozen=True)
class Architecture:
    name: str  # "sd1", "sd2" or "sdxl": the engine's own name
    eps_resolution: int  # native image size of its epsilon-prediction models
    v_resolution: int  # and of its v-prediction models (SD2's 768-v)
    context_width: int  # the cross-attention context's width
    kohya_version: str  # kohya's ss_base_model_version
    modelspec: str  # modelspec.architecture of its checkpoints (its LoRAs add "/lora")
    lora_layout: str  # "diffusers" or "ldm": the module paths kohya's trainer names its LoRA keys by

    def resolution(self, prediction_type: str) -> int:
        return self.v_resolution if prediction_type == "v_prediction" else self.eps_resolution

    def modelspec_for(self, prediction_type: str) -> str:
        if self.name == "sd2" and prediction_type == "v_prediction":
            return self.modelspec + "-768-v"
        return self.modelspec

    def info(self, name: str, prediction_type: str) -> BaseModelInfo:
        return BaseModelInfo(name, self.name, self.resolution(prediction_type))


ARCHITECTURES = {
    a.name: a
    for a in (
        Architecture("sd1", 512, 512, 768, "sd_v1", "stable-diffusion-v1", "diffusers"),
        Architecture("sd2", 512, 768, 1024, "sd_v2", "stable-diffusion-v2", "diffusers"),
        Architecture("sdxl", 1024, 1024, 2048, "sdxl_base_v1-0", "stable-diffusion-xl-v1-base", "ldm"),
    )
}
