"""The textual-inversion attack (docs/method.md, section 11) on tiny models: the placeholder
stands for its vectors exactly where a word would, the attack learns without touching the
model, its score is its formula, and the command writes a file and a report or nothing."""

import pytest
import torch
from safetensors.torch import load_file
from support.cli_runs import leftovers, run

from erase_engine import load_denoiser
from erase_engine.adversary import PLACEHOLDER
from erase_engine.attack import Attack, AttackConfig, learn_attack, recovered
from erase_engine.deltas import WeightDeltas
from erase_engine.sampling import TrajectoryCache
from erase_engine.score import HELD_OUT_TRAJECTORIES, LEVELS


def random_lora(denoiser) -> WeightDeltas:
    """Deltas that change the model (a trained erasure's stand-in)."""
    torch.manual_seed(0)
    deltas = WeightDeltas.create(denoiser.unet_layers(), "xattn", 2)
    with torch.no_grad():
        for delta in deltas.by_layer.values():
            delta.up.normal_(0, 0.05)
    return deltas


def conditions_equal(a, b) -> None:
    torch.testing.assert_close(a.context, b.context, rtol=0, atol=1e-6)
    assert a.extras.keys() == b.extras.keys()
    for key in a.extras:
        torch.testing.assert_close(a.extras[key], b.extras[key], rtol=0, atol=1e-6)


def test_the_placeholder_given_words_own_vectors_encodes_as_those_words(tiny_denoiser):
    """Two placeholders carrying the input embeddings of "red" and "car" give the conditioning
    of the sentence with those words, in every text encoder (SDXL's two, and its pooled vector)."""
    red, car = tiny_denoiser.word_vectors("red"), tiny_denoiser.word_vectors("car")
    vectors = [torch.cat([r, c]) for r, c in zip(red, car, strict=True)]
    asked = tiny_denoiser.encode_with_embedding(
        [f"a {PLACEHOLDER} {PLACEHOLDER} on a road", "a cat"], PLACEHOLDER, vectors
    )
    conditions_equal(asked, tiny_denoiser.encode(["a red car on a road", "a cat"]))
    with pytest.raises(ValueError, match="more than"):
        tiny_denoiser.encode_with_embedding([" ".join([PLACEHOLDER] * 3)], PLACEHOLDER, vectors)


@pytest.fixture
def attacked(tiny_model_dirs):
    denoiser = load_denoiser(tiny_model_dirs["sd1"])
    deltas = random_lora(denoiser)
    config = AttackConfig("cat", ["a {}", "a photo of a {}"], steps=40, trajectories=2, sampler_steps=4)
    unet = {k: v.clone() for k, v in denoiser.unet.state_dict().items()}
    encoder = {k: v.clone() for k, v in denoiser.text_encoders[0].state_dict().items()}
    trained = {k: v.clone() for k, v in deltas.state_dict().items()}
    attack = learn_attack(denoiser, deltas, config)
    return denoiser, deltas, attack, (unet, encoder, trained)


def test_the_attack_learns_only_its_vectors(attacked):
    denoiser, deltas, attack, (unet, encoder, trained) = attacked
    for before, module in ((unet, denoiser.unet), (encoder, denoiser.text_encoders[0]), (trained, deltas)):
        after = module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical
    start = denoiser.word_vectors("cat")[0]
    assert attack.vectors[0].shape == start.shape and not torch.equal(attack.vectors[0], start)
    assert len(attack.losses) == 40 and all(torch.isfinite(torch.tensor(attack.losses)))


def test_recovered_is_its_formula_and_zero_for_the_concepts_own_words(attacked):
    """The score written out state by state from the model's outputs; and the concept's own
    embedding, put in through the placeholder, recovers nothing (exactly 0)."""
    denoiser, deltas, attack, _ = attacked
    config = attack.config
    cache = TrajectoryCache.sample(
        denoiser,
        [c for c, _ in config.prompt_pairs()],
        1 + HELD_OUT_TRAJECTORIES,
        4,
        3.0,
        denoiser.latent_shape(None),
        torch.Generator().manual_seed(5),
    )
    _, held_out = cache.split(HELD_OUT_TRAJECTORIES)
    with_attack = without = 0.0
    for concept, prompt in config.prompt_pairs():
        x, t, outputs = held_out.states(concept, LEVELS)
        for i in range(len(x)):
            original = outputs[i, 1].double()
            cond = denoiser.encode_with_embedding([prompt], PLACEHOLDER, attack.vectors)
            with torch.no_grad():
                attacked_out = denoiser.output(x[i : i + 1], t[i : i + 1], cond, deltas)[0].double()
                erased_out = denoiser.output(x[i : i + 1], t[i : i + 1], denoiser.encode([concept]), deltas)[0].double()
            with_attack += float((attacked_out - original).pow(2).sum())
            without += float((erased_out - original).pow(2).sum())
    assert recovered(denoiser, deltas, attack, held_out) == pytest.approx(1 - with_attack / without, rel=1e-4)
    own = Attack(denoiser.word_vectors("cat"), config, [], 0.0, 0.0)
    assert recovered(denoiser, deltas, own, held_out) == pytest.approx(0.0, abs=1e-9)


def test_attack_command_writes_an_embedding_and_a_report(sd1, sd1_lora, tmp_path, capsys):
    out, report = tmp_path / "attack-cat.safetensors", tmp_path / "report"
    fast = ["--steps", "3", "--tokens", "2", "--seed", "1"]
    code, err = run(capsys, "attack", "--model", sd1, "--lora", sd1_lora, "--concept", "a cat", *fast, "--out", out,
                    "--report", report)  # fmt: skip
    assert code == 0, err
    denoiser = load_denoiser(sd1)
    state = load_file(out)
    assert list(state) == ["emb_params"]
    assert state["emb_params"].shape == (2, denoiser.text_encoders[0].config.hidden_size)
    assert sorted(p.name for p in report.iterdir()) == ["attack.png", "summary.json"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--concept", f"a {PLACEHOLDER}"], "stands for a learned embedding"),
        (["--concept", "a cat", "--contexts", "a photo"], "needs {}"),
        (["--concept", "a cat", "--tokens", "40"], "tokens must be"),
        (["--concept", "a cat", "--lora", "missing.safetensors"], "no LoRA"),
    ],
)
def test_attack_command_refuses_bad_input_and_writes_nothing(sd1, sd1_lora, tmp_path, capsys, args, message):
    given = ["attack", "--model", sd1, "--lora", sd1_lora, "--steps", "2", "--out", tmp_path / "e.safetensors", *args]
    code, err = run(capsys, *given)  # a later --lora replaces the good one
    assert code == 2 and message in err, err
    assert leftovers(tmp_path) == []
