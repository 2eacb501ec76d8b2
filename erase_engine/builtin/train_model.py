"""Train the built-in ``builtin:shapes`` model: a small VAE, then a CLIP-style text
encoder and a UNet together on the VAE's latents.  The result is one single-file
checkpoint in the SD1 layout, loaded by the same code as any SD1 file.

    python -m erase_engine.builtin.train_model [--device cuda] [--unet-steps 12000]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..hosts.diffusers_configs import CONFIG_METADATA_KEY, SCHEDULER
from ..hosts.diffusers_loading import noise_schedule
from ..hosts.diffusers_model import DiffusersDenoiser
from ..tokenizer import CLIP_VOCAB_SIZE, clip_tokenizer
from . import BUILTIN_MODEL, SHAPES_WEIGHTS
from .render import IMAGE_SIZE, Scenes, captions, render

CONFIGS = {
    "unet": {
        "sample_size": IMAGE_SIZE // 4,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [64, 128],
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,
        "norm_num_groups": 16,
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 16,
        "sample_size": IMAGE_SIZE,
    },
    "text_encoder": {
        "vocab_size": CLIP_VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_hidden_layers": 3,
        "max_position_embeddings": 16,  # captions are short; 77 positions would cost 5x the attention
        "hidden_act": "quick_gelu",
        "projection_dim": 64,
    },
    "prediction_type": "epsilon",
    "scheduler": SCHEDULER,
}


def train_vae(steps: int, batch: int, device: str, generator: torch.Generator, log) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(CONFIGS["vae"]).to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(steps):
        images = render(Scenes.random(batch, generator)).to(device) * 2 - 1
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = F.mse_loss(recon, images) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} loss {loss.item():.5f}")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_dataset(vae, count: int, device: str, generator: torch.Generator) -> tuple[torch.Tensor, Scenes]:
    scenes = Scenes.random(count, generator)
    latents = []
    for start in range(0, count, 512):
        part = scenes[start : start + 512]
        latents.append(vae.encode(render(part).to(device) * 2 - 1).latent_dist.mean)
    latents = torch.cat(latents)
    return latents, scenes


def learning_rate(step: int, steps: int, peak: float, warmup: int = 200) -> float:
    """Linear warm-up, then a cosine down to a tenth of the peak."""
    progress = max(0.0, (step - warmup) / max(1, steps - warmup))
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_unet(
    unet, text_encoder, latents, scenes, steps: int, batch: int, lr: float, device: str, generator, log, save
):
    unet, text_encoder = (
        unet.to(device).train().requires_grad_(True),
        text_encoder.to(device).train().requires_grad_(True),
    )
    tokenizer = clip_tokenizer()
    schedule = noise_schedule(SCHEDULER, "epsilon")
    alphas = schedule.alphas_cumprod.float().to(device)
    params = [*unet.parameters(), *text_encoder.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr)
        index = torch.randint(len(latents), (batch,), generator=generator)
        part = scenes[index]
        ids = tokenizer(
            captions(part, generator),
            padding="max_length",
            max_length=text_encoder.config.max_position_embeddings,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        x0 = latents[index.to(latents.device)]
        noise = torch.randn(x0.shape, generator=generator).to(device)
        t = torch.randint(1000, (batch,), generator=generator).to(device)
        a = alphas[t][:, None, None, None]
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(ids.to(device)).last_hidden_state
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - min(0.999, (1 + step) / (10 + step)))
        if step % 100 == 0 or step == steps - 1:
            rate = (step + 1) / (time.perf_counter() - started)
            log(f"unet {step}/{steps} loss {loss.item():.4f} ({rate:.2f} steps/s)")
        if (step + 1) % 2000 == 0 or step == steps - 1:
            with torch.no_grad():
                live = [p.detach().clone() for p in params]
                torch._foreach_copy_(params, ema)
                save(unet, text_encoder, step + 1)
                torch._foreach_copy_(params, live)
    return unet, text_encoder


def export(vae, unet, text_encoder, scaling_factor: float, path: Path, note: dict) -> None:
    """Write the single file (copies: the adapter freezes the modules it is given)."""
    from ..files import write_safetensors

    configs = {**CONFIGS, "vae": {**CONFIGS["vae"], "scaling_factor": scaling_factor}}
    unet, vae, text_encoder = (copy.deepcopy(m).cpu() for m in (unet, vae, text_encoder))
    vae.register_to_config(scaling_factor=scaling_factor)
    denoiser = DiffusersDenoiser(
        unet, vae, [text_encoder], [clip_tokenizer()], noise_schedule(SCHEDULER, "epsilon"), "shapes", "sd1", SCHEDULER
    )
    state = {k: v.half() for k, v in denoiser.original_state_dict().items()}
    metadata = {
        CONFIG_METADATA_KEY: json.dumps(configs, sort_keys=True),
        "modelspec.title": BUILTIN_MODEL,
        "modelspec.architecture": "stable-diffusion-v1",
        "modelspec.description": "a small text-to-image model of coloured shapes, trained by erase_engine",
        "shapes.training": json.dumps(note, sort_keys=True),
    }
    write_safetensors(state, path, metadata, if_exists="replace")  # --resume continues the same file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=12000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--dataset", type=int, default=60000, help="encoded training images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=SHAPES_WEIGHTS)
    parser.add_argument("--resume", type=Path, help="continue training the model in this file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:7.0f}s] {message}", flush=True)

    if args.resume is not None:  # continue from a saved file: its VAE, UNet and text encoder
        from ..hosts.diffusers_loading import load_denoiser

        saved = load_denoiser(args.resume)
        vae, unet, text_encoder = saved.vae, saved.unet, saved.text_encoders[0]
        scaling_factor = vae.config.scaling_factor
        latents, scenes = encode_dataset(vae, args.dataset, args.device, generator)
        log(f"resumed from {args.resume}")
    else:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        vae = train_vae(args.vae_steps, 32, args.device, generator, log)
        unet = UNet2DConditionModel.from_config(CONFIGS["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**CONFIGS["text_encoder"]))
        latents, scenes = encode_dataset(vae, args.dataset, args.device, generator)
        scaling_factor = float(1 / latents.std())
    latents = latents * scaling_factor
    log(f"encoded {len(latents)} images, scaling factor {scaling_factor:.4f}")

    def save(unet, text_encoder, step):
        note = {"device": args.device, "unet_steps": step, "vae_steps": args.vae_steps, "batch": args.batch,
                "seconds": round(time.perf_counter() - started), "seed": args.seed}  # fmt: skip
        export(vae, unet, text_encoder, scaling_factor, args.out, note)
        unet.to(args.device), text_encoder.to(args.device), vae.to(args.device)
        log(f"saved {args.out} at step {step}")

    train_unet(
        unet, text_encoder, latents, scenes, args.unet_steps, args.batch, args.lr, args.device, generator, log, save
    )


if __name__ == "__main__":
    main()
