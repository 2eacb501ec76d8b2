"""The erasure's parameters, declared once: ``EraseConfig``'s fields carry each one's label,
help, default, range and basic/advanced flag, and every front end (the CLI's flags, the
gradio form, the ComfyUI node's inputs) is built from ``PARAMETERS``.

A form shows a value that leaves a setting to the engine as ``unset`` (0: full rank or the
model's own size; -1: the method's preset); the config holds None there.
"""

from __future__ import annotations

import math
import re
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any

from .adversary import CARRIERS, check_no_placeholder, placeholders
from .layers import TRAINABLE_SETS
from .objective import PRESETS, Objective, make_objective

# Bounds on what a user types: prompts are stored in every file's header, which must stay small.
MAX_PROMPT_CHARS = 1000
MAX_PRESERVE_PROMPTS = 64
# Erased prompts (concepts in contexts) trained together in one step: at least this many, and
# one per concept of a longer list (each concept in every step), up to the most.
PAIRS_PER_STEP = 4
MOST_PAIRS_PER_STEP = 64
# Auto's most steps for one concept; a list gets more (``EraseConfig.most_steps``).
ONE_CONCEPT_MAX_STEPS = 400
# Auto's threshold where a concept is replaced, as a share of stop_at: at 1 the star stopped with
# hearts in 0.54 of the samples, at 1/3 in 1.00 (README, "On the built-in model, with the defaults only").
REPLACED_STOP_SHARE = 1 / 3


@dataclass(frozen=True)
class Parameter:
    """One user-facing erasure parameter, as every front end shows it."""

    label: str
    help: str
    default: Any  # as a form shows it
    minimum: float | None = None  # of a set value (``unset`` lies outside the range)
    maximum: float | None = None
    step: float | None = None  # the granularity a value must have
    choices: tuple[str, ...] = ()
    unset: int | float | None = None  # the form value that leaves the config's value None
    unset_means: str = ""  # what the engine does then
    advanced: bool = False
    multiline: bool = False  # one prompt per line
    slider: bool = False  # shown as a slider where a front end has one
    name: str = ""  # the EraseConfig field (filled in from it)
    is_list: bool = False  # the config holds a list of prompts (filled in from the field)

    @property
    def form_label(self) -> str:
        """The label with the meaning of ``unset``: "LoRA rank (0: full rank)"."""
        return f"{self.label} ({self.unset:g}: {self.unset_means})" if self.unset is not None else self.label

    @property
    def form_minimum(self) -> float | None:
        """The lowest value a form accepts: ``unset`` where it lies below the range."""
        if self.unset is not None and self.minimum is not None:
            return min(self.unset, self.minimum)
        return self.minimum

    @property
    def kind(self) -> type:
        """The form value's type: str, int or float."""
        return type(self.default)

    def to_config(self, value: Any) -> Any:
        """A form's value in the config's type (``EraseConfig`` turns ``unset`` into None)."""
        if self.is_list:
            text = str(value)
            return text.splitlines() if self.multiline else [text] if text.strip() else []
        return self.kind(value) if value is not None else None

    def check(self, value: Any) -> None:
        """Raise ValueError if a set value lies outside the range or off the step."""
        if value is None or self.kind is str:
            if self.choices and value not in self.choices:
                raise ValueError(f"unknown {self.name} {value!r}; choose one of {', '.join(self.choices)}")
            return
        if not (self.minimum <= value <= self.maximum) or not math.isfinite(value):
            raise ValueError(f"{self.name} must be between {self.minimum:g} and {self.maximum:g}, got {value}")
        if self.kind is int and self.step and value % self.step:
            raise ValueError(f"{self.name} must be a multiple of {self.step:g}, got {value}")


def parameter(
    label: str,
    help: str,
    default: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    step: float | None = None,
    **options,
) -> Field:
    """A config field declared with what the front ends show of it."""
    spec = Parameter(label, help, default, minimum, maximum, step, **options)
    if spec.kind is str and not spec.choices:  # prompts: a list in the config
        return field(default_factory=lambda: default.splitlines(), metadata={"parameter": spec})
    config_default = None if default == spec.unset else default
    return field(default=config_default, metadata={"parameter": spec})


def coefficient(label: str, help: str) -> Field:
    """One of the objective's coefficients: -1 in a form keeps the method's preset value."""
    return parameter(label, help, -1.0, 0.0, 100.0, 0.05, unset=-1.0, unset_means="the method's preset", advanced=True)


def without_concept(context: str) -> str:
    """A context with its concept's place taken out: "a {} on a white background" -> "a on a white background"."""
    return " ".join(context.replace("{}", " ").split())


def _whole_words(word: str) -> re.Pattern:
    """``word`` (one or more words) as whole words, in any case."""
    return re.compile(rf"\b{re.escape(word)}\b", re.IGNORECASE)


def holds_word(prompt: str, word: str) -> bool:
    """Whether ``word`` occurs in ``prompt`` as whole words (any case)."""
    return _whole_words(word).search(prompt) is not None


def with_word(prompt: str, word: str, replacement: str) -> str:
    """``prompt`` with the first ``word`` (whole words, any case) replaced."""
    return _whole_words(word).sub(replacement, prompt, count=1)


def fills(context: str, sentence: str, words: int) -> bool:
    """Whether ``sentence`` is ``context`` with a phrase of ``words`` words in its ``{}`` (any case)."""
    before, after = (re.escape(part) for part in context.split("{}", 1))
    phrase = r"\S+" + r"\s+\S+" * (words - 1)
    return re.fullmatch(before + phrase + after, sentence.strip(), re.IGNORECASE) is not None


def checked_contexts(contexts: list[str]) -> list[str]:
    """Sentence templates, stripped, each once, ``{}`` where the concept goes (none: the concept alone)."""
    kept = list(dict.fromkeys(c.strip() for c in contexts if c.strip())) or ["{}"]
    unplaced = [c for c in kept if "{}" not in c]
    if unplaced:
        raise ValueError(f"each context needs {{}} where the concept goes, got {unplaced[0]!r}")
    return kept


def concept_list(lines: list[str], into: list[str]) -> tuple[list[str], list[str]]:
    """Concepts as a list gives them (``--erase-file``, a form's erase field): one a line, a line
    ``concept => alternative`` names its own alternative; blank lines and ``#`` lines are skipped.
    Returns (concepts, alternatives): ``into`` as given unless a line names one."""
    erase, named = [], []
    for line in lines:
        if line.strip().startswith("#"):
            continue
        concept, arrow, alternative = (part.strip() for part in line.partition("=>"))
        if arrow and not (concept and alternative):
            raise ValueError(f"write 'concept => alternative', got {line.strip()!r}")
        if concept:
            erase.append(concept)
            named.append(alternative)
    if not any(named):
        return erase, into
    if any(i.strip() for i in into):
        raise ValueError("give the alternatives either after => in the concept list or as 'into', not both")
    return erase, named


@dataclass
class EraseConfig:
    """Everything an erasure depends on.  Same config and model: same result."""

    erase: list[str] = parameter(
        "Erase",
        "The concept to erase, e.g. 'Van Gogh'; several: one a line, 'concept => alternative' to name its own.",
        "",
        multiline=True,
    )
    into: list[str] = parameter(
        "Replace with (optional)", "What to draw instead (empty: nothing); one, or one per erased concept.", ""
    )
    preserve: list[str] = parameter(
        "Preserve (one prompt per line)", "Prompts whose pictures must not change.", "", multiline=True
    )
    method: str = parameter(
        "Method",
        f"surgical: the paper's guidance surgery, the empty prompt weighed {PRESETS['surgical'].lambda_u:g}x"
        " (lambda_u); esd: the ESD baseline.",
        "surgical",
        choices=tuple(PRESETS),
    )
    train: str = parameter(
        "Trainable layers",
        "Which UNet layers change: xattn (those that read the prompt: cross-attention, and on SDXL the"
        " pooled text's projection), xattn-kv (only cross-attention's key/value, and that projection),"
        " noxattn, full.",
        "xattn",
        choices=TRAINABLE_SETS,
    )
    lora_rank: int | None = parameter(
        "LoRA rank",
        "Rank of the trained LoRA; 0 trains full-rank deltas.",
        16,
        1,
        256,
        unset=0,
        unset_means="full rank",
        slider=True,
    )
    steps: int | None = parameter(
        "Steps",
        "Training steps; auto trains until the held-out score says the concept is gone (stop_at) or max_steps.",
        0,
        1,
        100_000,
        unset=0,
        unset_means="auto",
    )
    lr: float | None = parameter(
        "Learning rate",
        "AdamW's learning rate; auto sizes each layer's to its weights (the same on every model family).",
        0.0,
        1e-7,
        1.0,
        1e-5,  # the widget's step; finer values are typed (ComfyUI rounds to the minimum)
        unset=0.0,
        unset_means="auto",
    )
    seed: int = parameter("Seed", "Same seed and inputs: the same file.", 0, 0, 2**64 - 1)
    eta: float | None = coefficient("eta", "Negative guidance on the erased concept.")
    lambda_u: float | None = coefficient("lambda_u", "Weight of the unconditional-score term.")
    lambda_p: float | None = coefficient("lambda_p", "Weight of the preserve term.")
    trajectories: int = parameter(
        "Trajectories per prompt",
        "Seeds the frozen model samples once per prompt.",
        4,
        1,
        64,
        advanced=True,
        slider=True,
    )
    sampler_steps: int = parameter(
        "Sampler steps", "DDIM steps of the trajectory sampler.", 50, 1, 1000, advanced=True, slider=True
    )
    sampler_cfg: float = parameter(
        "Sampler CFG", "CFG scale of the trajectory sampler.", 3.0, 0.0, 30.0, 0.5, advanced=True, slider=True
    )
    resolution: int | None = parameter(
        "Resolution",
        "Image size in pixels the erasure trains at.",
        0,
        8,
        4096,
        8,
        unset=0,
        unset_means="the model's",
        advanced=True,
    )
    lora_alpha: float | None = parameter(
        "LoRA alpha",
        "LoRA scale numerator (alpha / rank).",
        0.0,
        1e-3,
        4096.0,
        unset=0.0,
        unset_means="the rank",
        advanced=True,
    )
    stop_at: float = parameter(
        "Stop at remaining",
        (
            "Auto steps stop once the held-out remaining score (1: untouched, 0: erased) and uncond drift"
            f" are at most this (× {REPLACED_STOP_SHARE:.2g} where the concept is replaced by an alternative)"
        ),
        0.3,
        0.01,
        1.0,
        0.01,
        advanced=True,
    )
    max_steps: int | None = parameter(
        "Max steps",
        f"The most steps auto may take; auto: {ONE_CONCEPT_MAX_STEPS} for one concept,"
        f" {ONE_CONCEPT_MAX_STEPS} × concepts / √(concepts a step) for a list.",
        0,
        1,
        100_000,
        unset=0,
        unset_means="auto",
        advanced=True,
    )
    contexts: list[str] = parameter(
        "Contexts (one per line; {} stands for the concept)",
        "Sentences to erase the concept in as well, as your prompts use it (the words after a concept carry it);"
        " a model that declares the sentences it is asked (the built-in one) adds its own.",
        "{}",
        multiline=True,
        advanced=True,
    )
    keep_layout: float = parameter(
        "Keep layout",
        "The top fraction of noise levels (where an image's layout forms) at which the concept's guidance is "
        "kept only coarsely (where and how big) rather than reversed: 0.4 keeps more of an erased object's "
        "place and size; a color or style also forms there and is then erased less.",
        0.0,
        0.0,
        0.9,
        0.05,
        advanced=True,
    )

    robust: str = parameter(
        "Robust to attacks",
        "on: while erasing, keep learning a word embedding that brings the concept back (a textual-inversion "
        "attack) and erase the concept under it too; about twice the time.",
        "off",
        choices=("off", "on"),
        advanced=True,
    )

    def __post_init__(self) -> None:
        for spec in PARAMETERS:  # a form's "unset" value stands for None here too
            value = getattr(self, spec.name)
            if spec.unset is not None and value is not None and value == spec.unset:
                setattr(self, spec.name, None)
        self.erase, self.into = concept_list(self.erase, self.into)
        self.into = [p.strip() for p in self.into]
        self.preserve = [p.strip() for p in self.preserve if p.strip()]
        self.contexts = checked_contexts(self.contexts)
        if not self.erase:
            raise ValueError("give at least one non-empty concept to erase")
        repeated = [e for i, e in enumerate(self.erase) if e.casefold() in {c.casefold() for c in self.erase[:i]}]
        if repeated:
            raise ValueError(f"the concept {repeated[0]!r} is listed twice")
        if self.into and len(self.into) not in (1, len(self.erase)):
            raise ValueError("give one alternative, or one per erased concept")
        if len(self.into) == 1:
            self.into = self.into * len(self.erase)
        for erase, into in zip(self.erase, self.into, strict=False):
            if erase.casefold() == into.casefold():
                raise ValueError(f"the alternative {into!r} is the concept being erased")
        kept = sorted({p for p in self.preserve if p.casefold() in {e.casefold() for e in self.erase}})
        if kept:
            raise ValueError(f"the preserve list contains the concept being erased: {kept}")
        if len(self.preserve) > MAX_PRESERVE_PROMPTS:
            raise ValueError(f"at most {MAX_PRESERVE_PROMPTS} preserve prompts, got {len(self.preserve)}")
        erased = {e.casefold(): e for e, _ in self.prompt_pairs()}
        in_context = [p for p in self.preserve if p.casefold() in erased]
        if in_context:
            raise ValueError(
                f"the preserve prompt {in_context[0]!r} is a concept in one of the contexts; remove it or that context"
            )
        if self.robust == "on":
            check_no_placeholder([*self.erase, *self.into, *self.preserve, *self.contexts])
        longest = max([*(p for pair in self.prompt_pairs() for p in pair), *self.preserve], key=len)
        if len(longest) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompts are limited to {MAX_PROMPT_CHARS} characters, one has {len(longest)}")
        for spec in PARAMETERS:
            if not spec.is_list:
                spec.check(getattr(self, spec.name))

    def objective(self) -> Objective:
        objective = make_objective(self.method, self.eta, self.lambda_u, self.lambda_p, self.keep_layout)
        if any(self.into) and not objective.allows_alternative:
            raise ValueError(f"the {self.method!r} method erases without an alternative; drop --into")
        return objective

    def pairs(self) -> list[tuple[str, str]]:
        """(concept, alternative) as the user gave them ("" where there is no alternative)."""
        return list(zip(self.erase, self.into or [""] * len(self.erase), strict=True))

    def prompt_pairs(self) -> list[tuple[str, str]]:
        """(erased prompt, alternative prompt) for each concept in each context: what training draws from."""
        return [
            (context.replace("{}", erase), context.replace("{}", into) if into else "")
            for erase, into in self.pairs()
            for context in self.contexts
        ]

    def context_bases(self) -> dict[str, str]:
        """Each erased prompt -> its context with the concept taken out ("" for the concept alone): the
        prompt whose prediction the surgery keeps, removing only the concept's guidance (docs/method.md, section 9)."""
        return {c.replace("{}", erase): without_concept(c) for erase in self.erase for c in self.contexts}

    def prompt_concepts(self) -> list[str]:
        """The erased concept of each of ``prompt_pairs``."""
        return [erase for erase, _ in self.pairs() for _ in self.contexts]

    @property
    def pairs_per_step(self) -> int:
        """Rows of erased prompts in each training step's batch."""
        return min(len(self.prompt_pairs()), max(PAIRS_PER_STEP, min(len(self.erase), MOST_PAIRS_PER_STEP)))

    @property
    def most_steps(self) -> int:
        """The steps a run may take: those asked for, or auto's most: ``max_steps``, or when that
        is unset ``400 · K / √m`` for K concepts of which m share a step (400 for one; docs/method.md, section 8)."""
        if self.steps is not None:
            return self.steps
        if self.max_steps is not None:
            return self.max_steps
        concepts = len(self.erase)
        return round(ONE_CONCEPT_MAX_STEPS * concepts / math.sqrt(min(concepts, MOST_PAIRS_PER_STEP)))

    @property
    def stop_threshold(self) -> float:
        """Auto steps' threshold: ``stop_at``, or where a concept is replaced, ``REPLACED_STOP_SHARE`` of
        it: the alternative's direction is reached after the concept has left (docs/method.md, section 8)."""
        return self.stop_at * (REPLACED_STOP_SHARE if any(self.into) else 1.0)

    def adversarial_prompts(self, tokens: int) -> dict[str, tuple[str, list[str]]]:
        """For a robust erasure: each erased prompt -> (its concept, the sentences that ask for it
        with the adversary's ``tokens`` placeholders in the concept's place: first the prompt's
        own, then the ``CARRIERS``)."""
        word = placeholders(tokens)
        return {
            context.replace("{}", erase): (
                erase,
                list(dict.fromkeys(c.replace("{}", word) for c in (context, *CARRIERS))),
            )
            for erase in self.erase
            for context in self.contexts
        }

    def in_model_sentences(self, sentences: tuple[str, ...]) -> EraseConfig:
        """This config erasing in the sentences the model is known to be asked
        (``Denoiser.example_prompts``; docs/method.md, section 9): each one that holds an erased
        concept becomes a context (the concept's words in it replaced by ``{}``), and the model's
        sentences of the same form with another phrase of as many words in the concept's place
        are preserved: the concept's neighbours, asked as the model is asked about them."""
        found = [(with_word(s, e, "{}"), len(e.split())) for e in self.erase for s in sentences if holds_word(s, e)]
        if not found:
            return self
        neighbours = [
            s
            for s in sentences
            if not any(holds_word(s, e) for e in self.erase) and any(fills(c, s, n) for c, n in found)
        ]
        return replace(
            self,
            contexts=list(dict.fromkeys([*self.contexts, *(c for c, _ in found)])),
            # the user's own prompts first: past the limit, model sentences are left out, never theirs
            preserve=list(dict.fromkeys([*self.preserve, *neighbours]))[:MAX_PRESERVE_PROMPTS],
        )

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_form(cls, values: dict[str, Any], **overrides) -> EraseConfig:
        """A config from a front end's values, named and shaped as ``PARAMETERS`` declares
        them (missing ones at their defaults); ``overrides`` are config values."""
        given = {spec.name: spec.to_config(values.get(spec.name, spec.default)) for spec in PARAMETERS}
        config = cls(**{**given, **overrides})
        config.objective()  # a bad combination of method and alternative fails here, before any work
        return config


def _declared(config_field: Field) -> Parameter:
    return replace(
        config_field.metadata["parameter"], name=config_field.name, is_list=str(config_field.type).startswith("list")
    )


PARAMETERS: tuple[Parameter, ...] = tuple(_declared(f) for f in fields(EraseConfig))
