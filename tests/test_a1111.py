"""The A1111 adapter against A1111's real model classes: ldm's ``LatentDiffusion`` (PyPI
``stable-diffusion-sdkit``), built from SD1.5's and SD2-v's inference configs with random
weights.  Its predictions must match the diffusers adapter's on the same weights, and an
erasure must run end to end without changing the host's model.

Needs ``ldm`` (README, "Developing"); skipped with the reason otherwise.
"""

from __future__ import annotations

import pytest
import torch

ldm_util = pytest.importorskip("ldm.util", reason="A1111's ldm classes: pip install stable-diffusion-sdkit (README)")
from omegaconf import OmegaConf  # noqa: E402  (comes with ldm's requirements)
from support.clip_l import save_clip_l  # noqa: E402

from erase_engine import EraseConfig, erase_concept  # noqa: E402
from erase_engine.deltas import WeightDeltas  # noqa: E402
from erase_engine.exports import lora_state_dict  # noqa: E402
from erase_engine.files import weights_sha256  # noqa: E402
from erase_engine.hosts.a1111 import A1111Denoiser  # noqa: E402
from erase_engine.hosts.diffusers_configs import STANDARD  # noqa: E402
from erase_engine.hosts.diffusers_loading import build_from_configs  # noqa: E402

VAE = {
    "target": "ldm.models.autoencoder.AutoencoderKL",
    "params": {
        "embed_dim": 4,
        "monitor": "val/rec_loss",
        "lossconfig": {"target": "torch.nn.Identity"},
        "ddconfig": {
            "double_z": True,
            "z_channels": 4,
            "resolution": 256,
            "in_channels": 3,
            "out_ch": 3,
            "ch": 128,
            "ch_mult": [1, 2, 4, 4],
            "num_res_blocks": 2,
            "attn_resolutions": [],
            "dropout": 0.0,
        },
    },
}
UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "use_checkpoint": True,
    "legacy": False,
}


def inference_config(architecture: str, clip_folder: str) -> dict:
    """SD1.5's v1-inference.yaml and SD2's v2-inference-v.yaml, the values A1111 loads them with."""
    params = {
        "linear_start": 0.00085,
        "linear_end": 0.012,
        "num_timesteps_cond": 1,
        "timesteps": 1000,
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": 64,
        "channels": 4,
        "cond_stage_trainable": False,
        "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": 0.18215,
        "use_ema": False,
        "first_stage_config": VAE,
    }
    target = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
    if architecture == "sd1":
        params["unet_config"] = {"target": target, "params": {**UNET, "num_heads": 8, "context_dim": 768}}
        params["cond_stage_config"] = {
            "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": clip_folder, "device": "cpu"},
        }
    else:
        unet = {
            **UNET,
            "num_head_channels": 64,
            "use_linear_in_transformer": True,
            "context_dim": 1024,
            "use_fp16": False,
        }
        params |= {"parameterization": "v", "unet_config": {"target": target, "params": unet}}
        params["cond_stage_config"] = {  # version None: open_clip's ViT-H-14 with random weights, no download
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate", "version": None, "device": "cpu"},
        }
    return {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": params}


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def host_model(request, tmp_path_factory, monkeypatch_module):
    architecture = request.param
    folder = save_clip_l(tmp_path_factory.mktemp("clip-l"))

    import ldm.modules.encoders.modules as encoders
    from transformers import CLIPTextConfig, CLIPTextModel

    class RandomCLIPTextModel:  # FrozenCLIPEmbedder loads pretrained weights by name; build from the config
        @staticmethod
        def from_pretrained(path, **kwargs):
            return CLIPTextModel(CLIPTextConfig.from_pretrained(path))

    monkeypatch_module.setattr(encoders, "CLIPTextModel", RandomCLIPTextModel)
    torch.manual_seed(0)
    model = ldm_util.instantiate_from_config(OmegaConf.create(inference_config(architecture, str(folder))))
    model = model.eval().float()
    with torch.no_grad():  # ldm zero-initialises every block's output layer: give them values, as training would
        for parameter in model.model.parameters():
            if parameter.dim() > 1 and not parameter.any():
                parameter.normal_(0.0, 0.02)
    yield architecture, model
    del model


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_a1111_adapter_matches_the_diffusers_adapter_on_the_same_weights(host_model):
    architecture, model = host_model
    host = A1111Denoiser(model, "random")
    assert host.info.architecture == architecture
    assert host.schedule.prediction_type == ("epsilon" if architecture == "sd1" else "v_prediction")
    converted = build_from_configs(STANDARD[architecture], architecture, "converted", state=model.state_dict())
    torch.testing.assert_close(host.schedule.alphas_cumprod, converted.schedule.alphas_cumprod, rtol=1e-6, atol=1e-7)

    prompts = ["a photo of a cat", ""]
    cond_host, cond_ours = host.encode(prompts), converted.encode(prompts)
    torch.testing.assert_close(cond_host.context, cond_ours.context, rtol=1e-4, atol=1e-4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([900, 25])
    with torch.no_grad():
        expected = converted.output(x, t, cond_ours)
        torch.testing.assert_close(host.output(x, t, cond_host), expected, rtol=1e-4, atol=1e-4)
        assert expected.abs().max() > 0.1  # a real prediction, not the zero-initialised output


def test_erasure_on_the_a1111_model_trains_and_leaves_it_unchanged(host_model):
    architecture, model = host_model
    host = A1111Denoiser(model, "random")
    before = weights_sha256(model)
    config = EraseConfig(
        erase=["a photo of a cat"],
        preserve=["a dog"],
        steps=3,
        lr=1e-2,
        trajectories=1,
        sampler_steps=3,
        resolution=64,
        seed=0,
    )
    erasure = erase_concept(host, config)
    assert weights_sha256(model) == before  # nothing of the host's model changed
    assert any(p.requires_grad for p in model.parameters())  # ldm's (and A1111's) weights ask for gradients...
    assert all(p.grad is None for p in model.parameters())  # ...and got none (a UNet-sized .grad otherwise)
    assert any(getattr(m, "use_checkpoint", None) is True for m in model.model.diffusion_model.modules())  # restored
    assert len(erasure.losses) == 3 and all(
        torch.isfinite(torch.tensor(list(r.values()))).all() for r in erasure.losses
    )
    trained = [d.up.abs().max() for d in erasure.deltas.by_layer.values()]
    assert max(trained) > 0  # gradients reached the deltas through ldm's (checkpointed) blocks

    # The same deltas, read from the exported LoRA by the diffusers adapter, predict the same.
    converted = build_from_configs(STANDARD[architecture], architecture, "converted", state=model.state_dict())
    deltas = WeightDeltas.from_lora(converted.unet_layers(), lora_state_dict(erasure))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(
            host.output(x, t, host.encode(["a photo of a cat"]), erasure.deltas),
            converted.output(x, t, converted.encode(["a photo of a cat"]), deltas),
            rtol=1e-4,
            atol=1e-4,
        )


def test_a_learned_word_reads_as_the_word_whose_vectors_it_holds(host_model):
    """A round trip through ldm's own text encoder: the placeholder given the token embeddings of
    "cat" encodes as "cat" does; the vectors get a gradient through the UNet, the host's weights none."""
    _, model = host_model
    host = A1111Denoiser(model, "random")
    width = host.encode([""]).context.shape[-1]
    cat = host.word_vectors("cat")
    assert [v.shape for v in cat] == [(1, width)]
    learned = [v.clone().requires_grad_(True) for v in cat]

    cond = host.encode_with_embedding(["a photo of a sks", ""], "sks", learned)
    torch.testing.assert_close(cond.context, host.encode(["a photo of a cat", ""]).context)
    assert not torch.allclose(cond.context[0], host.encode(["a photo of a sks"]).context[0])

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    host.output(x, torch.tensor([500, 500]), cond).square().mean().backward()
    assert learned[0].grad is not None and learned[0].grad.abs().max() > 0
    assert all(p.grad is None for p in model.parameters())  # (A1111's weights ask for gradients)
