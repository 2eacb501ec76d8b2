"""The shipped single-file configs build the real architectures (on the meta device: no memory)."""

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from erase_engine import ldm_layout
from erase_engine.hosts.diffusers_configs import STANDARD

# Published parameter counts of the released models' components.
PARAMETERS = {
    "sd1": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2": {"unet": 865_910_724, "vae": 83_653_863},
    "sdxl": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}
# Keys that the released single files contain (upsamplers sit at .1 or .2 depending on attention).
KNOWN_KEYS = {
    "sd1": [
        "output_blocks.2.1.conv.weight",
        "output_blocks.5.2.conv.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
    ],
    "sd2": ["output_blocks.8.2.conv.weight", "middle_block.1.proj_in.weight", "input_blocks.3.0.op.weight"],
    "sdxl": [
        "output_blocks.2.2.conv.weight",
        "input_blocks.7.1.transformer_blocks.9.attn2.to_v.weight",
        "label_emb.0.0.weight",
    ],
}


@pytest.mark.parametrize("architecture", sorted(STANDARD))
def test_standard_configs_build_the_released_architectures(architecture):
    configs = STANDARD[architecture]
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
        }
        models["text_encoder"] = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        if "text_encoder_2" in configs:
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**configs["text_encoder_2"]))
    for name, count in PARAMETERS[architecture].items():
        assert sum(p.numel() for p in models[name].parameters()) == count, name
    unet = models["unet"]
    names = set(ldm_layout.unet_to_ldm(unet.state_dict(), unet.config))
    assert {f"model.diffusion_model.{k}" for k in KNOWN_KEYS[architecture]} <= names


@pytest.mark.parametrize("architecture", sorted(STANDARD))
def test_original_layout_names_map_back_to_the_diffusers_paths(architecture):
    """Hosts name UNet layers in the original layout; an SD1/SD2 LoRA key needs the diffusers
    path (kohya's naming): the inverse mapping recovers every layer of the released UNets."""
    from erase_engine.layers import is_weight_layer

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(STANDARD[architecture]["unet"])
    paths = [name for name, module in unet.named_modules() if is_weight_layer(module)]
    ldm_names = [ldm_layout.unet_ldm_name(path, unet.config) for path in paths]
    per_block = ldm_layout.layers_per_block(ldm_names)
    assert per_block == 2
    assert [ldm_layout.unet_diffusers_name(name, per_block) for name in ldm_names] == paths
