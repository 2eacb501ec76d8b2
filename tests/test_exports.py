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


def kohya_keys(state: dict, prefix: str = "") -> dict[str, str]:
    """kohya's key for each weight of a state dict: ``lora_unet_`` and the module path with ``_``."""
    return {"lora_unet_" + k[len(prefix) : -len(".weight")].replace(".", "_"): k for k in state if k.startswith(prefix)}


def add_lora(state: dict, lora: dict, keys: dict[str, str]) -> tuple[dict, set[str]]:
    """kohya semantics, written from the format: W += up @ down * alpha / rank for the LoRA
    modules that ``keys`` resolves; returns the state and the modules applied."""
    merged, applied = dict(state), set()
    for module in (k.removesuffix(".lora_down.weight") for k in lora if k.endswith(".lora_down.weight")):
        if module in keys:
            down, up = lora[f"{module}.lora_down.weight"], lora[f"{module}.lora_up.weight"]
            weight = merged[keys[module]]
            delta = (up.flatten(1) @ down.flatten(1)) * (float(lora[f"{module}.alpha"]) / down.shape[0])
            merged[keys[module]] = weight + delta.reshape(weight.shape)
            applied.add(module)
    return merged, applied


def unet_with_kohya_lora(original: dict, lora: dict, unet_config) -> dict:
    """The UNet's diffusers state with the LoRA applied, whether its keys name original-layout
    modules (kohya's SDXL form) or diffusers ones (its SD1/SD2 form): the original weights go
    through diffusers' own converter, and every LoRA module must resolve in one of the two."""
    merged, in_ldm = add_lora(original, lora, kohya_keys(original, UNET))
    converted = convert_ldm_unet_checkpoint(merged, unet_config)
    converted, in_diffusers = add_lora(converted, lora, kohya_keys(converted))
    modules = {k.removesuffix(".lora_down.weight") for k in lora if k.endswith(".lora_down.weight")}
    assert not in_ldm & in_diffusers and in_ldm | in_diffusers == modules  # each module resolved, once
    return converted


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

    unet = UNet2DConditionModel.from_config(tiny_denoiser.unet.config)
    unet.load_state_dict(unet_with_kohya_lora(tiny_denoiser.original_state_dict(), lora, unet.config))
    layout = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "original"}[tiny_denoiser.info.architecture]
    diffusers_form = any(k.startswith("lora_unet_down_blocks_") for k in lora)
    assert diffusers_form == (layout == "diffusers")  # kohya's naming for the family
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


def test_a_lora_with_original_layout_names_still_loads(tiny_denoiser, tmp_path):
    """Files written before kohya's per-family naming named every family's modules by their
    original-layout paths; purify and the other readers still take them."""
    from erase_engine.deltas import WeightDeltas

    erasure = erase_tiny(tiny_denoiser, lora_rank=4, train="noxattn")
    lora = load_file(save_lora(erasure, tmp_path / "erased.safetensors"))
    by_lora_name = {layer.lora_name: layer for layer in tiny_denoiser.unet_layers()}
    old_names = {}
    for key, value in lora.items():
        module, _, suffix = key.partition(".")
        old_names[f"lora_unet_{by_lora_name[module].ldm_name.replace('.', '_')}.{suffix}"] = value
    assert (set(old_names) == set(lora)) == (tiny_denoiser.info.architecture == "sdxl")
    loaded = WeightDeltas.from_lora(tiny_denoiser.unet_layers(), old_names)
    x, t, cond = probe(tiny_denoiser)
    with torch.no_grad():
        torch.testing.assert_close(
            tiny_denoiser.output(x, t, cond, loaded), tiny_denoiser.output(x, t, cond, erasure.deltas)
        )


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
