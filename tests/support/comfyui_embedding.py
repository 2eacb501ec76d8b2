"""Run in ComfyUI's Python (``python comfyui_embedding.py CHECKPOINT EMBEDDINGS_FOLDER``, ComfyUI's
folder and this project's on the path): prints, as JSON, how far the ComfyUI adapter's encoding
of a prompt with two learned vectors is from ComfyUI's own encoding of the same vectors saved
as an ``embedding:<name>`` file, how much they change the encoding, and their gradient."""

import json
import sys

import comfy.options
import torch

checkpoint, embeddings = sys.argv[1:]
sys.argv = [sys.argv[0], "--cpu"]
comfy.options.enable_args_parsing()
import comfy.sd  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from erase_engine.hosts.comfyui import ComfyDenoiser  # noqa: E402

with torch.inference_mode():  # as ComfyUI's executor loads a checkpoint: inference tensors
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
        checkpoint, output_vae=True, output_clip=True, embedding_directory=embeddings
    )
with torch.inference_mode(False):
    denoiser = ComfyDenoiser(model, clip, vae)
    start = denoiser.word_vectors("star")[0]
    torch.manual_seed(0)
    vectors = [(start.mean(0, keepdim=True).repeat(2, 1) + 0.05 * torch.randn(2, start.shape[1])).requires_grad_(True)]
    ours = denoiser.encode_with_embedding(["a sks sks on a black background"], "sks", vectors)
    ours.context.pow(2).sum().backward()
    save_file({"emb_params": vectors[0].detach().contiguous()}, f"{embeddings}/probe.safetensors")
    host = denoiser.encode(["a embedding:probe on a black background"])
    plain = denoiser.encode(["a star on a black background"])
figures = {
    "difference": float((ours.context.detach() - host.context).abs().max()),
    "changed": float((host.context - plain.context).abs().max()),
    "gradient": float(vectors[0].grad.abs().sum()),
}
print(json.dumps(figures))
