"""Models for tests, built in code (no network): tiny SD1 / SD2-v / SDXL diffusers folders,
and full-size random-weight single files made in a child process."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from erase_engine.tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer

ARCHITECTURES = ("sd1", "sd2", "sdxl")


def _text_encoder(hidden_act: str, with_projection: bool = False, layers: int = 2, width: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=32,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def build_tiny_model(folder: Path, architecture: str, seed: int = 0, released_shapes: bool = False) -> Path:
    """A random-weight model of the given family, small enough for CPU tests.  diffusers'
    single-file loader tells SDXL's two text encoders apart as released SDXL files have them
    (OpenCLIP with a tenth layer, wider than CLIP): ``released_shapes`` builds it so, for a
    file diffusers must read."""
    open_clip_layers, open_clip_width = (10, 48) if released_shapes else (2, 32)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(seed)
    common = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64), norm_num_groups=8
    )
    if architecture == "sdxl":
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            cross_attention_dim=32 + open_clip_width,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8,
        )
        encoders = {
            "text_encoder": _text_encoder("quick_gelu"),
            "text_encoder_2": _text_encoder("gelu", True, open_clip_layers, open_clip_width),
        }
    else:
        unet = UNet2DConditionModel(
            **common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=8,
            cross_attention_dim=32,
            use_linear_projection=architecture == "sd2",
        )
        encoders = {"text_encoder": _text_encoder("gelu" if architecture == "sd2" else "quick_gelu")}
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )
    prediction_type = "v_prediction" if architecture == "sd2" else "epsilon"
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type=prediction_type
    )
    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionXLPipeline" if architecture == "sdxl" else "StableDiffusionPipeline"}
    for name, module in {"unet": unet, "vae": vae, "scheduler": scheduler, **encoders}.items():
        module.save_pretrained(folder / name)
        index[name] = ["diffusers" if name in ("unet", "vae", "scheduler") else "transformers", type(module).__name__]
    for name, encoder in encoders.items():
        tokenizer_name = name.replace("text_encoder", "tokenizer")
        open_clip = encoder.config.hidden_act == "gelu"  # OpenCLIP pads with "!", OpenAI's CLIP with <|endoftext|>
        clip_tokenizer("!" if open_clip else "<|endoftext|>").save_pretrained(folder / tokenizer_name)
        index[tokenizer_name] = ["transformers", "CLIPTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


# A script (run as ``python -c MAKE_CHECKPOINT ARCHITECTURE PATH``) writing a full-size
# random-weight checkpoint in a child process, so that its memory is back before a host loads it.
MAKE_CHECKPOINT = """
import sys, torch
from safetensors.torch import save_file
from erase_engine.hosts.diffusers_configs import STANDARD
from erase_engine.hosts.diffusers_loading import build_from_configs
architecture, path = sys.argv[1:]
torch.manual_seed(0)
torch.set_default_dtype(torch.float16)  # as released files are
state = build_from_configs(STANDARD[architecture], architecture, "random").original_state_dict()
if architecture == "sd2":  # ComfyUI tells SD2-v from SD2-base by this bias's spread (trained: > 0.09)
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    state[key] = torch.randn(state[key].shape).mul(0.2)
for key in [k for k in state if k.endswith(("final_layer_norm.bias", "ln_final.bias"))]:
    # as trained: a zero bias makes every context's mean 0, and A1111's emphasis rescaling divides by it
    state[key] = torch.randn(state[key].shape).mul(0.1)
save_file({k: v.half().contiguous() for k, v in state.items()}, path)
"""
