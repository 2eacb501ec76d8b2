"""The real CLIP tokenizer (49,408 tokens), built offline from CLIP's BPE merges.

A diffusers folder brings its own tokenizer; a single-file checkpoint does not, and an
offline ``CLIPTokenizer.from_pretrained`` can return a broken one without raising.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import tempfile
from pathlib import Path

CLIP_VOCAB_SIZE = 49408
CLIP_VOCAB_ENV = "ERASE_ENGINE_CLIP_VOCAB"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte -> printable character table, in vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


# Packages that ship CLIP's vocabulary: clip-anytorch (OpenAI's ``clip``, a dependency of this
# package) and open-clip-torch (which A1111 and Forge install).
VOCAB_PACKAGES = ("clip", "open_clip")


def clip_vocab_path() -> Path:
    """CLIP's BPE merges file, from ``$ERASE_ENGINE_CLIP_VOCAB`` or a package that ships it."""
    if env := os.environ.get(CLIP_VOCAB_ENV):
        return Path(env)
    for package in VOCAB_PACKAGES:
        spec = importlib.util.find_spec(package)  # located, not imported (it would import torchvision)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
            if candidate.exists():
                return candidate
    raise FileNotFoundError(
        "the CLIP tokenizer vocabulary was not found: `pip install clip-anytorch` (a dependency of this "
        f"package) ships it, or point {CLIP_VOCAB_ENV} at a {VOCAB_FILE}"
    )


def check_vocab_size(tokenizer) -> None:
    """Refuse a broken tokenizer (an offline ``from_pretrained`` can silently give one with 2 tokens)."""
    if tokenizer.vocab_size != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"the CLIP tokenizer is broken (vocabulary of {tokenizer.vocab_size}, expected {CLIP_VOCAB_SIZE})"
        )


def clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """The CLIP tokenizer; OpenAI's CLIP pads with ``<|endoftext|>``, OpenCLIP with ``!``."""
    from transformers import CLIPTokenizer

    lines = gzip.open(clip_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = _bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), pad_token=pad_token, model_max_length=77)
    check_vocab_size(tokenizer)
    return tokenizer
