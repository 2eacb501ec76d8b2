"""One parameter table, and every front end built from it: the CLI's flags and the gradio
form show each parameter's default, range and choices as ``PARAMETERS`` declares them (the
ComfyUI node's are checked against a real server in test_comfyui.py)."""

from __future__ import annotations

import argparse

import pytest

from erase_engine.frontends.cli import erase_parser
from erase_engine.parameters import PARAMETERS, EraseConfig


def test_the_table_declares_every_config_field_once():
    from dataclasses import fields

    assert [spec.name for spec in PARAMETERS] == [f.name for f in fields(EraseConfig)]
    for spec in PARAMETERS:
        assert spec.label and spec.help, spec.name
        if spec.kind in (int, float):
            assert spec.minimum < spec.maximum and spec.form_minimum <= spec.default <= spec.maximum, spec.name


def test_form_defaults_make_the_configs_defaults():
    """A form left at its defaults gives what ``EraseConfig`` gives with nothing set."""
    form = {spec.name: spec.default for spec in PARAMETERS} | {"erase": "a cat"}
    assert EraseConfig.from_form(form) == EraseConfig(erase=["a cat"])


@pytest.mark.parametrize(
    "name, form_value, config_value",
    [("lora_rank", 0, None), ("resolution", 0, None), ("steps", 0, None), ("lr", 0.0, None), ("max_steps", 0, None),
     ("eta", -1.0, None), ("lora_alpha", 0.0, None),
     ("lora_rank", 8.0, 8), ("preserve", "a dog\n\n a car ", ["a dog", "a car"]), ("into", "  ", [])],
)  # fmt: skip
def test_a_forms_unset_values_leave_the_setting_to_the_engine(name, form_value, config_value):
    config = EraseConfig.from_form({"erase": "a cat", name: form_value})
    assert getattr(config, name) == config_value


@pytest.mark.parametrize("concepts, most", [(1, 400), (2, 566), (5, 894), (12, 1386), (64, 3200), (100, 5000)])
def test_auto_gives_a_longer_list_more_steps(concepts, most):
    """Auto's most steps, 400 * K / sqrt(min(K, 64)) (docs/method.md, section 8), worked out by
    hand for these lists; a number given, of steps or of max_steps, is taken as it is."""
    erase = [f"concept {i}" for i in range(concepts)]
    assert EraseConfig(erase=erase).most_steps == most
    assert EraseConfig(erase=erase, max_steps=50).most_steps == 50
    assert EraseConfig(erase=erase, steps=7, max_steps=50).most_steps == 7


def test_values_outside_the_tables_ranges_are_refused():
    for spec in PARAMETERS:
        if spec.kind in (int, float):
            with pytest.raises(ValueError, match=f"{spec.name} must be between"):
                EraseConfig(erase=["a cat"], **{spec.name: spec.kind(spec.maximum * 2 + 1)})


def cli_actions() -> dict[str, argparse.Action]:
    actions = {}
    for action in erase_parser()._actions:
        actions.setdefault(action.dest, action)  # --lora-rank before its --full-rank switch
    return actions


def test_the_cli_shows_the_tables_defaults_ranges_and_choices():
    actions = cli_actions()
    for spec in PARAMETERS:
        action = actions[spec.name]
        assert action.option_strings[0] == "--" + spec.name.replace("_", "-")
        assert action.default == ([] if spec.is_list else spec.default), spec.name
        if spec.choices:
            assert tuple(action.choices) == spec.choices, spec.name
        elif spec.kind is not str:
            assert type(action.type("3")) is spec.kind, spec.name
            assert f"{spec.minimum:g} to {spec.maximum:g}" in action.help, spec.name
            if spec.unset_means == "auto":  # the word auto stands for the unset value
                assert action.type("auto") == spec.unset and "default auto" in action.help, spec.name


def test_the_cli_parses_into_the_config_a_form_gives():
    from erase_engine.frontends.cli import config_from_args

    args = erase_parser().parse_args(
        ["--erase", "a cat", "--into", "a dog", "--full-rank", "--eta", "-1", "--steps", "auto", "--lr", "2e-4"]
    )
    form = {"erase": "a cat", "into": "a dog", "lora_rank": 0, "eta": -1.0, "steps": 0, "lr": 2e-4}
    assert config_from_args(args) == EraseConfig.from_form(form)


def test_a_concept_list_file_and_the_forms_erase_field_give_one_config(tmp_path):
    from erase_engine.frontends.cli import config_from_args, erase_file_lines

    text = "# painters\nVan Gogh => dry brushing\n\n  Monet  \n#Degas\n"
    listed = tmp_path / "concepts.txt"
    listed.write_text(text)
    args = erase_parser().parse_args(["--erase", "Turner", "--erase-file", str(listed)])
    args.erase += erase_file_lines(args.erase_file)
    config = config_from_args(args)
    assert config == EraseConfig.from_form({"erase": "Turner\n" + text})
    assert config.pairs() == [("Turner", ""), ("Van Gogh", "dry brushing"), ("Monet", "")]


@pytest.mark.parametrize(
    ("erase", "into", "message"),
    [
        ("Van Gogh =>", "", "concept => alternative"),
        ("=> dry brushing", "", "concept => alternative"),
        ("Van Gogh => dry brushing", "sketch", "not both"),
        ("Monet\nmonet", "", "listed twice"),
        ("# only a comment\n\n", "", "non-empty concept"),
    ],
)
def test_a_bad_concept_list_is_refused(erase, into, message):
    with pytest.raises(ValueError, match=message):
        EraseConfig.from_form({"erase": erase, "into": into})


def gradio_components() -> dict[str, object]:
    gradio = pytest.importorskip("gradio")
    from erase_engine.frontends.web import Host, build_ui

    blocks = build_ui(Host())
    found = {}
    for component in blocks.blocks.values():
        elem_id = getattr(component, "elem_id", None) or ""
        if elem_id.startswith("ce_"):
            found[elem_id.removeprefix("ce_")] = component
    assert found and gradio
    return found


def test_the_web_form_shows_the_tables_defaults_ranges_and_choices():
    components = gradio_components()
    for spec in PARAMETERS:
        component = components[spec.name]
        assert component.value == spec.default, spec.name
        if spec.choices:  # gradio 4+ keeps (label, value) pairs, gradio 3 plain values
            assert [c[1] if isinstance(c, tuple) else c for c in component.choices] == list(spec.choices)
        elif spec.kind is not str:
            assert (component.minimum, component.maximum) == (spec.form_minimum, spec.maximum), spec.name
    assert components["preserve"].lines > 1  # the multiline field


def test_the_shipped_workflows_erase_at_the_defaults():
    """A ComfyUI user's first erasure is one of ``examples/``: apart from what it erases and
    preserves, its erase node holds every parameter's default, so it runs what the CLI runs."""
    import json

    from support import ROOT

    chosen = {"erase", "into", "preserve"}
    nodes = [
        (path.name, node["inputs"])
        for path in sorted((ROOT / "examples" / "api").glob("*.json"))
        for node in json.loads(path.read_text()).values()
        if node["class_type"] == "AllButOneEraseConcept"
    ]
    assert len(nodes) >= 4
    defaults = {spec.name: spec.default for spec in PARAMETERS if spec.name not in chosen}
    for name, inputs in nodes:
        assert {key: inputs[key] for key in defaults} == defaults, name
