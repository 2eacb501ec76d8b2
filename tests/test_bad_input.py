"""Bad input: a clear message, exit code 2, no file and no temporary; each row of README's
"What a user sees" table is a case here (the ids are the table's)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.cli_runs import erase_args, leftovers, run

BAD_FLAGS = [
    ("empty-erase", ["--erase", ""], "non-empty concept"),
    ("blank-erase", ["--erase", "   "], "non-empty concept"),
    ("alternative-is-erase", ["--into", "A Cat"], "is the concept being erased"),  # the erased one is "a cat"
    ("preserve-has-erase", ["--preserve", "a dog", "a cat"], "preserve list contains"),
    (
        "preserve-is-in-a-context",
        ["--contexts", "{}", "a photo of {}", "--preserve", "a photo of a cat"],
        "in one of the contexts",
    ),
    ("erased-twice", ["--erase", "A Cat"], "listed twice"),
    ("list-without-alternative", ["--erase", "a dog =>"], "concept => alternative"),
    ("missing-list", ["--erase-file", "{tmp}/none.txt"], "cannot read"),
    ("context-without-concept", ["--contexts", "{}", "a photo"], "needs {} where the concept goes"),
    ("max-steps-over-the-range", ["--max-steps", "100001"], "max_steps must be between 1 and 100000, got 100001"),
    ("stop-at-zero", ["--stop-at", "0"], "stop_at must be between 0.01 and 1, got 0.0"),
    ("negative-steps", ["--steps", "-5"], "steps must be between 1 and 100000, got -5"),
    ("negative-rank", ["--lora-rank", "-2"], "lora_rank must be between 1 and 256, got -2"),
    ("rank-over-the-range", ["--lora-rank", "100000"], "lora_rank must be between 1 and 256"),
    ("rank-too-large-for-every-layer", ["--lora-rank", "200"], "larger than any selected layer"),
    ("lr-over-the-range", ["--lr", "2"], "lr must be between 1e-07 and 1, got 2.0"),
    ("negative-lr", ["--lr=-1e-4"], "lr must be between 1e-07 and 1, got -0.0001"),
    ("nan-lr", ["--lr", "nan"], "lr must be between 1e-07 and 1, got nan"),
    ("negative-alpha", ["--lora-alpha", "-1"], "lora_alpha must be between 0.001 and 4096"),
    ("zero-trajectories", ["--trajectories", "0"], "trajectories must be between 1 and 64"),
    ("zero-sampler-steps", ["--sampler-steps", "0"], "sampler_steps must be between 1 and 1000"),
    ("negative-cfg", ["--sampler-cfg", "-1"], "sampler_cfg must be between 0 and 30"),
    ("resolution-not-multiple-of-8", ["--resolution", "60"], "resolution must be a multiple of 8, got 60"),
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
