"""diffusers configs of the standard single-file architectures, so that a
checkpoint loads with no network.  Checkpoints this engine writes carry their
own configs in the header and do not need these."""

from __future__ import annotations

from ..tokenizer import CLIP_VOCAB_SIZE

CONFIG_METADATA_KEY = "erase_engine.diffusers_configs"  # where a checkpoint we wrote keeps its configs

SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

_CLIP_L = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_OPEN_CLIP_H = {  # SD2 uses the penultimate layer: 23 of 24 layers
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 512,
}
_OPEN_CLIP_BIG_G = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def _vae(sample_size: int, scaling_factor: float) -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


_SD_UNET = {
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
}

STANDARD = {
    "sd1": {
        "unet": {**_SD_UNET, "sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae": _vae(512, 0.18215),
        "text_encoder": _CLIP_L,
        "prediction_type": "epsilon",
    },
    "sd2": {
        "unet": {
            **_SD_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True,
        },
        "vae": _vae(768, 0.18215),
        "text_encoder": _OPEN_CLIP_H,
        "prediction_type": "v_prediction",  # the 768-v model; pass prediction_type="epsilon" for SD2-base
    },
    "sdxl": {
        "unet": {
            "in_channels": 4,
            "out_channels": 4,
            "sample_size": 128,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "block_out_channels": [320, 640, 1280],
            "layers_per_block": 2,
            "transformer_layers_per_block": [1, 2, 10],
            "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048,
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
        "vae": _vae(1024, 0.13025),
        "text_encoder": _CLIP_L,
        "text_encoder_2": _OPEN_CLIP_BIG_G,
        "prediction_type": "epsilon",
    },
}
