"""The Concept Erasing interface: one gradio builder for the A1111/Forge tab and the
standalone app (``erase-concept ui``).  Runs on gradio 3.41 (A1111), 4.x (Forge) and later.

A ``Host`` says where the model comes from, where files go, and how the host shows
progress and asks to stop; everything else is the engine's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attack import AttackConfig, embedding_file_path, learn_attack, save_embedding
from ..builtin import BUILTIN_MODEL
from ..denoiser import Denoiser
from ..exports import save_checkpoint, save_lora
from ..files import model_file_path
from ..parameters import PARAMETERS, EraseConfig, Parameter
from ..purify import purify_picture
from ..report import attack_grid, before_after_images, grid_image, training_plot
from ..trainer import Erasure, ErasureCancelled, Progress, ProgressFn, erase_concept

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

    def embeddings_folder(self, folder: str) -> Path:
        """Where an attack's embedding goes."""
        return self.folders(folder)[0]

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
        """A LoRA, checkpoint or embedding of ``denoiser``'s model was written: refresh the host's lists."""

    def on_model_loaded(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` whenever the host loads a model (another checkpoint, or the same one
        anew): the model an earlier erasure was made on may be gone, or hold other weights."""


STOPPING = "Stopping after the current step..."


class SaveFailed(Exception):
    """Writing a result failed; says what, if anything, was written."""


@dataclass
class Job:
    """One long run (an erasure or an attack) in a worker thread; the interface polls it.
    ``work(progress, should_stop)`` is the engine's call."""

    work: Callable[[ProgressFn, Callable[[], bool]], object]
    steps: int  # at most, for the host's progress bar
    host: Host
    text: str = "sampling the trajectory cache..."
    result: Any = None
    error: str | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        self.host.begin(self.steps)
        try:
            self.result = self.work(self.progress, self.should_stop)
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
        elif where.phase == "saving":
            self.text = "saving and drawing the grid..."
        else:
            self.text = f"step {where.step}/{where.total}, loss {where.losses['loss']:.4g}"
            if where.score is not None:
                self.text += f", remaining {where.score.worst_remaining:.2f}"
        self.host.progress(where.step, where.total, self.text)

    def should_stop(self) -> bool:
        return self.stop.is_set() or self.host.interrupted()


class Session:
    """The interface's state: the running job and the last erasure."""

    def __init__(self, host: Host):
        self.host = host
        self.job: Job | None = None
        self.last: Erasure | None = None
        self.model_changed = False  # the host loaded a model since the last erasure
        self.lock = threading.Lock()
        host.on_model_loaded(self.forget_last)

    def forget_last(self) -> None:
        """The host loaded a model: the last erasure's model may be gone (Forge) or hold the new
        checkpoint's weights (A1111 loads them into the same model), so neither the attack nor
        purification may use it, and letting it go frees the old model's memory.  (Called on the
        host's thread, possibly while ``start`` holds the lock: it takes none.)"""
        if self.last is not None:
            self.last, self.model_changed = None, True
        if self.job is not None and self.job.done.is_set():
            self.job = None  # its result holds the old model too

    def no_erasure(self, then: str) -> str:
        """Why the attack or purification has no erasure to work on."""
        if self.model_changed:
            return f"The host loaded another model since the last erasure: run an erasure on it first, then {then}."
        return f"Run an erasure first, then {then}."

    def start(self, make_job: Callable[[], Job]) -> Job:
        """Make a job (loading the model) and run it, unless one is running (one at a time)."""
        with self.lock:
            if self.job is not None and not self.job.done.is_set():
                raise ValueError("an erasure or an attack is already running")
            self.job = job = make_job()
        threading.Thread(target=job.run, name="concept-erasing", daemon=True).start()
        return job

    @staticmethod
    def follow(job: Job, doing: str) -> Iterator[str]:
        """The job's status every half second until it ends."""
        while not job.done.wait(0.5):
            yield f"{doing}: {job.text}"

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

            def erasure_job() -> Job:
                denoiser = self.host.denoiser(model)

                def work(progress: ProgressFn, should_stop: Callable[[], bool]) -> tuple:
                    erasure = erase_concept(denoiser, config, progress, should_stop)
                    # saved and drawn inside the job, which holds the host's queue: no generation
                    # or checkpoint switch changes the model's weights meanwhile
                    progress(Progress("saving", 0, 1, {}))
                    written = self.write(erasure, outputs)
                    before, after = before_after_images(erasure, prompts, seeds)
                    return erasure, written, grid_image(prompts, before, after, seeds)

                return Job(work, config.most_steps, self.host)

            prompts = list(dict.fromkeys(config.erase + config.preserve[:3]))
            seeds = [config.seed, config.seed + 1]
            job = self.start(erasure_job)
        except (ValueError, FileNotFoundError, KeyError) as error:
            yield f"**Error:** {error}", None, None, None
            return
        for text in self.follow(job, f"Erasing '{config.erase[0]}'"):
            yield text, None, None, None
        if job.error is not None:
            yield f"**{job.error}**", None, None, None
            return
        erasure, written, grid = job.result
        self.last, self.model_changed = erasure, False
        summary = ", ".join(f"{kind} `{path}`" for kind, path in written.items()) or "nothing saved"
        files = [str(p) for p in written.values()] or None
        done = f"Done in {erasure.seconds['total']:.0f} s, {erasure.scores[-1][0]} steps ({erasure.stopped})"
        yield (
            f"{done}; held-out score: {erasure.score.summary()}. Saved: {summary}.",
            grid,
            training_plot(erasure),
            files,
        )

    def write(self, erasure: Erasure, outputs: dict[str, Path]) -> dict[str, Path]:
        written = {}
        try:
            if "lora" in outputs:
                written["lora"] = save_lora(erasure, outputs["lora"], svd_rank=16, if_exists="number")
            if "checkpoint" in outputs:
                written["checkpoint"] = save_checkpoint(erasure, outputs["checkpoint"], if_exists="number")
        except OSError as error:
            kept = ", ".join(f"`{path}`" for path in written.values()) or "nothing"
            raise SaveFailed(f"could not save: {error}; written: {kept}") from error
        for kind, path in written.items():
            self.host.saved(kind, path, erasure.denoiser)
        return written

    def attack(self, concept: str, steps, tokens, name: str, folder: str):
        """Generator for the Attack button: (status, grid, file) updates.  Learns an embedding that
        brings the last erasure's concept back, saves it into the embeddings folder."""
        erasure = self.last
        if erasure is None:
            yield self.no_erasure("attack it: the attack is made against the last one"), None, None
            return
        try:
            config = AttackConfig.against(erasure.config, concept, steps=int(steps), tokens=int(tokens))
            path = embedding_file_path(self.host.embeddings_folder(folder), name)
            denoiser, deltas = erasure.denoiser, erasure.deltas

            def work(progress: ProgressFn, should_stop: Callable[[], bool]) -> tuple:
                attack = learn_attack(denoiser, deltas, config, progress, should_stop)
                progress(Progress("saving", 0, 1, {}))  # inside the job, as an erasure's (``erase``)
                try:
                    saved = save_embedding(attack, denoiser, path, if_exists="number")
                except OSError as error:
                    raise SaveFailed(f"could not save: {error}; nothing was written") from error
                self.host.saved("embedding", saved, denoiser)
                return attack, saved, attack_grid(denoiser, deltas, attack, [config.seed, config.seed + 1])

            job = self.start(lambda: Job(work, config.steps, self.host))
        except (ValueError, FileNotFoundError) as error:
            yield f"**Error:** {error}", None, None
            return
        for text in self.follow(job, f"Attacking the erasure of '{config.concept}'"):
            yield text, None, None
        if job.error is not None:
            yield f"**{job.error}**", None, None
            return
        attack, path, grid = job.result
        yield (
            f"Done in {attack.seconds:.0f} s: the embedding recovered {attack.recovered:.2f} of the concept "
            f"(0: no closer than its own words; 1: fully back). Saved `{path}`; in a prompt: `{path.stem}`.",
            grid,
            [str(path)],
        )

    def request_stop(self) -> None:
        """The Stop button: the running job says so in its own status stream, so this reply can never
        arrive after (and overwrite) the run's final "Stopped" message."""
        if self.job is not None and not self.job.done.is_set():
            self.job.stop.set()
            self.job.text = STOPPING

    def purify(self, image, prompt, steps, strength):
        erasure = self.last
        if image is None or erasure is None:
            return None, self.no_erasure("give an image") if erasure is None else "Give an image first."
        size = erasure.config.resolution  # the size it was trained at (None: the model's)

        def work(progress: ProgressFn, should_stop: Callable[[], bool]):
            return purify_picture(erasure.denoiser, image, prompt, erasure.deltas, int(steps), float(strength), size)

        try:  # a job, as an erasure: one at a time, holding the host's queue
            job = self.start(lambda: Job(work, int(steps), self.host, text="purifying..."))
        except ValueError as error:
            return None, f"**Error:** {error}"
        job.done.wait()
        if job.error is not None:
            return None, f"**{job.error}**"
        picture = job.result
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
        with gr.Accordion("Does it come back? Attack the last erasure", open=False, elem_id="ce_attack_section"):
            gr.Markdown(
                "Learns a textual-inversion embedding that asks the erased model for the concept again, "
                "and saves it into the embeddings folder. An embedding that brings the concept back proves "
                "that the erasure can be undone; one that does not is evidence, not proof, that it holds."
            )
            with gr.Row():
                attack_concept = gr.Textbox(
                    label="Concept", info="Empty: the erasure's first concept", elem_id="ce_attack_concept"
                )
                attack_steps = gr.Number(
                    value=AttackConfig.steps, precision=0, minimum=1, label="Attack steps", elem_id="ce_attack_steps"
                )
                attack_tokens = gr.Slider(1, 16, value=AttackConfig.tokens, step=1, label="Vectors")
                attack_name = gr.Textbox(label="Embedding name", value="attack", elem_id="ce_attack_name")
            with gr.Row():
                attack_button = gr.Button("Attack", elem_id="ce_attack")
                attack_stop = gr.Button("Stop", elem_id="ce_attack_stop")
            attack_status = gr.Markdown("", elem_id="ce_attack_status")
            with gr.Row():
                attack_image = gr.Image(
                    label="Original / erased / erased + attack (same seeds)",
                    type="pil",
                    interactive=False,
                    elem_id="ce_attack_grid",
                )
                attack_file = gr.File(label="Embedding", file_count="multiple", interactive=False)

        inputs = [form[name] for name in FORM]
        start.click(session.erase, inputs, [status, grid, losses, files])
        stop.click(session.request_stop, None, None, queue=False)
        purify_button.click(session.purify, [source, purify_prompt, purify_steps, strength], [purified, purify_status])
        attack_button.click(
            session.attack,
            [attack_concept, attack_steps, attack_tokens, attack_name, form["folder"]],
            [attack_status, attack_image, attack_file],
        )
        attack_stop.click(session.request_stop, None, None, queue=False)
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
