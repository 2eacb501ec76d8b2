"""The many-concepts benchmark's instrument (erase_engine/benchmarks/many.py): what it erases and
keeps in each scenario, and the judge's reading of combinations on the original model."""

from __future__ import annotations

import argparse

import pytest

from erase_engine.benchmarks.many import KEPT_IN_GROWTH, Target, scenario
from erase_engine.builtin.render import COLORS, SHAPES

OPTIONS = argparse.Namespace(keep="circle", erase="red star", counts=[1, 3, 6, 12, 30])


def test_growth_spreads_over_shapes_and_colors_and_never_erases_what_it_keeps():
    rows = scenario("growth", OPTIONS)
    assert [len(erase) for erase, _ in rows] == OPTIONS.counts
    longest, kept = rows[-1]
    assert len(kept) == KEPT_IN_GROWTH and not set(kept) & set(longest)
    assert all(erase == longest[: len(erase)] for erase, _ in rows)  # each row adds to the one before
    for group in (longest[:6], longest[6:12], kept):  # every six: each shape and each color once
        targets = [Target.parse(name) for name in group]
        assert sorted(t.shape for t in targets) == list(range(len(SHAPES)))
        assert sorted(t.color for t in targets) == list(range(len(COLORS)))


def test_combination_keeps_its_neighbours_and_all_but_one_keeps_one_shape():
    ((erased, kept),) = scenario("combination", OPTIONS)
    assert erased == ["red star"] and len(kept) == 10
    assert all(("red" in k) != ("star" in k) for k in kept)  # the same color or the same shape, not both
    ((erased, kept),) = scenario("all-but-one", OPTIONS)
    assert kept == ["circle"] and sorted(erased + kept) == sorted(SHAPES)


@pytest.mark.parametrize("text", ["", "red blue", "star heart", "a red dog", "red star heart"])
def test_a_target_names_one_shape_one_color_or_one_of_each(text):
    with pytest.raises(ValueError, match="name a shape"):
        Target.parse(text)


def test_the_original_model_draws_combinations_the_judge_reads(shapes, judge):
    """The instrument before any erasure: asked for a color and shape, the model draws both."""
    for name in ("red star", "blue circle", "heart"):
        target = Target.parse(name)
        assert all(name.split()[-1] in p and (name.split()[0] in p) for p in target.prompts(8))
        assert target.accuracy(judge, shapes, None, 24, 10_000)["acc"] >= 0.8, name
