"""openai/clip-vit-large-patch14's text tower as a local folder (config and tokenizer, no
weights), for the hosts that load it by name: ldm's FrozenCLIPEmbedder, A1111."""

from __future__ import annotations

import json
from pathlib import Path

from erase_engine.tokenizer import clip_tokenizer

CLIP_L = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "pad_token_id": 1,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
}


def save_clip_l(folder: Path) -> Path:
    """The config and the tokenizer (built offline from open-clip-torch's BPE vocabulary)."""
    tokenizer = clip_tokenizer()
    assert tokenizer.vocab_size == 49408  # a broken offline tokenizer has 2
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(CLIP_L))
    return folder
