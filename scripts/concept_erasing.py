"""Automatic1111 / Forge extension: the Concept Erasing tab, on the model the user has loaded.

The host loads this file by path; the engine rides in the extension folder beside it.
"""

import sys
from pathlib import Path

EXTENSION = Path(__file__).resolve().parent.parent
if str(EXTENSION) not in sys.path:
    sys.path.insert(0, str(EXTENSION))

import torch  # noqa: E402
from modules import script_callbacks, sd_models, shared  # noqa: E402  (provided by A1111 / Forge)
from modules.call_queue import queue_lock  # noqa: E402
from modules.processing import StableDiffusionProcessing, StableDiffusionProcessingTxt2Img  # noqa: E402

from erase_engine.denoiser import Denoiser  # noqa: E402
from erase_engine.frontends.web import Host, build_ui  # noqa: E402

FORGE = hasattr(sd_models, "forge_model_reload")


def unmerge_loras(sd_model) -> None:
    """A1111 leaves the last generation's LoRAs merged into the weights until a forward pass
    without them; take them out now, as that pass would (Forge keeps a clean copy instead)."""
    try:
        import networks  # A1111's built-in Lora extension
    except ImportError:  # disabled: nothing was merged
        return
    networks.loaded_networks.clear()
    with torch.no_grad():
        for module in sd_model.modules():
            if getattr(module, "network_current_names", ()):
                networks.network_restore_weights_from_backup(module)
                module.network_current_names = ()


# The hosts' caches of the last prompts' conditioning (class attributes each new generation takes)
PROMPT_CACHES = {
    StableDiffusionProcessing: ("cached_c", "cached_uc"),
    StableDiffusionProcessingTxt2Img: ("cached_hr_c", "cached_hr_uc"),
}


def forget_cached_prompts() -> None:
    for owner, names in PROMPT_CACHES.items():
        for name in names:
            setattr(owner, name, [None] * len(getattr(owner, name)))


class A1111Host(Host):
    """The loaded ``shared.sd_model``; LoRAs into ``--lora-dir``, checkpoints into the
    checkpoint folder; progress and Interrupt through ``shared.state``.  An erasure holds
    the host's generation queue, so no generation changes the model meanwhile."""

    chooses_model = False

    def denoiser(self, model: str) -> Denoiser:
        with queue_lock:
            if FORGE:  # Forge loads the checkpoint picked in the dropdown lazily, at the next generation
                sd_models.forge_model_reload()
            sd_model = shared.sd_model
            if sd_model is None:
                raise ValueError("no model is loaded: pick one in the checkpoint dropdown first")
            info = getattr(sd_model, "sd_checkpoint_info", None)
            name, sha256 = getattr(info, "name_for_extra", None) or "loaded model", getattr(info, "sha256", None)
            if FORGE:
                from erase_engine.hosts.forge import ForgeDenoiser

                return ForgeDenoiser(sd_model, name, sha256)
            from erase_engine.hosts.a1111 import A1111Denoiser

            unmerge_loras(sd_model)
            return A1111Denoiser(sd_model, name, sha256)

    def folders(self, folder: str) -> tuple[Path, Path]:
        checkpoints = shared.cmd_opts.ckpt_dir or sd_models.model_path
        return Path(shared.cmd_opts.lora_dir), Path(checkpoints)

    def embeddings_folder(self, folder: str) -> Path:
        path = Path(shared.cmd_opts.embeddings_dir)
        path.mkdir(parents=True, exist_ok=True)  # the host's own folder, absent from a fresh data folder
        return path

    def begin(self, total: int) -> None:
        queue_lock.acquire()  # released in end(), on the same worker thread
        shared.state.begin(job="concept_erasing")
        shared.state.job_count = 1
        shared.state.sampling_steps = total

    def progress(self, step: int, total: int, text: str) -> None:
        shared.state.sampling_steps, shared.state.sampling_step = total, step
        shared.state.textinfo = f"Concept erasing: {text}"

    def interrupted(self) -> bool:
        return bool(shared.state.interrupted)

    def end(self) -> None:
        try:
            shared.state.end()
        finally:
            queue_lock.release()

    def saved(self, kind: str, path: Path, denoiser: Denoiser) -> None:
        if kind == "embedding":  # its word works in the next prompt, without a restart
            if FORGE:  # Forge reads its embeddings folder only when it loads a model: tell the loaded one
                from erase_engine.hosts.forge import load_embedding

                # (the model loaded now: a checkpoint switch since the erasure made a new one)
                load_embedding(shared.sd_model, path)
            # (A1111 rescans its embeddings folder before each generation.)  Both keep the last
            # prompts' conditioning by their text: the word would read as before its embedding.
            forget_cached_prompts()
            return
        if kind == "checkpoint":
            if FORGE and denoiser.schedule.prediction_type == "v_prediction":
                from erase_engine.hosts.forge import write_v_prediction_config

                write_v_prediction_config(path)
            sd_models.list_models()  # the checkpoint dropdown's refresh now lists it
            return
        try:
            import networks  # A1111's built-in Lora extension, on sys.path when it is enabled
        except ImportError:
            return
        networks.list_available_networks()  # usable as <lora:name:1> at once

    def on_model_loaded(self, callback) -> None:
        # every load: A1111's switch to a checkpoint of the same architecture, Forge's new engine
        script_callbacks.on_model_loaded(lambda sd_model: callback())


def on_ui_tabs():
    return [(build_ui(A1111Host()), "Concept Erasing", "concept_erasing")]


script_callbacks.on_ui_tabs(on_ui_tabs)
