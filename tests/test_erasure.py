"""The objective, the trainer and the untouched base model, on tiny models."""

import pytest
import torch

from erase_engine import EraseConfig, erase_concept
from erase_engine.deltas import WeightDeltas
from erase_engine.layers import is_trainable
from erase_engine.objective import make_objective
from erase_engine.sampling import TrajectoryCache


def record_draws(monkeypatch) -> list:
    """Keep every state the training loop draws (its ``Draw``), by wrapping ``draw_states``."""
    from erase_engine import trainer

    draws, draw_states = [], trainer.draw_states

    def recording(*args):
        draws.append(draw_states(*args))
        return draws[-1]

    monkeypatch.setattr(trainer, "draw_states", recording)
    return draws


def raw_unet(denoiser, x, t, prompt):
    """The frozen model's output through diffusers directly, not through the adapter."""
    cond = denoiser.encode([prompt])
    extras = cond.extras or None
    return denoiser.unet(x, t, encoder_hidden_states=cond.context, added_cond_kwargs=extras).sample


@pytest.mark.parametrize(
    "method, into, keep_layout",
    [("esd", "", 0.0), ("surgical", "", 0.0), ("surgical", "a dog", 0.0), ("surgical", "a dog", 0.2)],
)
def test_first_step_loss_matches_the_papers_formula(tiny_model_dirs, method, into, keep_layout, monkeypatch):
    from erase_engine import load_denoiser

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    draws = record_draws(monkeypatch)
    config = EraseConfig(
        erase=["a cat"],
        into=[into] if into else [],
        contexts=["{}", "a photo of {}"],
        method=method,
        steps=1,
        trajectories=2,
        sampler_steps=4,
        keep_layout=keep_layout,
    )
    erasure = erase_concept(denoiser, config)
    draw = draws[0]  # the states the training step drew: the concept in each context, a row each
    assert sorted(zip(draw.erase, draw.into, strict=True)) == sorted(config.prompt_pairs())

    eta = make_objective(method).eta
    squared_errors = []
    for row, (erased, alternative) in enumerate(zip(draw.erase, draw.into, strict=True)):
        x_t, t = draw.x[row : row + 1], draw.t[row : row + 1]
        # section 9: in a context, the concept's guidance is taken from the sentence without it
        # ("a photo of"); the concept alone's base is the empty prompt (the paper's formula)
        base = erased.removesuffix("a cat").strip()
        e_base, e_cat = raw_unet(denoiser, x_t, t, base), raw_unet(denoiser, x_t, t, erased)
        if method == "esd":  # ESD (Gandikota et al.): e*(x,0) - eta (e*(x,c) - e*(x,0)), with eta = 1
            assert eta == 1.0
            target = e_base - eta * (e_cat - e_base)
        else:  # docs/method.md, section 1: e*(x,0) + g*(x,c_a) - eta g*(x,c_e)
            e_dog = raw_unet(denoiser, x_t, t, alternative) if into else e_base
            target = e_base + (e_dog - e_base) - eta * (e_cat - e_base)
        if int(t) >= (1 - keep_layout) * 1000:  # section 10: at the layout's levels only its coarse part is kept
            target = e_base + cell_means(e_cat - e_base) + (e_dog - e_base)
        squared_errors.append((e_cat - target) ** 2)
    if keep_layout:  # the states drawn (t 999 and 749 here) fall on both sides of the threshold
        assert len({int(t) >= (1 - keep_layout) * 1000 for t in draw.t}) == 2
    # at step one the student equals the teacher, so only the erase term is non-zero
    expected = torch.cat(squared_errors).mean()
    assert erasure.losses[0]["erase"] == pytest.approx(float(expected), rel=1e-4)
    assert erasure.losses[0].get("uncond", 0.0) == pytest.approx(0.0, abs=1e-10)


def test_an_erasure_is_trained_in_the_sentences_the_model_declares(tiny_model_dirs, monkeypatch):
    """docs/method.md, section 9: each sentence the model declares that holds the erased concept
    becomes a context; the model's sentences of the same form, another phrase of as many words in
    the concept's place, are preserved."""
    from erase_engine import load_denoiser

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    assert denoiser.example_prompts == ()  # a host's or a user's model declares none
    declared = (
        "a photo of a cat", "A cat on a sofa", "a photo of a dog", "a dog and a cat", "a caterpillar",
        "a dog on a sofa", "a photo of a red car", "a tree",
    )  # fmt: skip
    monkeypatch.setattr(denoiser, "example_prompts", declared)
    draws = record_draws(monkeypatch)
    config = EraseConfig(erase=["a cat"], preserve=["a dog"], steps=1, trajectories=2, sampler_steps=2)
    erasure = erase_concept(denoiser, config)

    assert erasure.config.contexts == ["{}", "a photo of {}", "{} on a sofa", "a dog and {}"]  # not "a caterpillar"
    # not "a photo of a red car" (three words where the concept has two), nor sentences of another form
    assert erasure.config.preserve == ["a dog", "a photo of a dog", "a dog on a sofa"]
    assert sorted(draws[0].erase) == sorted(["a cat", "a photo of a cat", "a cat on a sofa", "a dog and a cat"])
    assert sorted(draws[0].preserve) == ["a dog", "a dog on a sofa", "a photo of a dog"]
    assert config.contexts == ["{}"] and config.preserve == ["a dog"]  # the caller's config is left as it was
    # a concept the declared sentences do not hold: the erasure is the one asked for
    unrelated = EraseConfig(erase=["a house"], preserve=["a dog"])
    assert unrelated.in_model_sentences(declared) is unrelated


def test_a_robust_first_step_also_asks_the_concept_through_the_adversarys_word(tiny_model_dirs, monkeypatch):
    """robust on (docs/method.md, section 11): before the first step the adversary has attacked
    the (still untouched) model; the erase term then averages the paper's error over each drawn
    state asked with the concept and asked with the adversary's word, to the same target, the
    word standing in the prompt's own sentence or in one of the carrier sentences."""
    from erase_engine import load_denoiser, trainer
    from erase_engine.adversary import CARRIERS, PLACEHOLDER, placeholders

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    draws, made, asked_in = record_draws(monkeypatch), [], []

    class Recorded(trainer.Adversaries):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

        def conditions(self, erased, asked):
            asked_in.extend(self.asked[prompt][1][k] for prompt, k in zip(erased, asked, strict=True))
            return super().conditions(erased, asked)

    monkeypatch.setattr(trainer, "Adversaries", Recorded)
    config = EraseConfig(erase=["a cat"], robust="on", contexts=["{}", "a photo of {}"], steps=1, trajectories=2,
                         sampler_steps=4, seed=3)  # fmt: skip
    erasure = erase_concept(denoiser, config)
    draw, adversary = draws[0], made[0].by_concept["a cat"]
    start = denoiser.word_vectors("a cat")[0].mean(dim=0, keepdim=True).repeat(trainer.ADVERSARY_TOKENS, 1)
    assert adversary.vectors[0].shape == start.shape  # the word is ADVERSARY_TOKENS vectors
    assert not torch.equal(adversary.vectors[0].detach(), start)  # the attack ran before the step
    word = placeholders(trainer.ADVERSARY_TOKENS)
    errors = []
    for row, erased in enumerate(draw.erase):
        x_t, t = draw.x[row : row + 1], draw.t[row : row + 1]
        base = erased.removesuffix("a cat").strip()  # the sentence without the concept (section 9)
        e_base, e_cat = raw_unet(denoiser, x_t, t, base), raw_unet(denoiser, x_t, t, erased)
        target = e_base - 1.0 * (e_cat - e_base)
        asked = asked_in[row]
        assert asked in [erased.replace("a cat", word), *(c.format(word) for c in CARRIERS)]
        with torch.no_grad():
            cond = denoiser.encode_with_embedding([asked], PLACEHOLDER, adversary.vectors)
            e_adv = denoiser.unet(x_t, t, encoder_hidden_states=cond.context).sample
        errors += [(e_cat - target) ** 2, (e_adv - target) ** 2]
    assert erasure.losses[0]["erase"] == pytest.approx(float(torch.cat(errors).mean()), rel=1e-4)
    assert {c.format(word) for c in CARRIERS} & set(asked_in)  # (the seed draws a carrier)


def cell_means(latents: torch.Tensor, cells: int = 4) -> torch.Tensor:
    """The mean of each of ``cells`` x ``cells`` equal blocks of the latent, spread back bilinearly."""
    b, c, h, w = latents.shape
    means = latents.reshape(b, c, cells, h // cells, cells, w // cells).mean(dim=(3, 5))
    return torch.nn.functional.interpolate(means, size=(h, w), mode="bilinear", align_corners=False)


def test_keep_layout_keeps_the_coarse_guidance_at_the_top_noise_levels_and_reverses_it_below():
    """Section 10: where the layout forms, the concept's guidance averaged over 4 x 4 cells of the
    latent is kept (where its object goes, how big) and its detail dropped; below, it is reversed."""
    base, alternative = torch.full((4, 2, 8, 8), 2.0), torch.full((4, 2, 8, 8), 7.0)
    detail = ((torch.arange(8)[:, None] + torch.arange(8)) % 2 * 2 - 1).float()  # +-1 alternating: no coarse part
    erase = base + 1.0 + 0.5 * detail  # the concept's guidance: 1 everywhere, and a one-pixel pattern
    t = torch.tensor([999, 600, 599, 0])
    target = make_objective("surgical", keep_layout=0.4).target(base, erase, t, 1000, alternative)
    kept = 2 + 1 + (7 - 2)  # e*(x,b) + the coarse part of g*(x,c_e) + g*(x,c_a)
    reversed_ = base + (alternative - base) - 1.0 * (erase - base)  # e*(x,b) + g*(x,c_a) - eta g*(x,c_e)
    assert torch.allclose(target[:2], torch.full_like(target[:2], kept))
    assert torch.allclose(target[2:], reversed_[2:])
    without = make_objective("surgical", keep_layout=0.4).target(base, erase, t, 1000)
    assert torch.allclose(without[:2], torch.full_like(without[:2], 3.0))
    assert torch.equal(make_objective("surgical").target(base, erase, t, 1000, alternative), reversed_)

    # a concept that draws in the top-left corner keeps drawing there
    corner = base.clone()
    corner[..., :2, :2] += 4.0
    where = make_objective("surgical", keep_layout=1.0).target(base, corner, t, 1000) - base
    assert torch.allclose(where, cell_means(corner - base))
    assert float(where[..., :4, :4].sum()) > 0.9 * float(where.sum()) and float(where[..., 4:, 4:].abs().max()) == 0


@pytest.mark.parametrize("train", ["xattn", "xattn-kv", "noxattn", "full"])
def test_gradients_reach_only_the_selected_deltas(tiny_model_dirs, train):
    from erase_engine import load_denoiser

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    layers = denoiser.unet_layers()
    deltas = WeightDeltas.create(layers, train, rank=2)
    for module in deltas.by_layer.values():  # make every delta non-zero so each can receive gradient
        torch.nn.init.normal_(module.up)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    denoiser.output(x, t, denoiser.encode(["a cat"]), deltas).square().mean().backward()

    selected = {layer.ldm_name for layer in layers if is_trainable(layer.ldm_name, train)}
    assert {deltas.layers[k].ldm_name for k in deltas.by_layer} == selected
    for key, module in deltas.by_layer.items():
        assert module.down.grad is not None and module.down.grad.abs().sum() > 0, key
    assert all(p.grad is None for p in denoiser.unet.parameters())
    # the sets mean what ESD's names say
    if train == "xattn":
        assert all(".attn2." in n for n in selected)
    if train == "xattn-kv":
        assert selected and all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in selected)
    if train == "noxattn":
        assert not any(".attn2." in n or n.startswith(("time_embed", "out.")) for n in selected)


@pytest.mark.parametrize("lora_rank", [4, None])
def test_base_model_is_bit_identical_after_an_erasure(tiny_denoiser, lora_rank):
    modules = [tiny_denoiser.unet, tiny_denoiser.vae, *tiny_denoiser.text_encoders]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    config = EraseConfig(
        erase=["a cat"],
        preserve=["a dog"],
        train="full",
        lora_rank=lora_rank,
        steps=3,
        lr=1e-2,
        trajectories=1,
        sampler_steps=3,
    )
    erasure = erase_concept(tiny_denoiser, config)
    assert any(float(d().abs().max()) > 0 for d in erasure.deltas.by_layer.values())
    for module, state in zip(modules, before, strict=True):
        after = module.state_dict()
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], v) for k, v in state.items())


def test_erasure_moves_the_concept_to_the_target_and_keeps_the_unconditional(tiny_denoiser):
    """Checked on held-out trajectories (other seeds), against the target formula.  In the tiny
    random SDXL most of a prompt's guidance flows through the pooled embedding into the time
    embedding: with cross-attention alone (no pooled text projection in ``xattn``) the gap
    stayed at 0.88 (60 steps, lambda_u 1). At lambda_u 8 the concept moves more slowly:
    60 steps left SD1's gap at 0.69, 120 steps 0.47."""
    config = EraseConfig(
        erase=["a cat"], contexts=["{}"], train="xattn", steps=120, lr=3e-3, lora_rank=8,
        trajectories=4, sampler_steps=10,
    )  # fmt: skip
    erasure = erase_concept(tiny_denoiser, config)
    held_out = TrajectoryCache.sample(
        tiny_denoiser, ["a cat"], 4, 10, 3.0, (4, 8, 8), torch.Generator().manual_seed(123)
    )
    x = held_out.latents["a cat"].flatten(0, 1)
    t = held_out.timesteps.repeat(4)
    cat, empty = tiny_denoiser.encode(["a cat"]).repeat(len(x)), tiny_denoiser.encode([""]).repeat(len(x))
    with torch.no_grad():
        teacher_cat, teacher_empty = tiny_denoiser.output(x, t, cat), tiny_denoiser.output(x, t, empty)
        student_cat = tiny_denoiser.output(x, t, cat, erasure.deltas)
        student_empty = tiny_denoiser.output(x, t, empty, erasure.deltas)
    target = teacher_empty - erasure.objective.eta * (teacher_cat - teacher_empty)
    gap_ratio = float((student_cat - target).norm() / (teacher_cat - target).norm())
    uncond_drift = float((student_empty - teacher_empty).norm() / teacher_empty.norm())
    print(f"{tiny_denoiser.info.architecture}: gap after/before {gap_ratio:.3f}, uncond drift {uncond_drift:.4f}")
    assert gap_ratio < 0.6
    assert uncond_drift < 0.03


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_pooled_guidance_share_is_measured_in_the_models_dtype(tiny_model_dirs, dtype):
    """The full-size benchmark's share of SDXL's guidance through the pooled embedding alone, on a
    half-precision model, agrees with the same model's share in fp32 (its random latents once
    stayed fp32 and a bf16 SDXL stopped with a dtype error)."""
    from erase_engine import load_denoiser
    from erase_engine.benchmarks.auto_full_size import pooled_guidance_share

    full = pooled_guidance_share(load_denoiser(tiny_model_dirs["sdxl"]), "a cat", None)
    half = pooled_guidance_share(load_denoiser(tiny_model_dirs["sdxl"], dtype=dtype), "a cat", None)
    assert 0.1 < full
    assert half == pytest.approx(full, rel=0.02)


def test_bad_configs_are_refused_before_any_work():
    with pytest.raises(ValueError, match="erase"):
        EraseConfig(erase=[" "])
    with pytest.raises(ValueError, match="alternative"):
        EraseConfig(erase=["a cat"], into=["a dog"], method="esd").objective()
    with pytest.raises(ValueError, match="method"):
        EraseConfig(erase=["a cat"], method="magic").objective()
    with pytest.raises(ValueError, match="one per erased concept"):
        EraseConfig(erase=["a", "b", "c"], into=["x", "y"])
    with pytest.raises(ValueError, match="needs {} where the concept goes"):
        EraseConfig(erase=["a cat"], contexts=["{}", "a photo"])


def test_robust_on_a_host_without_word_embeddings_is_refused_before_sampling(tiny_model_dirs, monkeypatch):
    """A host adapter that cannot learn a word (ComfyUI's, A1111's and Forge's, for now) gets a
    clear error before the trajectory cache, not a failure after it."""
    from erase_engine import load_denoiser
    from erase_engine.denoiser import Denoiser
    from erase_engine.hosts.diffusers_model import DiffusersDenoiser

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    monkeypatch.setattr(DiffusersDenoiser, "word_vectors", Denoiser.word_vectors)
    monkeypatch.setattr(TrajectoryCache, "sample", lambda *args, **kwargs: pytest.fail("sampled before refusing"))
    with pytest.raises(ValueError, match="set robust to off"):
        erase_concept(denoiser, EraseConfig(erase=["a cat"], robust="on", steps=2))
