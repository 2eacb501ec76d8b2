"""The files this engine writes, read by diffusers' own loaders, the way a diffusers user
or a diffusers-based app reads them: a LoRA through ``load_lora_weights`` (peft backend),
a checkpoint through ``from_single_file`` with a local config (no network).  Every LoRA
module must be applied (none left out, none unknown) and the pipeline's UNet must predict
what the trained student predicts."""

from __future__ import annotations

import copy

import pytest
import torch

from erase_engine import EraseConfig, erase_concept, save_checkpoint, save_lora
from erase_engine.layers import TRAINABLE_SETS

pytest.importorskip("peft", reason="diffusers loads LoRAs through peft: pip install peft")

PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def pipeline_of(denoiser):
    """A diffusers pipeline over copies of the tiny model's parts (loading a LoRA changes its UNet)."""
    import diffusers

    parts = {"vae": denoiser.vae, "unet": denoiser.unet}
    for i, (encoder, tokenizer) in enumerate(zip(denoiser.text_encoders, denoiser.tokenizers, strict=True)):
        suffix = f"_{i + 1}" if i else ""
        parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = encoder, tokenizer
    parts = {name: copy.deepcopy(part) for name, part in parts.items()}
    parts["scheduler"] = diffusers.DDPMScheduler.from_config(denoiser.scheduler_config)
    if denoiser.info.architecture != "sdxl":
        parts |= {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return getattr(diffusers, PIPELINES[denoiser.info.architecture])(**parts)


def probe(denoiser):
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    return x, torch.tensor([999, 500, 20]), denoiser.encode(["a cat", "a dog", ""])


def unet_prediction(unet, x, t, cond) -> torch.Tensor:
    with torch.no_grad():
        return unet(x, t, cond.context, added_cond_kwargs=cond.extras or None).sample


def lora_modules_applied(unet) -> set[str]:
    """The UNet modules peft wrapped with a LoRA layer."""
    return {name for name, module in unet.named_modules() if hasattr(module, "lora_A") and module.lora_A}


@pytest.mark.parametrize("train", TRAINABLE_SETS)
def test_diffusers_load_lora_weights_applies_every_module_as_trained(tiny_denoiser, tmp_path, train):
    config = EraseConfig(erase=["a cat"], train=train, lora_rank=4, steps=3, lr=1e-2, trajectories=1, sampler_steps=3)
    erasure = erase_concept(tiny_denoiser, config)
    path = save_lora(erasure, tmp_path / "erased.safetensors")

    pipeline = pipeline_of(tiny_denoiser)
    pipeline.load_lora_weights(str(path))  # NoMatchingPeftModuleError for names diffusers cannot map
    trained = {layer.weight_name.removesuffix(".weight") for layer in erasure.deltas.layers.values()}
    assert lora_modules_applied(pipeline.unet) == trained  # none left out, none unknown

    x, t, cond = probe(tiny_denoiser)
    with torch.no_grad():
        student = tiny_denoiser.output(x, t, cond, erasure.deltas)
        teacher = tiny_denoiser.output(x, t, cond)
    assert (student - teacher).abs().max() > 1e-4  # the erasure changed what is compared
    torch.testing.assert_close(unet_prediction(pipeline.unet, x, t, cond), student, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture", ["sd1", "sdxl"])
def test_diffusers_from_single_file_loads_the_checkpoint_as_the_student(tmp_path, architecture):
    import diffusers
    from support.models import build_tiny_model

    from erase_engine import load_denoiser

    folder = build_tiny_model(tmp_path / "model", architecture, released_shapes=True)
    denoiser = load_denoiser(folder)
    config = EraseConfig(
        erase=["a cat"], train="full", lora_rank=None, steps=3, lr=1e-2, trajectories=1, sampler_steps=3
    )
    erasure = erase_concept(denoiser, config)
    path = save_checkpoint(erasure, tmp_path / "erased.safetensors")

    pipeline_class = getattr(diffusers, PIPELINES[architecture])
    extra = {} if architecture == "sdxl" else {"safety_checker": None}
    pipeline = pipeline_class.from_single_file(str(path), config=str(folder), local_files_only=True, **extra)
    encoders = [pipeline.text_encoder] + ([pipeline.text_encoder_2] if architecture == "sdxl" else [])
    x, t, cond = probe(denoiser)
    with torch.no_grad():
        student = denoiser.output(x, t, cond, erasure.deltas)
        assert (student - denoiser.output(x, t, cond)).abs().max() > 1e-4
        for ours, theirs in zip(denoiser.text_encoders, encoders, strict=True):
            ids = torch.tensor([[49406, 2368, 49407] + [0] * 74])
            torch.testing.assert_close(theirs(ids)[0], ours(ids)[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unet_prediction(pipeline.unet, x, t, cond), student, rtol=1e-4, atol=1e-5)


def test_diffusers_load_textual_inversion_reads_the_attack_as_learned(tiny_denoiser, tmp_path):
    """The attack's embedding file, loaded by diffusers' ``load_textual_inversion`` (SDXL: each
    encoder's tensor into its encoder, as A1111 and ComfyUI split it) and asked through the
    pipeline's own ``encode_prompt``, conditions the model as the attack did."""
    from safetensors.torch import load_file

    from erase_engine.attack import AttackConfig, learn_attack, save_embedding

    config = AttackConfig("a cat", ["a photo of {}"], tokens=2, steps=3, trajectories=1, sampler_steps=3)
    erasure = erase_concept(tiny_denoiser, EraseConfig(erase=["a cat"], steps=2, trajectories=1, sampler_steps=2))
    attack = learn_attack(tiny_denoiser, erasure.deltas, config)
    path = save_embedding(attack, tiny_denoiser, tmp_path / "attack-cat.safetensors")

    pipeline = pipeline_of(tiny_denoiser)
    sdxl = tiny_denoiser.info.architecture == "sdxl"
    if sdxl:
        state = load_file(path)
        assert sorted(state) == ["clip_g", "clip_l"]
        for key, suffix in (("clip_l", ""), ("clip_g", "_2")):
            encoder, tokenizer = getattr(pipeline, f"text_encoder{suffix}"), getattr(pipeline, f"tokenizer{suffix}")
            pipeline.load_textual_inversion(state[key], token="<attack>", text_encoder=encoder, tokenizer=tokenizer)
    else:
        pipeline.load_textual_inversion(str(path), token="<attack>")
    sentence = "a photo of <attack>"
    with torch.no_grad():
        if sdxl:
            context, _, pooled, _ = pipeline.encode_prompt(sentence, device="cpu", do_classifier_free_guidance=False)
        else:
            context, _ = pipeline.encode_prompt(sentence, "cpu", 1, False)
    ours = attack.condition(tiny_denoiser, [attack.prompt("a photo of {}")])
    assert not torch.allclose(ours.context, tiny_denoiser.encode(["a photo of a cat"]).context)
    torch.testing.assert_close(context, ours.context, rtol=1e-5, atol=1e-5)
    if sdxl:
        torch.testing.assert_close(pooled, ours.extras["text_embeds"], rtol=1e-5, atol=1e-5)
