"""ComfyUI nodes (V3 schema, ``comfy_api.v0_0_2``): each one translates its inputs and calls
``erase_engine``.  The Erase Concept node's widgets are built from the parameter table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
import numpy as np
import torch
from comfy_api.v0_0_2 import ComfyExtension, io, ui

from ..erase_engine.attack import AttackConfig, embedding_file_path, learn_attack, save_embedding
from ..erase_engine.exports import lora_state_dict, save_checkpoint, save_lora
from ..erase_engine.files import model_file_path
from ..erase_engine.hosts.comfyui import ComfyDenoiser
from ..erase_engine.parameters import PARAMETERS, EraseConfig, Parameter
from ..erase_engine.purify import purify
from ..erase_engine.report import attack_grid, before_after_images, grid_image, training_plot
from ..erase_engine.trainer import Erasure, Progress, erase_concept

CATEGORY = "concept erasing"
ATTACHMENT = "concept_erasure"  # the ERASURE rides on the erased MODEL too, for Purify Image
ErasureType = io.Custom("ERASURE")  # an erase_engine.trainer.Erasure


def comfy_patches(erasure: Erasure) -> dict[str, torch.Tensor]:
    """The erasure as a kohya-keyed state dict ComfyUI's LoRA loader applies
    (full-rank deltas as exact ``.diff`` patches)."""
    if erasure.deltas.is_lora:
        return lora_state_dict(erasure)
    return {f"{key}.diff": erasure.deltas.delta(key).detach() for key in erasure.deltas.by_layer}


def image_batch(picture) -> torch.Tensor:
    """A PIL image as ComfyUI's IMAGE: [1, H, W, 3] floats in [0, 1]."""
    return torch.from_numpy(np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0)[None]


def progress_bar(sampler_steps: int, steps: int) -> Callable[[Progress], None]:
    """A progress callback for ComfyUI's bar over both phases (the trajectory cache's sampler
    steps, then training or attacking) that also answers Cancel in either phase."""
    total = sampler_steps + steps
    bar = comfy.utils.ProgressBar(total)

    def progress(where: Progress) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update_absolute(where.step if where.phase == "sampling" else sampler_steps + where.step, total)

    return progress


def show_text(node: type[io.ComfyNode], text: str) -> None:
    """Text under the running node, as ComfyUI's own nodes write theirs."""
    if node.hidden.unique_id is not None:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node.hidden.unique_id)


def given_erasure(erasure: Erasure | None, erased_model) -> Erasure:
    """The ERASURE input, or the one Erase Concept attached to its erased MODEL."""
    if erasure is None and erased_model is not None:
        erasure = erased_model.get_attachment(ATTACHMENT)
    if erasure is None:
        raise ValueError("connect an ERASURE, or the erased MODEL that Erase Concept returned")
    return erasure


def erasure_inputs() -> list[io.Input]:
    return [
        ErasureType.Input("erasure", optional=True),
        io.Model.Input("erased_model", optional=True, tooltip="Instead of ERASURE: the MODEL output of Erase Concept."),
    ]


def parameter_input(spec: Parameter) -> io.Input:
    """The widget of one erasure parameter; the advanced ones are optional inputs."""
    common = {"display_name": spec.form_label, "tooltip": spec.help, "optional": spec.advanced, "default": spec.default}
    if spec.choices:
        return io.Combo.Input(spec.name, options=list(spec.choices), **common)
    if spec.kind is str:
        return io.String.Input(spec.name, multiline=spec.multiline, **common)
    limits = {"min": spec.form_minimum, "max": spec.maximum}
    display = io.NumberDisplay.slider if spec.slider else None
    if spec.kind is int:
        control = True if spec.name == "seed" else None  # the seed's "control after generate" (fixed, increment, ...)
        return io.Int.Input(
            spec.name, step=spec.step, control_after_generate=control, display_mode=display, **limits, **common
        )
    finer = spec.minimum if 0 < spec.minimum < (spec.step or 0) else None  # lr: values below the widget's step
    return io.Float.Input(spec.name, step=spec.step, round=finer, display_mode=display, **limits, **common)


class EraseConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AllButOneEraseConcept",
            display_name="Erase Concept",
            category=CATEGORY,
            description="Erase a concept from the model (All but One, AAAI 2024), optionally replacing it.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip"),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the preview (without it, a rough latent preview)."),
                *(parameter_input(spec) for spec in PARAMETERS),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.Model.Output(
                    display_name="erased_model",
                    tooltip="The input model with the erasure applied as a patch (the input model is unchanged).",
                ),
                ErasureType.Output(
                    display_name="erasure",
                    tooltip="The trained deltas, for Save Erased LoRA / Save Erased Checkpoint / Purify Image.",
                ),
                io.Image.Output(
                    display_name="preview",
                    tooltip="Before (top) and after (bottom) for the erased and preserved prompts, same seeds.",
                ),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae=None, **values) -> io.NodeOutput:
        config = EraseConfig.from_form(values)
        most = config.most_steps  # auto may stop before its maximum
        bar = progress_bar(config.sampler_steps, most)
        shown = {}

        def progress(where: Progress) -> None:
            bar(where)
            if where.score is not None and where.score is not shown.get("score"):  # a new held-out score
                shown["score"] = where.score
                show_text(cls, f"step {where.step}/{most}: remaining {where.score.worst_remaining:.2f}")

        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs autograd
            erasure = erase_concept(ComfyDenoiser(model, clip, vae), config, progress=progress)
            prompts = list(dict.fromkeys(config.erase + config.preserve[:3]))
            seeds = [config.seed + i for i in range(2)]
            before, after = before_after_images(erasure, prompts, seeds, steps=config.sampler_steps)
        erased_model, _ = comfy.sd.load_lora_for_models(model, None, comfy_patches(erasure), 1.0, 0)
        erased_model.set_attachments(ATTACHMENT, erasure)
        show_text(cls, f"{erasure.scores[-1][0]} steps ({erasure.stopped})\nheld-out score: {erasure.score.summary()}")
        preview = image_batch(grid_image(prompts, before, after, seeds))
        curve = ui.PreviewImage(image_batch(training_plot(erasure)), cls=cls)  # as ComfyUI's training nodes do
        return io.NodeOutput(erased_model, erasure, preview, ui=curve)


def name_input(folder_kind: str) -> io.Input:
    return io.String.Input(
        "name", default="erased", tooltip=f"File name in the first '{folder_kind}' folder (no path)."
    )


def written(path) -> io.NodeOutput:
    """What a save node returns: the path, and the file name shown on the node."""
    return io.NodeOutput(str(path), ui={"text": [path.name]})


class SaveErasedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AllButOneSaveErasedLoRA",
            display_name="Save Erased LoRA",
            category=CATEGORY,
            description="Write the erasure as a kohya LoRA into models/loras (an existing file is never overwritten).",
            inputs=[
                ErasureType.Input("erasure"),
                name_input("loras"),
                io.Int.Input(
                    "svd_rank",
                    default=16,
                    min=1,
                    max=1024,
                    tooltip="LoRA rank for full-rank deltas (LoRA deltas keep theirs).",
                ),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, erasure: Erasure, name: str, svd_rank: int) -> io.NodeOutput:
        path = model_file_path(folder_paths.get_folder_paths("loras")[0], name)
        return written(save_lora(erasure, path, svd_rank=svd_rank, if_exists="number"))


class SaveErasedCheckpoint(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AllButOneSaveErasedCheckpoint",
            display_name="Save Erased Checkpoint",
            category=CATEGORY,
            description="Write model + erasure as one checkpoint into models/checkpoints (never overwriting).",
            inputs=[
                io.Model.Input("model", tooltip="The model the erasure was trained on (not the erased one)."),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                ErasureType.Input("erasure"),
                name_input("checkpoints"),
            ],
            outputs=[io.String.Output(display_name="path")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, erasure: Erasure, name: str) -> io.NodeOutput:
        path = model_file_path(folder_paths.get_folder_paths("checkpoints")[0], name)
        denoiser = ComfyDenoiser(model, clip, vae)
        trained_on = erasure.denoiser.info.architecture
        if denoiser.info.architecture != trained_on:
            raise ValueError(
                f"this erasure was trained on an {trained_on} model, the MODEL given is {denoiser.info.architecture}"
            )
        return written(save_checkpoint(erasure, path, if_exists="number", denoiser=denoiser))


class PurifyImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AllButOnePurifyImage",
            display_name="Purify Image",
            category=CATEGORY,
            description="DDIM-invert the image with the original model, regenerate it with the erased one.",
            inputs=[
                io.Image.Input("image"),
                io.Vae.Input("vae"),
                io.Clip.Input("clip"),
                io.Model.Input("model", tooltip="The original model."),
                io.String.Input("prompt", default="", multiline=True, tooltip="What the image shows."),
                io.Int.Input("steps", default=50, min=1, max=1000),
                io.Float.Input(
                    "strength",
                    default=0.7,
                    min=0.05,
                    max=1.0,
                    step=0.05,
                    tooltip="How far to invert: more removes more, keeps less.",
                ),
                *erasure_inputs(),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(
        cls, image, vae, clip, model, prompt, steps, strength, erasure=None, erased_model=None
    ) -> io.NodeOutput:
        erasure = given_erasure(erasure, erased_model)
        with torch.inference_mode(False):
            denoiser = ComfyDenoiser(model, clip, vae)
            deltas = erasure.deltas.to(denoiser.device)
            images = image.movedim(-1, 1)[:, :3].clone()
            purified = purify(denoiser, images, [prompt] * len(images), deltas, steps, strength)
        return io.NodeOutput(purified.movedim(1, -1).cpu())


class AttackErasure(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AllButOneAttackErasure",
            display_name="Attack Erasure (does it come back?)",
            category=CATEGORY,
            description="Learn a textual-inversion embedding that brings the erased concept back on the erased "
            "model, save it into models/embeddings, and show original / erased / erased + attack (same seeds).",
            inputs=[
                io.Model.Input("model", tooltip="The original model (the erasure's base)."),
                io.Clip.Input("clip"),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the grid (without it, a rough latent preview)."),
                io.String.Input("concept", default="", tooltip="The erased concept (empty: the erasure's first)."),
                io.String.Input(
                    "contexts",
                    default="{}",
                    multiline=True,
                    tooltip="Sentences to attack in, one a line; {} stands for the concept.",
                ),
                io.Int.Input("steps", default=AttackConfig.steps, min=1, max=100_000, tooltip="The attack's budget."),
                io.Int.Input("tokens", default=AttackConfig.tokens, min=1, max=16, tooltip="Vectors in the embedding."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.String.Input(
                    "name",
                    default="attack",
                    tooltip="File name in the first 'embeddings' folder; in a prompt: embedding:<name>.",
                ),
                *erasure_inputs(),
            ],
            hidden=[io.Hidden.unique_id],
            outputs=[
                io.Image.Output(
                    display_name="grid", tooltip="Original / erased / erased + attack for each context, same seeds."
                ),
                io.String.Output(display_name="path"),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(
        cls, model, clip, concept, contexts, steps, tokens, seed, name, vae=None, erasure=None, erased_model=None
    ) -> io.NodeOutput:
        erasure = given_erasure(erasure, erased_model)
        folder = Path(folder_paths.get_folder_paths("embeddings")[0])
        path = embedding_file_path(folder, name)
        folder.mkdir(parents=True, exist_ok=True)  # ComfyUI's own embeddings folder, absent in a bare install
        lines = contexts.splitlines()  # (blank lines dropped by the config)
        config = AttackConfig.against(erasure.config, concept, contexts=lines, tokens=tokens, steps=steps, seed=seed)
        with torch.inference_mode(False):
            denoiser = ComfyDenoiser(model, clip, vae)
            deltas = erasure.deltas.to(denoiser.device)
            progress = progress_bar(config.sampler_steps, config.steps)
            attack = learn_attack(denoiser, deltas, config, progress=progress)
            grid = attack_grid(denoiser, deltas, attack, [seed, seed + 1], steps=config.sampler_steps)
        path = save_embedding(attack, denoiser, path, if_exists="number")
        show_text(cls, f"recovered {attack.recovered:.2f} of the concept; in a prompt: embedding:{path.stem}")
        return io.NodeOutput(image_batch(grid), str(path), ui={"text": [path.name]})


class ConceptErasingExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [EraseConcept, SaveErasedLoRA, SaveErasedCheckpoint, PurifyImage, AttackErasure]


async def comfy_entrypoint() -> ConceptErasingExtension:
    return ConceptErasingExtension()
