"""Automatic1111 extension: the Concept Erasing tab, on the model the user has loaded.

A1111 loads this file by path; the engine rides in the extension folder beside it.
"""

import sys
from pathlib import Path

EXTENSION = Path(__file__).resolve().parent.parent
if str(EXTENSION) not in sys.path:
    sys.path.insert(0, str(EXTENSION))

from modules import script_callbacks, sd_models, shared  # noqa: E402  (provided by A1111)

from erase_engine.a1111_denoiser import A1111Denoiser  # noqa: E402
from erase_engine.ui import Host, build_ui  # noqa: E402


class A1111Host(Host):
    """The loaded ``shared.sd_model``; LoRAs into ``--lora-dir``, checkpoints into the
    checkpoint folder; progress and Interrupt through ``shared.state``."""

    chooses_model = False

    def denoiser(self, model: str) -> A1111Denoiser:
        sd_model = shared.sd_model
        if sd_model is None:
            raise ValueError("no model is loaded: pick one in the checkpoint dropdown first")
        if getattr(sd_model, "forge_objects", None) is not None:
            raise ValueError("this is Forge's model object, which this release does not drive yet (see README)")
        info = getattr(sd_model, "sd_checkpoint_info", None)
        name = getattr(info, "name_for_extra", None) or "A1111 model"
        return A1111Denoiser(sd_model, name, getattr(info, "sha256", None))

    def folders(self, folder: str) -> tuple[Path, Path]:
        checkpoints = shared.cmd_opts.ckpt_dir or sd_models.model_path
        return Path(shared.cmd_opts.lora_dir), Path(checkpoints)

    def begin(self, total: int) -> None:
        shared.state.begin(job="concept_erasing")
        shared.state.job_count = 1
        shared.state.sampling_steps = total

    def progress(self, step: int, total: int, text: str) -> None:
        shared.state.sampling_step = step
        shared.state.textinfo = f"Concept erasing: {text}"

    def interrupted(self) -> bool:
        return bool(shared.state.interrupted)

    def end(self) -> None:
        shared.state.end()

    def saved(self, kind: str, path: Path) -> None:
        if kind == "checkpoint":
            sd_models.list_models()  # the checkpoint dropdown's refresh now lists it
            return
        try:
            import networks  # A1111's built-in Lora extension, on sys.path when it is enabled
        except ImportError:
            return
        networks.list_available_networks()  # usable as <lora:name:1> at once


def on_ui_tabs():
    return [(build_ui(A1111Host()), "Concept Erasing", "concept_erasing")]


script_callbacks.on_ui_tabs(on_ui_tabs)
