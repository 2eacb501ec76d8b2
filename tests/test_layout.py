"""Our diffusers -> original-layout mapping against diffusers' own original -> diffusers conversion."""

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from erase_engine import ldm_layout
from erase_engine.hosts.diffusers_loading import detect_architecture
from erase_engine.hosts.diffusers_model import TEXT_ENCODER_LAYOUT


def _assert_same(expected: dict, actual: dict):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_unet_and_vae_round_trip_through_diffusers_converter(tiny_denoiser):
    unet, vae = tiny_denoiser.unet, tiny_denoiser.vae
    original = ldm_layout.unet_to_ldm(unet.state_dict(), unet.config)
    original |= ldm_layout.vae_to_ldm(vae.state_dict(), vae.config)
    _assert_same(unet.state_dict(), convert_ldm_unet_checkpoint(original, unet.config))
    _assert_same(vae.state_dict(), convert_ldm_vae_checkpoint(original, vae.config))


def test_text_encoders_round_trip(tiny_denoiser):
    state = tiny_denoiser.original_state_dict()
    assert detect_architecture(state) == tiny_denoiser.info.architecture
    for (prefix, layout), encoder in zip(
        TEXT_ENCODER_LAYOUT[tiny_denoiser.info.architecture], tiny_denoiser.text_encoders, strict=True
    ):
        if layout == "clip":
            back = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        else:
            back = convert_open_clip_checkpoint(encoder, state, prefix=prefix)
        expected = {k: v for k, v in ldm_layout.canonical_clip_state(encoder).items() if not k.endswith("position_ids")}
        _assert_same(expected, back)


def test_every_trainable_layer_has_an_original_weight(tiny_denoiser):
    state = tiny_denoiser.original_state_dict()
    names = [layer.ldm_name for layer in tiny_denoiser.unet_layers()]
    assert len(set(names)) == len(names)
    for name in names:
        assert f"model.diffusion_model.{name}.weight" in state
