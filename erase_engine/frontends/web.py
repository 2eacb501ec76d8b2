"""The Concept Erasing interface: one gradio builder for the A1111/Forge tab and the
standalone app (``erase-concept ui``).  Runs on gradio 3.41 (A1111), 4.x (Forge) and later.

A ``Host`` says where the model comes from, where files go, and how the host shows
progress and asks to stop; everything else is the engine's.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from ..builtin import BUILTIN_MODEL
from ..denoiser import Denoiser
from ..exports import save_checkpoint, save_lora
from ..files import model_file_path
from ..parameters import PARAMETERS, EraseConfig, Parameter
from ..purify import purify_picture
from ..report import before_after_images, grid_image, training_plot
from ..trainer import Erasure, ErasureCancelled, Progress, erase_concept

# The form's fields, in the order the Start button passes them.
FORM = ["model", "folder", *(spec.name for spec in PARAMETERS), "name", "want_lora", "want_checkpoint"]


class Host:
    """What the interface needs from the application it runs in (the standalone app's
    behaviour; the A1111/Forge host overrides it)."""

    title = "Concept Erasing"
    chooses_model = True  # show model and folder fields (the standalone app)
    default_model = BUILTIN_MODEL
    default_folder = "."

    def denoiser(self, model: str) -> Denoiser:
        raise NotImplementedError

    def folders(self, folder: str) -> tuple[Path, Path]:
        """(LoRA folder, checkpoint folder)."""
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise ValueError(f"the folder {folder!r} does not exist")
        return path, path

    def begin(self, total: int) -> None:
        """A job starts (the host's progress bar, its interrupt flag)."""

    def progress(self, step: int, total: int, text: str) -> None:
        """One step done: of the trajectory cache's sampler, then of training (``total`` changes)."""

    def interrupted(self) -> bool:
        """The host's own Interrupt button."""
        return False

    def end(self) -> None:
        """The job ended, however it ended."""

    def saved(self, kind: str, path: Path, denoiser: Denoiser) -> None:
        """A LoRA or checkpoint of ``denoiser``'s model was written: refresh the host's lists."""


STOPPING = "Stopping after the current step..."


@dataclass
class Job:
    """One erasure running in a worker thread; the interface polls it."""

    denoiser: Denoiser
    config: EraseConfig
    host: Host
    text: str = "sampling the trajectory cache..."
    erasure: Erasure | None = None
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.host.begin(self.config.steps or self.config.max_steps)
        try:
            self.erasure = erase_concept(self.denoiser, self.config, self.progress, self.should_stop)
        except ErasureCancelled as cancelled:
            self.error = f"Stopped: {cancelled}. Nothing was saved."
        except Exception as failure:  # shown in the interface; the host's model is untouched either way
            self.error = f"Failed: {failure}"
        finally:
            self.host.end()
            self.done.set()

    def progress(self, where: Progress) -> None:
        if self.stop.is_set():
            self.text = STOPPING
        elif where.phase == "sampling":
            self.text = f"sampling the trajectory cache ({where.step}/{where.total})"
        else:
            self.text = f"step {where.step}/{where.total}, loss {where.losses['loss']:.4g}"
            if where.score is not None:
                self.text += f", remaining {where.score.remaining:.2f}"
        self.host.progress(where.step, where.total, self.text)

    def should_stop(self) -> bool:
        return self.stop.is_set() or self.host.interrupted()


class Session:
    """The interface's state: the running job and the last result."""

    def __init__(self, host: Host):
        self.host = host
        self.job: Job | None = None
        self.last: Erasure | None = None
        self.lock = threading.Lock()

    def erase(self, *values):
        """Generator for the Start button (inputs in ``FORM`` order): (status, grid, loss plot, files) updates."""
        form = dict(zip(FORM, values, strict=True))
        model, folder, name = form.pop("model"), form.pop("folder"), form.pop("name")
        want_lora, want_checkpoint = form.pop("want_lora"), form.pop("want_checkpoint")
        try:
            config = EraseConfig.from_form(form)
            lora_folder, checkpoint_folder = self.host.folders(folder)
            outputs = {"lora": model_file_path(lora_folder, name)} if want_lora else {}
            if want_checkpoint:
                outputs["checkpoint"] = model_file_path(checkpoint_folder, name)
            yield "Loading the model...", None, None, None
            with self.lock:  # one erasure at a time per interface
                if self.job is not None and not self.job.done.is_set():
                    raise ValueError("an erasure is already running")
                self.job = job = Job(self.host.denoiser(model), config, self.host)
        except (ValueError, FileNotFoundError, KeyError) as error:
            yield f"**Error:** {error}", None, None, None
            return
        threading.Thread(target=job.run, name="concept-erasing", daemon=True).start()
        while not job.done.wait(0.5):
            yield f"Erasing '{config.erase[0]}': {job.text}", None, None, None
        if job.error is not None:
            yield f"**{job.error}**", None, None, None
            return
        plot = training_plot(job.erasure)
        yield "Saving and drawing the before/after grid...", None, plot, None
        try:
            written = self.write(job, outputs)
        except OSError as error:
            yield f"**Could not save:** {error}. Nothing was written.", None, plot, None
            return
        self.last = job.erasure
        prompts = list(dict.fromkeys(config.erase + config.preserve[:3]))
        seeds = [config.seed, config.seed + 1]
        before, after = before_after_images(job.erasure, prompts, seeds)
        summary = ", ".join(f"{kind} `{path}`" for kind, path in written.items()) or "nothing saved"
        files = [str(p) for p in written.values()] or None
        erasure = job.erasure
        done = f"Done in {erasure.seconds['total']:.0f} s, {erasure.scores[-1][0]} steps ({erasure.stopped})"
        yield (
            f"{done}; held-out score: {erasure.score.summary()}. Saved: {summary}.",
            grid_image(prompts, before, after, seeds),
            plot,
            files,
        )

    def write(self, job: Job, outputs: dict[str, Path]) -> dict[str, Path]:
        written = {}
        if "lora" in outputs:
            written["lora"] = save_lora(job.erasure, outputs["lora"], svd_rank=16, if_exists="number")
        if "checkpoint" in outputs:
            written["checkpoint"] = save_checkpoint(job.erasure, outputs["checkpoint"], if_exists="number")
        for kind, path in written.items():
            self.host.saved(kind, path, job.denoiser)
        return written

    def request_stop(self) -> None:
        """The Stop button: the running job says so in its own status stream, so this reply can never
        arrive after (and overwrite) the run's final "Stopped" message."""
        if self.job is not None and not self.job.done.is_set():
            self.job.stop.set()
            self.job.text = STOPPING

    def purify(self, image, prompt, steps, strength):
        if image is None or self.last is None:
            return None, "Run an erasure first, then give an image."
        erasure = self.last
        size = erasure.config.resolution  # the size it was trained at (None: the model's)
        picture = purify_picture(erasure.denoiser, image, prompt, erasure.deltas, int(steps), float(strength), size)
        return picture, "Purified."


def form_field(gr, spec: Parameter, default):
    """The gradio component of one erasure parameter (``ce_<name>`` is its element id)."""
    common = {"label": spec.form_label, "info": spec.help, "elem_id": f"ce_{spec.name}"}
    if spec.kind is str and spec.choices:
        return gr.Dropdown(list(spec.choices), value=default, **common)
    if spec.kind is str:
        return gr.Textbox(value=default, lines=3 if spec.multiline else 1, **common)
    limits = {"minimum": spec.form_minimum, "maximum": spec.maximum}
    if spec.slider:
        return gr.Slider(value=default, step=spec.step or 1, **limits, **common)
    return gr.Number(value=default, precision=0 if spec.kind is int else None, **limits, **common)


def build_ui(host: Host):
    """The interface as a ``gr.Blocks`` (not launched)."""
    import gradio as gr

    session = Session(host)
    form = {}  # the Start button's inputs, by FORM name
    with gr.Blocks(title=host.title, analytics_enabled=False) as blocks:
        gr.Markdown(f"## {host.title}\nRemove a concept from the model, keep everything else (All but One, AAAI 2024).")
        with gr.Row():
            with gr.Column():
                form["model"] = gr.Textbox(
                    elem_id="ce_model",
                    label="Model",
                    value=host.default_model,
                    visible=host.chooses_model,
                    info=f"diffusers folder, .safetensors / .ckpt file, or {BUILTIN_MODEL}",
                )
                form["folder"] = gr.Textbox(
                    label="Save into folder", value=host.default_folder, visible=host.chooses_model, elem_id="ce_folder"
                )
                for spec in PARAMETERS:
                    if not spec.advanced:
                        form[spec.name] = form_field(gr, spec, spec.default)
                with gr.Accordion("Advanced", open=False, elem_id="ce_advanced"):
                    for spec in PARAMETERS:
                        if spec.advanced:
                            form[spec.name] = form_field(gr, spec, spec.default)
                with gr.Row():
                    form["name"] = gr.Textbox(label="Output name", value="erased", elem_id="ce_name")
                    form["want_lora"] = gr.Checkbox(value=True, label="Save LoRA", elem_id="ce_want_lora")
                    form["want_checkpoint"] = gr.Checkbox(
                        value=False, label="Save checkpoint", elem_id="ce_want_checkpoint"
                    )
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="ce_start")
                    stop = gr.Button("Stop", elem_id="ce_stop")
            with gr.Column():
                status = gr.Markdown("Ready.", elem_id="ce_status")
                grid = gr.Image(label="Before / after (same seeds)", type="pil", interactive=False, elem_id="ce_grid")
                losses = gr.Image(label="Loss", type="pil", interactive=False)
                files = gr.File(label="Saved files", file_count="multiple", interactive=False, elem_id="ce_files")
        with gr.Accordion("Purify an image (with the last erasure)", open=False):
            with gr.Row():
                source = gr.Image(label="Image", type="pil")
                purified = gr.Image(label="Purified", type="pil", interactive=False)
            with gr.Row():
                purify_prompt = gr.Textbox(label="What the image shows")
                purify_steps = gr.Slider(1, 200, value=50, step=1, label="Steps")
                strength = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Strength")
                purify_button = gr.Button("Purify")
            purify_status = gr.Markdown("")

        inputs = [form[name] for name in FORM]
        start.click(session.erase, inputs, [status, grid, losses, files])
        stop.click(session.request_stop, None, None, queue=False)
        purify_button.click(session.purify, [source, purify_prompt, purify_steps, strength], [purified, purify_status])
    return blocks


class StandaloneHost(Host):
    """``erase-concept ui``: any model path, files into a folder the user picks."""

    def __init__(self, model: str = BUILTIN_MODEL, folder: str = ".", device: str = "cpu"):
        self.default_model, self.default_folder, self.device = model, folder, device
        self.loaded: dict[str, Denoiser] = {}

    def denoiser(self, model: str) -> Denoiser:
        from ..hosts.diffusers_loading import load_denoiser

        model = model.strip() or self.default_model
        if model not in self.loaded:
            self.loaded = {model: load_denoiser(model, device=self.device)}  # one model in memory at a time
        return self.loaded[model]


def launch(port: int, model: str, folder: str, device: str = "cpu", block: bool = True):
    """Serve the standalone app on 127.0.0.1 (loopback only: it reads and writes local files)."""
    blocks = build_ui(StandaloneHost(model, folder, device))
    blocks.queue()
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=not block, inbrowser=False)
    return blocks
