"""One full-size check: an SD1.5-shaped single file with no header of ours loads
through the shipped configs and diffusers' converters, weight for weight."""

import torch
from safetensors.torch import save_file

from erase_engine import load_denoiser
from erase_engine.hosts.diffusers_configs import STANDARD
from erase_engine.hosts.diffusers_loading import build_from_configs


def test_released_layout_sd15_file_loads_without_our_metadata(tmp_path):
    torch.manual_seed(0)
    original = build_from_configs(STANDARD["sd1"], "sd1", "random-sd15")
    state = {k: v.half() for k, v in original.original_state_dict().items()}  # as released files are
    # the tensor counts of the released v1-5 file (its CLIP position-ids buffer aside)
    for prefix, count in {"model.diffusion_model.": 686, "first_stage_model.": 248, "cond_stage_model.": 196}.items():
        assert sum(k.startswith(prefix) for k in state) == count, prefix
    assert len(state) == 686 + 248 + 196
    path = tmp_path / "v1-5-random.safetensors"
    save_file(state, str(path))
    del original

    loaded = load_denoiser(path)
    assert loaded.info.architecture == "sd1" and loaded.info.resolution == 512
    assert loaded.schedule.prediction_type == "epsilon"
    reloaded = loaded.original_state_dict()  # read back from the source file: every tensor kept
    assert reloaded.keys() == state.keys()
    unet_key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight"
    weight = dict(loaded.unet.named_parameters())["up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_v.weight"]
    assert torch.equal(weight.half(), state[unet_key])
    token = loaded.text_encoders[0].get_input_embeddings().weight
    assert torch.equal(token.half(), state["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"])
