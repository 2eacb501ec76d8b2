"""Bad input, interruption and faults: a clear message, the right exit code, no file,
no temporary, and the model untouched.  Each row of README's "What a user sees" table is
one case here (the ids are the table's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from erase_engine import cli
from erase_engine.denoiser import weights_sha256
from erase_engine.export import write_safetensors
from erase_engine.loading import CONFIG_METADATA_KEY

FAST = ["--steps", "2", "--trajectories", "1", "--sampler-steps", "2", "--lr", "1e-3"]


def run(capsys, *args) -> tuple[int, str]:
    """The CLI in this process (the model loads in a second, not the subprocess's ten)."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def sd1(tiny_model_dirs):
    return tiny_model_dirs["sd1"]


@pytest.fixture
def sd1_file(tiny_model_dirs, tmp_path_factory):
    """The tiny SD1 model as a single file in the original layout."""
    from erase_engine import load_denoiser

    path = tmp_path_factory.mktemp("single") / "tiny-sd1.safetensors"
    model = load_denoiser(tiny_model_dirs["sd1"])
    state = {k: v.contiguous() for k, v in model.original_state_dict().items()}
    save_file(state, str(path), {CONFIG_METADATA_KEY: json.dumps(model.diffusers_configs(), default=str)})
    return path


def erase_args(model, out, *extra):
    return ["--model", model, "--erase", "a cat", "--out", out, *FAST, *extra]


# (id, extra CLI arguments replacing the defaults, what the message says)
BAD_FLAGS = [
    ("empty-erase", ["--erase", ""], "non-empty concept"),
    ("blank-erase", ["--erase", "   "], "non-empty concept"),
    ("alternative-is-erase", ["--erase", "a cat", "--into", "A Cat"], "is the concept being erased"),
    ("preserve-has-erase", ["--erase", "a cat", "--preserve", "a dog", "a cat"], "preserve list contains"),
    ("zero-steps", ["--steps", "0"], "steps must be at least 1"),
    ("negative-steps", ["--steps", "-5"], "steps must be at least 1"),
    ("zero-rank", ["--lora-rank", "0"], "LoRA rank must be at least 1"),
    ("negative-rank", ["--lora-rank", "-2"], "LoRA rank must be at least 1"),
    ("rank-too-large", ["--lora-rank", "100000"], "larger than layer"),
    ("zero-lr", ["--lr", "0"], "learning rate must be positive"),
    ("negative-lr", ["--lr=-1e-4"], "learning rate must be positive"),
    ("nan-lr", ["--lr", "nan"], "learning rate must be positive"),
    ("zero-alpha", ["--lora-alpha", "0"], "alpha must be positive"),
    ("zero-trajectories", ["--trajectories", "0"], "trajectories must be at least 1"),
    ("zero-sampler-steps", ["--sampler-steps", "0"], "sampler_steps must be at least 1"),
    ("negative-cfg", ["--sampler-cfg", "-1"], "CFG scale must be zero or more"),
    ("resolution-not-multiple-of-8", ["--resolution", "60"], "multiple of 8"),
    ("prompt-too-long", ["--erase", "x" * 1001], "limited to 1000 characters"),
    ("too-many-preserve", ["--preserve", *[f"p{i}" for i in range(65)]], "at most 64 preserve prompts"),
    ("esd-with-alternative", ["--method", "esd", "--into", "a dog"], "without an alternative"),
    ("unknown-method", ["--method", "magic"], "invalid choice"),
    ("unknown-trainable-set", ["--train", "everything"], "invalid choice"),
    ("output-not-safetensors", ["--out", "{tmp}/x.pt"], "must name a .safetensors file"),
    ("output-folder-missing", ["--out", "{tmp}/nowhere/x.safetensors"], "does not exist"),
]


@pytest.mark.parametrize("flags, message", [row[1:] for row in BAD_FLAGS], ids=[row[0] for row in BAD_FLAGS])
def test_bad_flags_are_refused_before_any_work(sd1, tmp_path, capsys, flags, message):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    code, err = run(capsys, *erase_args(sd1, tmp_path / "out.safetensors"), *flags)
    assert code == 2 and message in err, err
    assert "Traceback" not in err
    assert leftovers(tmp_path) == []


def write_keys(path: Path, keys: list[str]) -> Path:
    save_file({k: torch.zeros(2, 2) for k in keys}, str(path))
    return path


# A checkpoint file holding one key of another model family, and what the message names.
FOREIGN_CHECKPOINTS = {
    "sd3-checkpoint": ("model.diffusion_model.joint_blocks.0.x.weight", "Stable Diffusion 3 checkpoints"),
    "flux-checkpoint": ("double_blocks.0.img_attn.qkv.weight", "Flux checkpoints"),
    "sdxl-refiner": ("conditioner.embedders.0.model.ln_final.weight", "SDXL refiner checkpoints"),
    "unknown-checkpoint": ("foo.weight", "not a checkpoint of a supported model"),
}
BAD_MODELS = {
    "model-missing": (lambda tmp: tmp / "nowhere", "no model at"),
    "model-folder-without-index": (lambda tmp: tmp, "neither a diffusers folder"),
    "model-wrong-file-type": (lambda tmp: (tmp / "m.txt").write_text("hi") and tmp / "m.txt", "neither a diffusers"),
    "corrupt-safetensors": (
        lambda tmp: (
            (tmp / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
            and tmp / "bad.safetensors"
        ),
        "not a readable .safetensors file",
    ),
    **{
        name: (lambda tmp, key=key: write_keys(tmp / "model.safetensors", [key]), message)
        for name, (key, message) in FOREIGN_CHECKPOINTS.items()
    },
}


@pytest.mark.parametrize("make, message", list(BAD_MODELS.values()), ids=list(BAD_MODELS))
def test_bad_models_are_refused_with_the_reason(tmp_path, capsys, make, message):
    folder = tmp_path / "models"
    folder.mkdir()
    model = make(folder)
    out = tmp_path / "out.safetensors"
    code, err = run(capsys, *erase_args(model, out))
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not out.exists()


def test_truncated_checkpoint_is_refused(sd1_file, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(sd1_file.read_bytes()[: sd1_file.stat().st_size // 2])
    code, err = run(capsys, *erase_args(truncated, tmp_path / "out.safetensors"))
    assert code == 2 and "not a readable .safetensors file" in err, err


def test_checkpoint_with_missing_keys_is_refused(sd1_file, tmp_path, capsys):
    state = load_file(sd1_file)
    del state[next(k for k in state if k.startswith("model.diffusion_model.") and "attn2.to_k" in k)]
    incomplete = tmp_path / "incomplete.safetensors"
    with safe_open(str(sd1_file), "pt") as f:
        save_file(state, str(incomplete), f.metadata())
    code, err = run(capsys, *erase_args(incomplete, tmp_path / "out.safetensors"))
    assert code == 2 and "lacks 1 UNet weights" in err, err


def test_checkpoint_of_another_shape_is_refused(sd1_file, tmp_path, capsys):
    odd = tmp_path / "odd.safetensors"
    save_file(load_file(sd1_file), str(odd))  # no header: read as a standard SD1.5, which it is not
    code, err = run(capsys, *erase_args(odd, tmp_path / "out.safetensors"))
    assert code == 2 and "do not fit the model's shapes" in err and "Traceback" not in err, err


def test_ckpt_with_code_is_refused(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": Payload()}, path)
    code, err = run(capsys, *erase_args(path, tmp_path / "out.safetensors"))
    assert code == 2 and "holds more than weights" in err, err
    assert not (tmp_path / "pwned").exists()


def test_existing_output_is_kept_unless_overwrite(sd1, tmp_path, capsys):
    out = tmp_path / "mine.safetensors"
    out.write_bytes(b"the user's file")
    code, err = run(capsys, *erase_args(sd1, out))
    assert code == 2 and "exists; pass --overwrite" in err and out.read_bytes() == b"the user's file"
    code, err = run(capsys, *erase_args(sd1, out, "--overwrite"))
    assert code == 0, err
    assert load_file(out)  # replaced by a real LoRA


@pytest.fixture
def sd1_lora(sd1, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("lora") / "cat.safetensors"
    assert run(capsys, *erase_args(sd1, out))[0] == 0
    return out


def purify(capsys, model, lora, image, out) -> tuple[int, str]:
    return run(
        capsys,
        "purify",
        "--model",
        model,
        "--lora",
        lora,
        "--image",
        image,
        "--prompt",
        "a cat",
        "--out",
        out,
        "--steps",
        "2",
    )


def test_purify_refuses_a_lora_for_another_base_model(tiny_model_dirs, sd1_lora, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), "red").save(image)
    code, err = purify(capsys, tiny_model_dirs["sd2"], sd1_lora, image, tmp_path / "out.png")
    assert code == 2 and "made for another base model" in err, err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.parametrize(
    "content, message",
    [(b"not an image", "not an image"), (None, "not a readable")],
    ids=["image-not-an-image", "lora-corrupt"],
)
def test_purify_refuses_unreadable_inputs(sd1, sd1_lora, tmp_path, capsys, content, message):
    image, lora = tmp_path / "in.png", sd1_lora
    if content is None:
        Image.new("RGB", (32, 32), "red").save(image)
        lora = tmp_path / "corrupt.safetensors"
        lora.write_bytes(sd1_lora.read_bytes()[:100])
    else:
        image.write_bytes(content)
    code, err = purify(capsys, sd1, lora, image, tmp_path / "out.png")
    assert code == 2 and message in err, err
    assert not (tmp_path / "out.png").exists()


def test_purify_converts_any_size_and_mode(sd1, sd1_lora, tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGBA", (17, 23), (255, 0, 0, 128)).save(image)
    code, err = purify(capsys, sd1, sd1_lora, image, tmp_path / "out.png")
    assert code == 0, err
    assert Image.open(tmp_path / "out.png").size == (17, 23)


def fault_in_the_loop(monkeypatch, fault, at_call: int):
    """Make the denoiser's ``output`` fail (or return ``fault``) from its ``at_call``-th call."""
    from erase_engine.denoiser import Denoiser

    original, calls = Denoiser.output, {"n": 0}

    def output(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= at_call:
            if isinstance(fault, BaseException):
                raise fault
            return original(self, *args, **kwargs) * fault
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "output", output)


@pytest.mark.parametrize(
    "fault, message",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of memory: try fewer"),
        (float("nan"), "the loss became nan at step 1"),
        (float("inf"), "the loss became"),
    ],
    ids=["out-of-memory", "nan-loss", "inf-loss"],
)
def test_faults_in_the_loop_stop_at_once_keep_nothing_and_leave_the_model(
    sd1, tmp_path, capsys, monkeypatch, fault, message
):
    fault_in_the_loop(monkeypatch, fault, at_call=3)  # the first training call: the cache made 2 (CFG batched)
    code, err = run(capsys, *erase_args(sd1, tmp_path / "out.safetensors"))
    assert code == 1 and message in err, err
    assert "Traceback" not in err and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["text encoder", "sampler"])
def test_a_model_that_gives_nan_is_named_before_any_training(sd1, monkeypatch, where):
    """A1111's emphasis rescaling divides by the context's mean: a text encoder whose final
    layer norm has no bias gives a mean of 0, and NaN. Said as such, not as a learning rate."""
    from erase_engine import EraseConfig, erase_concept, load_denoiser
    from erase_engine.denoiser import Conditioning
    from erase_engine.trainer import ErasureFailed

    host = load_denoiser(sd1)
    if where == "text encoder":
        encode = type(host).encode
        monkeypatch.setattr(type(host), "encode", lambda self, p: Conditioning(encode(self, p).context / 0.0))
        message = "the model's text encoder gives NaN or inf for ''"
    else:
        fault_in_the_loop(monkeypatch, float("nan"), at_call=1)
        message = "the model's own samples became NaN or inf"
    steps = []
    config = EraseConfig(erase=["a cat"], steps=2, trajectories=1, sampler_steps=2)
    with pytest.raises(ErasureFailed, match=message):
        erase_concept(host, config, progress=lambda *args: steps.append(args))
    assert steps == []  # stopped before the first training step


def test_the_model_in_memory_is_unchanged_after_success_error_cancel_and_out_of_memory(sd1, monkeypatch):
    """The host's copy, bit for bit (all of it: UNet, VAE, text encoder), whatever the run's outcome."""
    from erase_engine import EraseConfig, ErasureCancelled, erase_concept, load_denoiser
    from erase_engine.trainer import ErasureFailed

    host = load_denoiser(sd1)
    modules = [host.unet, host.vae, *host.text_encoders]
    original = [weights_sha256(m) for m in modules]
    config = EraseConfig(erase=["a cat"], preserve=["a dog"], steps=3, trajectories=1, sampler_steps=2, lr=1e-2)
    assert erase_concept(host, config).losses  # success
    with pytest.raises(ErasureCancelled):
        erase_concept(host, config, should_stop=lambda: True)
    with pytest.raises(ValueError):
        erase_concept(host, EraseConfig(erase=["a cat"], train="xattn", lora_rank=10**6))
    for fault in (torch.OutOfMemoryError("CUDA out of memory"), float("nan")):
        with monkeypatch.context() as patch:
            fault_in_the_loop(patch, fault, at_call=3)
            with pytest.raises(ErasureFailed):
                erase_concept(host, config)
    assert [weights_sha256(m) for m in modules] == original
    assert all(p.grad is None for m in modules for p in m.parameters())  # no gradient reached the host either


def test_disk_full_while_writing_leaves_nothing(sd1, tmp_path, capsys, monkeypatch):
    import errno

    import safetensors.torch

    def full(state, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = run(capsys, *erase_args(sd1, tmp_path / "out.safetensors"))
    assert code == 1 and "No space left on device" in err and "nothing was saved" in err, err
    assert leftovers(tmp_path) == []


def test_ctrl_c_mid_run_exits_130_and_leaves_nothing(sd1, tmp_path):
    out = tmp_path / "out.safetensors"
    args = erase_args(sd1, out)
    args[args.index("--steps") + 1] = "100000"
    process = subprocess.Popen(
        [sys.executable, "-m", "erase_engine.cli", *map(str, args)], stderr=subprocess.PIPE, text=True
    )
    progress = ""
    while "erasing" not in progress:  # tqdm's bar appears once the model is loaded
        char = process.stderr.read(1)
        assert char, f"the CLI ended early: {progress}"
        progress += char
    time.sleep(1)
    process.send_signal(signal.SIGINT)
    err = progress + process.communicate(timeout=120)[1]
    assert process.returncode == 130 and "interrupted; nothing was saved" in err, err
    assert "Traceback" not in err and leftovers(tmp_path) == []


def test_a_writer_killed_before_the_rename_leaves_a_temporary_the_next_write_removes(tmp_path):
    child = f"""
import os, sys, torch
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from erase_engine import export
os.replace = lambda *a: os.kill(os.getpid(), 9)  # killed between the write and the rename
export.write_safetensors({{"x": torch.zeros(4)}}, {str(tmp_path / "model.safetensors")!r}, {{}}, "replace")
"""
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    stale = [p for p in leftovers(tmp_path) if p.endswith(".partial")]
    assert len(stale) == 1 and stale[0].startswith(".model.")  # hidden, and no loader lists .partial files
    write_safetensors({"y": torch.ones(2)}, tmp_path / "other.safetensors", {})
    assert leftovers(tmp_path) == ["other.safetensors"]


@pytest.mark.parametrize("if_exists", ["refuse", "number"])
def test_two_writers_of_the_same_name_never_clobber_each_other(tmp_path, if_exists):
    path, results, barrier = tmp_path / "same.safetensors", [], threading.Barrier(4)

    def writer(value: float) -> None:
        barrier.wait()
        try:
            results.append(write_safetensors({"v": torch.full((1000,), value)}, path, {}, if_exists))
        except FileExistsError as error:
            results.append(error)

    threads = [threading.Thread(target=writer, args=(float(i),)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    written = [r for r in results if isinstance(r, Path)]
    values = sorted(float(load_file(p)["v"][0]) for p in written)
    assert values == sorted(set(values))  # every file holds one writer's data, whole
    if if_exists == "refuse":
        assert len(written) == 1 and sum(isinstance(r, FileExistsError) for r in results) == 3
    else:
        assert sorted(p.name for p in written) == [
            "same.safetensors",
            "same_2.safetensors",
            "same_3.safetensors",
            "same_4.safetensors",
        ]
    assert not [p for p in leftovers(tmp_path) if p.endswith(".partial")]


UNTRUSTED = [
    'Van Gogh", "erasure.preset": "esd',  # would close the JSON string if it were pasted in
    "line one\nline two\r\n\ttabbed",
    "日本語のプロンプト 🎨 émigré",
    "<script>alert(1)</script> ${HOME} $(rm -rf /) `id` %s {0}",
    "\\u0000 backslashes \\\\ and a real NUL-free end",
]


def test_untrusted_prompts_are_stored_faithfully_and_never_interpreted(sd1, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    args = [
        "--model",
        sd1,
        "--erase",
        UNTRUSTED[0],
        "--into",
        UNTRUSTED[2],
        "--preserve",
        *UNTRUSTED[1:],
        "--out",
        out,
        *FAST,
    ]
    code, err = run(capsys, *args)
    assert code == 0, err
    with safe_open(str(out), "pt") as f:
        metadata = f.metadata()
    assert json.loads(metadata["erasure.erase"]) == [UNTRUSTED[0]]
    assert json.loads(metadata["erasure.into"]) == [UNTRUSTED[2]]
    assert json.loads(metadata["erasure.preserve"]) == [p.strip() for p in UNTRUSTED[1:]]
    assert metadata["erasure.preset"] == "surgical"  # the quote in the prompt did not reach the structure


def test_metadata_stays_bounded_at_the_largest_allowed_input(sd1, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    preserve = [f"{i:02d}" + "p" * 998 for i in range(64)]
    code, err = run(
        capsys,
        "--model",
        sd1,
        "--erase",
        "e" * 1000,
        "--into",
        "i" * 1000,
        "--preserve",
        *preserve,
        "--out",
        out,
        *FAST,
        "--steps",
        "1",
    )
    assert code == 0, err
    header = int.from_bytes(out.read_bytes()[:8], "little")
    assert header < 300_000, header  # 66 prompts of 1,000 characters, each stored a few times, and no more
