"""Exports round-trip: the LoRA through an independent kohya loader, the checkpoint through our loader."""

import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file

from erase_engine import EraseConfig, erase_concept, load_denoiser, save_checkpoint, save_lora

UNET = "model.diffusion_model."


def apply_kohya_lora(original: dict, lora: dict) -> dict:
    """kohya semantics, written from the format: W += up @ down * alpha / rank, keys over ldm paths."""
    by_key = {
        "lora_unet_" + k[len(UNET) : -len(".weight")].replace(".", "_"): k for k in original if k.startswith(UNET)
    }
    merged = dict(original)
    for key in (k for k in lora if k.endswith(".lora_down.weight")):
        module = key[: -len(".lora_down.weight")]
        down, up = lora[key], lora[f"{module}.lora_up.weight"]
        alpha, rank = float(lora[f"{module}.alpha"]), down.shape[0]
        weight = merged[by_key[module]]  # KeyError here: a key that resolves to no module
        delta = (up.flatten(1) @ down.flatten(1)) * (alpha / rank)
        merged[by_key[module]] = weight + delta.reshape(weight.shape)
    return merged


def erase_tiny(denoiser, **overrides):
    settings = dict(
        erase=["a cat"], preserve=["a dog"], steps=4, lr=1e-2, trajectories=2, sampler_steps=4, train="full"
    )
    return erase_concept(denoiser, EraseConfig(**{**settings, **overrides}))


def probe(denoiser):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 8, 8, generator=generator)
    return x, torch.tensor([999, 500, 20]), denoiser.encode(["a cat", "a dog", ""])


# A trained LoRA is stored as trained; a full-rank delta goes through a float32 SVD
# (at full rank here, so only rounding separates it from the student).
@pytest.mark.parametrize("lora_rank, export_rank, atol", [(4, None, 1e-5), (None, 64, 1e-4)])
def test_lora_file_reproduces_the_student(tiny_denoiser, tmp_path, lora_rank, export_rank, atol):
    erasure = erase_tiny(tiny_denoiser, lora_rank=lora_rank)
    path = save_lora(erasure, tmp_path / "erased.safetensors", svd_rank=export_rank)
    lora = load_file(path)
    assert all(
        k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora
    )
    assert len(lora) == 3 * len(erasure.deltas.layers)

    merged = apply_kohya_lora(tiny_denoiser.original_state_dict(), lora)
    unet = UNet2DConditionModel.from_config(tiny_denoiser.unet.config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(merged, unet.config))
    x, t, cond = probe(tiny_denoiser)
    with torch.no_grad():
        loaded = unet(x, t, cond.context, added_cond_kwargs=cond.extras or None).sample
        student = tiny_denoiser.output(x, t, cond, erasure.deltas)
        teacher = tiny_denoiser.output(x, t, cond)
    assert (student - teacher).abs().max() > 1e-3  # the erasure changed something worth checking
    torch.testing.assert_close(loaded, student, rtol=1e-4, atol=atol)


def test_checkpoint_file_reloads_offline_as_the_student(tiny_denoiser, tmp_path):
    erasure = erase_tiny(tiny_denoiser)
    path = save_checkpoint(erasure, tmp_path / "erased.safetensors")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith(UNET) for k in keys) and any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith(("cond_stage_model.", "conditioner.embedders.")) for k in keys)

    reloaded = load_denoiser(path)
    assert reloaded.info.architecture == tiny_denoiser.info.architecture
    assert reloaded.schedule.prediction_type == tiny_denoiser.schedule.prediction_type
    x, t, cond = probe(tiny_denoiser)
    with torch.no_grad():
        student = tiny_denoiser.output(x, t, cond, erasure.deltas)
        again = reloaded.output(x, t, reloaded.encode(["a cat", "a dog", ""]))
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(reloaded.decode(latents), tiny_denoiser.decode(latents))
    torch.testing.assert_close(again, student, rtol=1e-4, atol=1e-5)


def test_metadata_describes_the_erasure(tiny_denoiser, tmp_path):
    erasure = erase_tiny(tiny_denoiser, lora_rank=4, into=["a cow"], steps=2)
    with safe_open(str(save_lora(erasure, tmp_path / "cat.safetensors")), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["erasure.erase"]) == ["a cat"] and json.loads(meta["erasure.into"]) == ["a cow"]
    assert json.loads(meta["erasure.preserve"]) == ["a dog"]
    hyper = json.loads(meta["erasure.hyperparameters"])
    assert hyper["eta"] == erasure.objective.eta and hyper["steps"] == 2 and hyper["lr"] == 1e-2
    assert meta["erasure.preset"] == "surgical" and meta["erasure.engine_version"]
    assert len(meta["erasure.base_model_sha256"]) == 64 and meta["erasure.base_model"] == tiny_denoiser.info.name
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["modelspec.architecture"].endswith("/lora") and meta["modelspec.title"] == "cat"


def test_failed_write_leaves_no_file(tiny_denoiser, tmp_path, monkeypatch):
    import safetensors.torch

    erasure = erase_tiny(tiny_denoiser, lora_rank=2, steps=1)

    def broken(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        save_lora(erasure, tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_lora_file_loads_back_as_deltas(tiny_denoiser, tmp_path):
    from erase_engine.deltas import WeightDeltas

    erasure = erase_tiny(tiny_denoiser, lora_rank=4, train="xattn")
    path = save_lora(erasure, tmp_path / "erased.safetensors")
    loaded = WeightDeltas.from_lora(tiny_denoiser.unet_layers(), load_file(path))
    assert loaded.layers.keys() == erasure.deltas.layers.keys()
    x, t, cond = probe(tiny_denoiser)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_denoiser.output(x, t, cond, loaded), tiny_denoiser.output(x, t, cond, erasure.deltas)
        )
    with pytest.raises(ValueError, match="match no layer"):
        WeightDeltas.from_lora(tiny_denoiser.unet_layers(), {"lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1)})


def test_keep_existing_gives_the_next_free_name_and_never_overwrites(tiny_denoiser, tmp_path):
    erasure = erase_tiny(tiny_denoiser, lora_rank=2, steps=1)
    target = tmp_path / "erased.safetensors"
    target.write_bytes(b"the user's own file")
    first = save_lora(erasure, target, if_exists="number")
    second = save_lora(erasure, target, if_exists="number")
    assert (first.name, second.name) == ("erased_2.safetensors", "erased_3.safetensors")
    assert target.read_bytes() == b"the user's own file"
    assert first.read_bytes() == second.read_bytes() and load_file(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "erased.safetensors",
        "erased_2.safetensors",
        "erased_3.safetensors",
    ]  # no temporary left


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("../outside", "separator"),
        ("/etc/passwd", "separator"),
        ("sub\\dir", "separator"),
        ("C:evil", "colon"),
        ("..", "leading dot"),
        (".hidden", "leading dot"),
        ("bad\0name", "control"),
        ("line\nbreak", "control"),
        ("CON", "reserved"),
        ("lpt1.backup", "reserved"),
        ("x" * 201, "longer than 200"),
    ],
)
def test_output_names_cannot_leave_the_model_folder(tmp_path, name, problem):
    from erase_engine.files import model_file_path

    with pytest.raises(ValueError, match=problem):
        model_file_path(tmp_path, name)


def test_plain_output_names_stay_in_the_folder(tmp_path):
    from erase_engine.files import model_file_path

    for name, expected in [
        ("van gogh", "van gogh.safetensors"),
        ("a.b.safetensors", "a.b.safetensors"),
        ("Kunstwerk-ü", "Kunstwerk-ü.safetensors"),
        ("console", "console.safetensors"),
    ]:
        path = model_file_path(tmp_path, name)
        assert path == tmp_path / expected and path.resolve().parent == tmp_path.resolve()
