"""The held-out erasure score, auto steps and the automatic learning rate, on tiny models."""

import pytest
import torch

from erase_engine import EraseConfig, erase_concept
from erase_engine.deltas import WeightDeltas
from erase_engine.objective import make_objective
from erase_engine.sampling import TrajectoryCache
from erase_engine.score import LEVELS, Score, ScoreProbe
from erase_engine.trainer import CHECK_EVERY, RELATIVE_STEP, encode_prompts


@pytest.fixture
def held_out(tiny_model_dirs):
    from erase_engine import load_denoiser

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    prompts = ["a cat", "a photo of a cat", "a car", "a tree"]
    shape = denoiser.latent_shape(None)
    cache = TrajectoryCache.sample(denoiser, prompts, 2, 4, 3.0, shape, torch.Generator().manual_seed(0))
    return denoiser, cache


def random_lora(denoiser) -> WeightDeltas:
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)  # the same deltas every run
        deltas = WeightDeltas.create(denoiser.unet_layers(), "xattn", 2)
        for delta in deltas.by_layer.values():
            delta.up.normal_(0, 0.05)
    return deltas


@pytest.mark.parametrize(
    "into, context, rows_per_call",
    [("", "{}", None), ("a dog", "{}", None), ("a dog", "a photo of {}", None), ("a dog", "a photo of {}", 3)],
)
def test_the_score_is_the_formula_written_out_state_by_state(held_out, into, context, rows_per_call, monkeypatch):
    """remaining, distance and the drifts of docs/method.md section 7, computed here one
    held-out state at a time from the model's own outputs; in a context, the concept's guidance
    is taken from the sentence without it (section 9). The probe asks every prompt's states in
    one batch (``rows_per_call``: also in calls of 3 rows, each mixing prompts)."""
    from erase_engine import score as score_module

    if rows_per_call:
        monkeypatch.setattr(score_module, "BATCH", rows_per_call)
        monkeypatch.setattr(score_module, "BATCH_PIXELS", 0)
    denoiser, cache = held_out
    kept = ["a car", "a tree"]
    config = EraseConfig(erase=["a cat"], into=[into] if into else [], preserve=kept, contexts=[context])
    objective = make_objective("surgical")
    deltas = random_lora(denoiser)
    cond = encode_prompts(denoiser, config)
    pairs = config.prompt_pairs()
    probe = ScoreProbe(denoiser, objective, cache, pairs, kept, cond, bases=config.context_bases())
    erased, base = context.replace("{}", "a cat"), context.replace("{}", "").strip()
    # a robust erasure's adversary asks the concept another way: here, with other words
    score = probe.score(deltas, adversary={erased: denoiser.encode(["a photo of a dog"])})

    def out(prompt, x, t, with_deltas=False):
        with torch.no_grad():
            return denoiser.output(x[None], t[None], denoiser.encode([prompt]), deltas if with_deltas else None)[0]

    steps = cache.latents[erased].shape[1]
    levels = torch.linspace(0, steps - 1, min(LEVELS, steps)).round().long().unique()
    far = untouched = along = uncond = guidance = adversary = 0.0
    preserve = dict.fromkeys(kept, 0.0)
    for k in range(cache.latents[erased].shape[0]):
        for s in levels.tolist():
            x, t = cache.latents[erased][k, s], cache.timesteps[s]
            e_0, e_b, e_c = out("", x, t), out(base, x, t), out(erased, x, t)
            g_a = out(context.replace("{}", into), x, t) - e_b if into else 0.0
            target = e_b + g_a - objective.eta * (e_c - e_b)
            student = out(erased, x, t, True)
            far += float(((student - target) ** 2).sum())
            untouched += float(((e_c - target) ** 2).sum())
            along += float(((student - e_c) * (target - e_c)).sum())
            adversary += float(((out("a photo of a dog", x, t, True) - e_c) * (target - e_c)).sum())
            uncond += float(((out("", x, t, True) - e_0) ** 2).sum())
            guidance += float(((e_c - e_b) ** 2).sum())
            for p in kept:
                x_p = cache.latents[p][k, s]
                preserve[p] += float(((out(p, x_p, t, True) - out(p, x_p, t)) ** 2).sum())
    assert score.distance == pytest.approx((far / untouched) ** 0.5, rel=1e-3)
    assert score.remaining == pytest.approx(1 - along / untouched, rel=1e-3, abs=1e-4)
    assert score.uncond_drift == pytest.approx((uncond / guidance) ** 0.5, rel=1e-3)
    for p in kept:
        assert score.preserve_drift[p] == pytest.approx((preserve[p] / guidance) ** 0.5, rel=1e-4)
    # (the two prompts' drifts differ by more than that: a mix-up of their rows would show)
    assert score.preserve_drift["a car"] != pytest.approx(score.preserve_drift["a tree"], rel=1e-3)
    assert score.remaining != pytest.approx(1.0)  # the random deltas moved it
    assert score.adversary_remaining == pytest.approx(1 - adversary / untouched, rel=1e-3, abs=1e-4)
    assert probe.score(deltas).adversary_remaining is None


def test_each_concepts_remaining_is_that_concepts_score_alone(held_out):
    """Of an erasure of two concepts (each in two contexts), ``remaining_by_concept`` is, for each,
    the ``remaining`` of a probe that holds that concept alone; auto steps wait for the worse."""
    denoiser, cache = held_out
    cache = TrajectoryCache.sample(
        denoiser,
        ["a cat", "a photo of a cat", "a car", "a photo of a car"],
        2,
        4,
        3.0,
        denoiser.latent_shape(None),
        torch.Generator().manual_seed(1),
    )
    objective, deltas = make_objective("surgical"), random_lora(denoiser)

    def probe(concepts: list[str]) -> ScoreProbe:
        config = EraseConfig(erase=concepts, contexts=["{}", "a photo of {}"])
        cond = encode_prompts(denoiser, config)
        return ScoreProbe(denoiser, objective, cache, config.prompt_pairs(), [], cond, config.prompt_concepts())

    both = probe(["a cat", "a car"]).score(deltas)
    alone = {c: probe([c]).score(deltas).remaining for c in ("a cat", "a car")}
    assert both.remaining_by_concept == pytest.approx(alone, rel=1e-6)
    assert alone["a cat"] != pytest.approx(alone["a car"], rel=1e-3)  # the check can tell them apart
    assert min(alone.values()) < both.remaining < max(alone.values())  # the pooled figure lies between
    assert both.worst_remaining == pytest.approx(max(alone.values()), rel=1e-6)


def test_untrained_deltas_score_untouched(held_out):
    denoiser, cache = held_out
    config = EraseConfig(erase=["a cat"], preserve=["a car"])
    fresh = WeightDeltas.create(denoiser.unet_layers(), "xattn", 2)
    probe = ScoreProbe(
        denoiser, make_objective("surgical"), cache, config.pairs(), ["a car"], encode_prompts(denoiser, config)
    )
    score = probe.score(fresh)
    assert (score.remaining, score.distance, score.uncond_drift, score.preserve_drift["a car"]) == (
        pytest.approx(1.0),
        pytest.approx(1.0),
        pytest.approx(0.0, abs=1e-6),
        pytest.approx(0.0, abs=1e-6),
    )


def test_held_out_trajectories_are_never_drawn_for_training(tiny_model_dirs, monkeypatch):
    from erase_engine import load_denoiser, trainer

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    seen = {}
    split = TrajectoryCache.split

    def recording(cache, held):
        seen["all"], (seen["train"], seen["held"]) = cache, split(cache, held)
        return seen["train"], seen["held"]

    monkeypatch.setattr(TrajectoryCache, "split", recording)
    drawn = []
    draw_states = trainer.draw_states
    monkeypatch.setattr(trainer, "draw_states", lambda *a: drawn.append(draw_states(*a)) or drawn[-1])
    config = EraseConfig(erase=["a cat"], contexts=["{}", "a photo of {}"], steps=30, trajectories=2, sampler_steps=3)
    erase_concept(denoiser, config)
    assert {e for draw in drawn for e in draw.erase} == {e for e, _ in config.prompt_pairs()}  # every context
    for draw in drawn:
        for row, erased in enumerate(draw.erase):
            everything = seen["all"].latents[erased]
            held = seen["held"].latents[erased].flatten(0, 1)
            assert len(everything) == 2 + len(seen["held"].latents[erased])
            assert not any(torch.equal(draw.x[row], state) for state in held)
            assert any(torch.equal(draw.x[row], state) for state in everything.flatten(0, 1))


def test_auto_steps_stop_at_the_threshold_or_the_maximum(tiny_model_dirs):
    from erase_engine import load_denoiser

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    quick = {"erase": ["a cat"], "trajectories": 1, "sampler_steps": 2}
    reached = erase_concept(denoiser, EraseConfig(**quick, stop_at=0.999, max_steps=200))
    steps, score = reached.scores[-1]
    assert steps < 200 and steps % CHECK_EVERY == 0 and score.remaining <= 0.999 and score.uncond_drift <= 0.999
    earlier = reached.scores[:-1]
    assert all(s.remaining > 0.999 or s.uncond_drift > 0.999 for _, s in earlier) and "reached" in reached.stopped
    assert len(reached.losses) == steps

    capped = erase_concept(denoiser, EraseConfig(**quick, stop_at=0.01, max_steps=7))
    assert len(capped.losses) == 7 and capped.scores[-1][0] == 7 and "max_steps" in capped.stopped

    fixed = erase_concept(denoiser, EraseConfig(**quick, steps=5, stop_at=1.0))
    assert len(fixed.losses) == 5  # a number of steps given is run whatever the score

    # Of several concepts, auto steps wait for every one of them, not for the pooled figure.
    listed = {**quick, "erase": ["a cat", "a car"], "stop_at": 0.999, "max_steps": 400}
    both = erase_concept(denoiser, EraseConfig(**listed))
    steps, score = both.scores[-1]
    assert "reached" in both.stopped and set(score.remaining_by_concept) == {"a cat", "a car"}
    assert max(score.remaining_by_concept.values()) <= 0.999
    assert all(max(*s.remaining_by_concept.values(), s.uncond_drift) > 0.999 for _, s in both.scores[:-1])


@pytest.mark.parametrize("into, stopping_check", [([], 2), (["a dog"], 3)])
def test_a_replacement_stops_at_a_third_of_stop_at(tiny_model_dirs, monkeypatch, into, stopping_check):
    """Auto steps stop at the first check whose remaining and uncond drift are at most stop_at
    (0.3), or where the concept is replaced by an alternative, a third of it (0.1): the held-out
    scores are scripted to fall 1.0, 0.5, 0.25, 0.09 check by check."""
    from erase_engine import load_denoiser

    scripted = iter([1.0, 0.5, 0.25, 0.09, 0.05])

    def score(self, deltas, adversary=None):
        level = next(scripted)
        return Score(remaining=level, distance=level, uncond_drift=level, preserve_drift={})

    monkeypatch.setattr(ScoreProbe, "score", score)
    config = EraseConfig(erase=["a cat"], into=into, trajectories=1, sampler_steps=2, stop_at=0.3, max_steps=200)
    erasure = erase_concept(load_denoiser(tiny_model_dirs["sd1"]), config)
    assert erasure.scores[-1][0] == stopping_check * CHECK_EVERY and len(erasure.losses) == stopping_check * CHECK_EVERY
    assert "reached" in erasure.stopped


def test_a_list_longer_than_a_step_holds_is_checked_less_often(tiny_model_dirs, monkeypatch):
    """Three concepts where a step holds two (instead of 65 and 64, to stay quick): each is
    trained in about half the steps, so the held-out score, which scores all of them, comes
    every 2 * CHECK_EVERY steps, and at the last one."""
    from erase_engine import load_denoiser, trainer

    monkeypatch.setattr(trainer, "MOST_PAIRS_PER_STEP", 2)
    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    config = EraseConfig(erase=["a cat", "a car", "a cup"], trajectories=1, sampler_steps=1, steps=45)
    assert [steps for steps, _ in erase_concept(denoiser, config).scores] == [0, 2 * CHECK_EVERY, 45]


def relative_change(change: torch.Tensor, weight: torch.Tensor) -> float:
    """A weight's change, as the RMS of the change over the RMS of the weight."""
    return float(change.float().pow(2).mean().sqrt() / weight.float().pow(2).mean().sqrt())


@pytest.mark.parametrize("rank", [None, 2])
def test_the_automatic_learning_rate_moves_every_layer_by_the_same_fraction(tiny_model_dirs, rank):
    """One AdamW step (its first moves each entry by its learning rate) on every layer with a
    gradient: the change of each layer's weight, relative to that weight's RMS, is RELATIVE_STEP
    for full-rank deltas, and close to it for LoRA factors (random signs add up as sqrt(rank))."""
    from erase_engine import load_denoiser

    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    deltas = WeightDeltas.create(denoiser.unet_layers(), "full", rank)
    optimizer = torch.optim.AdamW(deltas.parameter_groups(None, RELATIVE_STEP), weight_decay=0.0)
    if rank:  # a LoRA's up starts at zero: give the down factor its gradient through a first up
        with torch.no_grad():
            for delta in deltas.by_layer.values():
                delta.up.normal_(0, 1e-8)
    x = torch.randn(2, *denoiser.latent_shape(None))
    out = denoiser.output(x, torch.tensor([500, 500]), denoiser.encode(["a cat", ""]), deltas)
    before = {k: deltas.delta(k).detach().clone() for k in deltas.layers}
    out.pow(2).mean().backward()
    optimizer.step()
    ratios = []
    for key, layer in deltas.layers.items():
        change = deltas.delta(key).detach() - before[key]
        if change.abs().max() > 0:
            ratios.append(relative_change(change, layer.module.weight) / RELATIVE_STEP)
    ratios = torch.tensor(ratios)
    assert len(ratios) > 10
    if rank is None:
        assert ratios.median() == pytest.approx(1.0, rel=0.05)  # entries without gradient lower a few
    else:
        assert 0.3 < float(ratios.median()) < 3.0
    assert float(ratios.max() / ratios.min()) < (1.5 if rank is None else 10.0)  # no layer far off the others


@pytest.mark.parametrize("deepest_measured", [10_000, 8])
def test_a_stack_deeper_than_measured_moves_each_layer_less(tiny_model_dirs, monkeypatch, deepest_measured):
    """One training step of the real loop at the automatic rate, full-rank deltas (they start at
    zero, so after a step they are its change): each layer moves by RELATIVE_STEP of its weights'
    RMS while the stack is no deeper than DEEPEST_MEASURED, and by DEEPEST_MEASURED / layers of
    that in a deeper one, so that the whole stack moves as far as one of the measured depth."""
    from erase_engine import load_denoiser, trainer

    monkeypatch.setattr(trainer, "DEEPEST_MEASURED", deepest_measured)
    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    config = EraseConfig(erase=["a cat"], train="full", lora_rank=None, steps=1, trajectories=1, sampler_steps=2)
    deltas = erase_concept(denoiser, config).deltas
    layers = len(deltas.layers)
    assert layers > 8
    ratios = torch.tensor(
        [
            relative_change(deltas.delta(key), layer.module.weight)
            for key, layer in deltas.layers.items()
            if deltas.delta(key).abs().max() > 0
        ]
    )
    expected = RELATIVE_STEP * min(1.0, deepest_measured / layers)
    assert float(ratios.median()) == pytest.approx(expected, rel=0.05)
