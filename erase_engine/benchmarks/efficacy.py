"""The efficacy benchmark: one erasure on ``builtin:shapes``, judged before and after.

Erasing a shape ("star") or a color ("red"), optionally into another of its kind,
on a fixed set of seeds: how often the judge still sees the concept, how often it
sees the alternative, whether the layout and the other concepts survived, and
whether generated images of the concept can be purified, and whether a textual-inversion
attack at a fixed budget brings it back.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace

import torch

from ..attack import Attack, AttackConfig, learn_attack
from ..builtin.judge import HEADS, Judge, box_iou, foreground_mask, layout_kept, mask_iou
from ..builtin.render import BACKGROUNDS, COLORS, SHAPES, Scenes, prompt, render
from ..denoiser import Denoiser
from ..parameters import EraseConfig, with_word
from ..purify import purify
from ..report import grid_image, versions_grid
from ..sampling import generate
from ..trainer import Erasure, erase_concept

SAMPLE_STEPS = 25
SAMPLE_CFG = 5.0
ATTACK_STEPS = 300  # the benchmark's attack budget: one token, 300 steps
SAMPLE_SEED = 10_000  # the first noise seed of the samples (plus the erasure's seed)


@dataclass(frozen=True)
class Concept:
    kind: str  # "shape" or "color"
    index: int

    @property
    def head(self) -> int:
        """The judge's output (and scene attribute) that names this kind of concept."""
        return HEADS.index(self.kind)

    @property
    def name(self) -> str:
        return SHAPES[self.index] if self.kind == "shape" else list(COLORS)[self.index]

    @staticmethod
    def parse(text: str) -> Concept:
        word = text.strip().lower().removeprefix("a ").strip()
        if word in SHAPES:
            return Concept("shape", SHAPES.index(word))
        if word in COLORS:
            return Concept("color", list(COLORS).index(word))
        raise ValueError(f"the benchmark erases one of the shapes {SHAPES} or colors {tuple(COLORS)}, not {text!r}")


def other_concepts(erase: str) -> list[str]:
    """The other concepts of the erased one's kind, by name: what ``bench --preserve-others``
    and the studies preserve (the esd preset ignores them)."""
    concept = Concept.parse(erase)
    names = SHAPES if concept.kind == "shape" else tuple(COLORS)
    return [name for i, name in enumerate(names) if i != concept.index]


@dataclass
class Group:
    """Prompts with the shape and color each one asks for."""

    prompts: list[str] = field(default_factory=list)
    shapes: list[int] = field(default_factory=list)
    colors: list[int] = field(default_factory=list)

    def add(self, shape: int, color: int, background: str) -> None:
        self.prompts.append(prompt(SHAPES[shape], list(COLORS)[color], background))
        self.shapes.append(shape)
        self.colors.append(color)

    def wanted(self, kind: str) -> torch.Tensor:
        return torch.tensor(self.shapes if kind == "shape" else self.colors)


def prompt_groups(concept: Concept, samples: int) -> tuple[Group, Group]:
    """Every prompt that shows the concept, and every prompt of the other concepts of
    its kind, cycled to ``samples`` prompts each (one seed per sample)."""
    erase, preserve = Group(), Group()
    combos = list(itertools.product(range(len(SHAPES)), range(len(COLORS)), BACKGROUNDS))
    mine = [c for c in combos if c[concept.head] == concept.index]
    others = [c for c in combos if c[concept.head] != concept.index]
    for group, pool in ((erase, mine), (preserve, others)):
        for i in range(samples):
            group.add(*pool[(i * 7) % len(pool)])  # a stride that walks the whole pool
    return erase, preserve


def outline_iou_ceiling(concept: Concept, into: Concept | None, count: int = 256) -> float | None:
    """The mask IoU a perfect shape erasure would score: the erased shape rendered
    against the alternative (or each other shape) at the same place and size.  A new
    outline changes the mask, so ``layout_iou`` of a shape erasure stays below this."""
    if concept.kind != "shape":
        return None
    scenes = Scenes.random(count, torch.Generator().manual_seed(0), shape=concept.index)
    others = [into.index] if into else [i for i in range(len(SHAPES)) if i != concept.index]
    source = foreground_mask(render(scenes))
    ious = []
    for other in others:
        swapped = replace(scenes, shape=torch.full_like(scenes.shape, other))
        ious.append(mask_iou(source, foreground_mask(render(swapped))).mean())
    return average(torch.stack(ious))


def sample(denoiser: Denoiser, prompts: list[str], seed: int, deltas=None) -> torch.Tensor:
    """One image per prompt, sample i from noise seed ``seed + i`` (the same for any deltas)."""
    seeds = [seed + i for i in range(len(prompts))]
    return generate(denoiser, prompts, seeds, SAMPLE_STEPS, SAMPLE_CFG, deltas)


def average(values: torch.Tensor) -> float:
    """Mean of a tensor (booleans: the fraction true), to four places."""
    return round(float(values.float().mean()), 4)


def judge_erasure(
    judge: Judge,
    erasure: Erasure,
    concept: Concept,
    into: Concept | None,
    samples: int,
    seed: int,
    purify_samples: int = 32,
    uncond_samples: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """The benchmark's numbers for one finished erasure, and the images behind them; the empty
    prompt is sampled ``uncond_samples`` times (``samples`` by default)."""
    denoiser = erasure.denoiser
    erase, preserve = prompt_groups(concept, samples)
    images = {}
    empty = [""] * (uncond_samples or samples)
    for name, prompts in (("erase", erase.prompts), ("preserve", preserve.prompts), ("uncond", empty)):
        images[f"{name}_before"] = sample(denoiser, prompts, seed)
        images[f"{name}_after"] = sample(denoiser, prompts, seed, erasure.deltas)
    head = concept.head
    erase_before = judge.classify(images["erase_before"])
    erase_after = judge.classify(images["erase_after"])
    preserve_before = judge.classify(images["preserve_before"])[head]
    preserve_after = judge.classify(images["preserve_after"])[head]
    wanted = preserve.wanted(concept.kind)
    uncond_drift = (images["uncond_after"] - images["uncond_before"]).abs().flatten(1).mean(1)  # per sample
    masks_before, masks_after = foreground_mask(images["erase_before"]), foreground_mask(images["erase_after"])
    # layout_kept's references: the preserve prompts (barely touched: near 1), the original
    # model drawing the erase prompts again from other seeds (low), and the original model asked
    # for another concept in the same sentences at the same seeds (how far the model itself moves
    # the picture when only the word changes)
    images["erase_reseeded"] = sample(denoiser, erase.prompts, seed + samples)
    swap_concept, swap_kept = word_swap_layout_kept(judge, denoiser, concept, into, images["erase_before"], seed)

    # purification: generated images of the concept (original model) treated as real inputs
    inputs = images["erase_before"][:purify_samples]
    purified = purify(denoiser, inputs, erase.prompts[:purify_samples], erasure.deltas)
    images["purify_in"], images["purify_out"] = inputs, purified.cpu()
    purified_concept = judge.classify(images["purify_out"])[head]
    purify_removed = purified_concept != concept.index
    purify_kept = layout_kept(judge, inputs, images["purify_out"], concept.kind)

    metrics = {
        "erase_acc_before": average(erase_before[head] == concept.index),
        "erase_acc_after": average(erase_after[head] == concept.index),
        "into_acc_after": average(erase_after[head] == into.index) if into else None,
        "layout_iou": average(mask_iou(masks_before, masks_after)),
        "layout_iou_ceiling": outline_iou_ceiling(concept, into),
        "layout_box_iou": average(box_iou(masks_before, masks_after)),
        "layout_kept": average(layout_kept(judge, images["erase_before"], images["erase_after"], concept.kind)),
        "preserve_layout_kept": average(
            layout_kept(judge, images["preserve_before"], images["preserve_after"], concept.kind)
        ),
        "reseed_layout_kept": average(
            layout_kept(judge, images["erase_before"], images["erase_reseeded"], concept.kind)
        ),
        "swap_layout_kept": swap_kept,
        "swap_concept": swap_concept,
        "color_kept": average(erase_after[1] == erase.wanted("color")) if concept.kind == "shape" else None,
        "preserve_acc_before": average(preserve_before == wanted),
        "preserve_acc_after": average(preserve_after == wanted),
        "preserve_pixel_drift": average((images["preserve_after"] - images["preserve_before"]).abs()),
        "uncond_pixel_drift": average(uncond_drift),
        # a few samples that change their whole picture make most of it: how far it can move
        "uncond_pixel_drift_ci": bootstrap_interval(uncond_drift),
        "purify_removed": average(purify_removed),
        "purify_layout_iou": average(mask_iou(foreground_mask(inputs), foreground_mask(images["purify_out"]))),
        "purify_layout_kept": average(purify_kept),
        # the same among the purified images that no longer show the concept (an unchanged one keeps it)
        "purify_removed_layout_kept": average(purify_kept[purify_removed]) if purify_removed.any() else None,
    }
    return metrics, images


def word_swap_layout_kept(
    judge: Judge, denoiser: Denoiser, concept: Concept, into: Concept | None, before: torch.Tensor, seed: int
) -> tuple[str, float]:
    """The original model asked, at the seeds and in the sentences of ``before`` (the erase
    prompts' samples), for ``into`` or, without one, for each other concept of the kind: the
    concept whose samples keep ``before``'s layout most often, and that fraction."""
    others = [into] if into is not None else [Concept.parse(name) for name in other_concepts(concept.name)]
    kept = {}
    for other in others:
        swapped = prompt_groups(other, len(before))[0].prompts
        kept[other.name] = average(layout_kept(judge, before, sample(denoiser, swapped, seed), concept.kind))
    best = max(kept, key=kept.get)
    return best, kept[best]


def bootstrap_interval(values: torch.Tensor, level: float = 0.95, draws: int = 2000) -> list[float]:
    """The percentile bootstrap interval of the mean of ``values`` (a fixed resampling seed)."""
    generator = torch.Generator().manual_seed(0)
    picks = torch.randint(len(values), (draws, len(values)), generator=generator)
    means = values.double()[picks].mean(dim=1)
    tail = (1 - level) / 2
    return [round(float(q), 4) for q in means.quantile(torch.tensor([tail, 1 - tail], dtype=torch.float64))]


def judge_attack(
    judge: Judge,
    erasure: Erasure,
    concept: Concept,
    samples: int,
    seed: int,
    steps: int = ATTACK_STEPS,
    tokens: int = 1,
    attack_seed: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Does it come back?  A textual-inversion attack on the erased model (``steps`` x ``tokens``,
    its own draws from ``attack_seed``, the erasure's seed by default), trained in every sentence
    of the erase prompts, judged by ``attack_accuracy``."""
    erase, _ = prompt_groups(concept, samples)
    contexts = list(dict.fromkeys(with_word(p, concept.name, "{}") for p in erase.prompts))
    attack_seed = erasure.config.seed if attack_seed is None else attack_seed
    config = AttackConfig(concept.name, contexts, tokens, steps, seed=attack_seed)
    attack = learn_attack(erasure.denoiser, erasure.deltas, config)
    metrics, images = attack_accuracy(judge, erasure.denoiser, erasure.deltas, attack, concept, samples, seed)
    metrics |= {"attack_recovered": round(attack.recovered, 4), "attack_seconds": round(attack.seconds, 1)}
    return metrics, images


def attack_accuracy(
    judge: Judge, denoiser: Denoiser, deltas, attack: Attack, concept: Concept, samples: int, seed: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``attack_acc``: how often the judge sees the concept when the erased model is asked the
    erase prompts with the embedding in place of the concept's word, at the erase prompts' seeds."""
    erase, _ = prompt_groups(concept, samples)
    cond = attack.condition(denoiser, [with_word(p, concept.name, attack.prompt()) for p in erase.prompts])
    seeds = [seed + i for i in range(samples)]
    images = {"attack_after": generate(denoiser, cond, seeds, SAMPLE_STEPS, SAMPLE_CFG, deltas)}
    seen = judge.classify(images["attack_after"])[concept.head] == concept.index
    return {"attack_acc": average(seen)}, images


def run_bench(
    denoiser: Denoiser,
    judge: Judge,
    config: EraseConfig,
    samples: int = 72,
    attack_steps: int = ATTACK_STEPS,
    uncond_samples: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Erase ``config.erase[0]`` from the built-in model and judge it, then attack it with
    ``attack_steps`` (0: no attack)."""
    return with_attack(judge, *bench_erasure(denoiser, judge, config, samples, uncond_samples), attack_steps)


def bench_erasure(
    denoiser: Denoiser, judge: Judge, config: EraseConfig, samples: int, uncond_samples: int | None = None
) -> tuple[dict, dict[str, torch.Tensor], Erasure]:
    """``run_bench`` without the attack; also the erasure itself."""
    concept = Concept.parse(config.erase[0])
    into = Concept.parse(config.into[0]) if config.into and config.into[0] else None
    if into is not None and into.kind != concept.kind:
        raise ValueError("erase a shape into a shape, or a color into a color")
    started = time.perf_counter()
    erasure = erase_concept(denoiser, config)
    seconds = time.perf_counter() - started
    seed = SAMPLE_SEED + config.seed
    metrics, images = judge_erasure(judge, erasure, concept, into, samples, seed, uncond_samples=uncond_samples)
    result = {
        "method": config.method,
        "steps": erasure.scores[-1][0],
        "stopped": erasure.stopped,
        "erase": config.erase[0],
        "into": config.into[0] if config.into else None,
        # with the sentences the model declares (docs/method.md, section 9)
        "preserve": erasure.config.preserve,
        "contexts": erasure.config.contexts,
        "train": config.train,
        "lr": config.lr or "auto",
        "seconds": round(seconds, 1),
        **{f"score_{k}": v for k, v in erasure.score.as_dict().items() if k != "preserve_drift_by_prompt"},
        **metrics,
    }
    return result, images, erasure


def with_attack(
    judge: Judge, row: dict, images: dict[str, torch.Tensor], erasure: Erasure | None, attack_steps: int
) -> tuple[dict, dict[str, torch.Tensor]]:
    """A benchmark row with the attack's figures added (``attack_steps`` 0: none)."""
    if not attack_steps:
        return row, images
    concept, seed = Concept.parse(row["erase"]), SAMPLE_SEED + erasure.config.seed
    attacked, attack_images = judge_attack(judge, erasure, concept, len(images["erase_after"]), seed, attack_steps)
    return row | attacked, images | attack_images


ERASED = 0.05  # erase_acc_after at or below which the judge counts the concept as erased
MOST_STEPS = 6400  # the longest run equal erasure may ask for


def run_bench_until_erased(
    denoiser: Denoiser,
    judge: Judge,
    config: EraseConfig,
    samples: int = 72,
    attack_steps: int = ATTACK_STEPS,
    uncond_samples: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``run_bench`` at ``config``; while the judge still sees the concept in more than
    ``ERASED`` of the samples, again with twice the steps (up to ``MOST_STEPS``), so that
    methods are compared where each has erased it; the last run is attacked.  The row's
    ``erased`` says how it ended."""
    row, images, erasure = bench_erasure(denoiser, judge, config, samples, uncond_samples)
    while row["erase_acc_after"] > ERASED and row["steps"] < MOST_STEPS:
        longer = replace(config, steps=min(2 * row["steps"], MOST_STEPS))
        row, images, erasure = bench_erasure(denoiser, judge, longer, samples, uncond_samples)
    left = f"{row['erase_acc_after']:.2f} left after {row['steps']} steps"
    row["erased"] = f"erased: {left}" if row["erase_acc_after"] <= ERASED else f"NOT erased: {left}"
    return with_attack(judge, row, images, erasure, attack_steps)


def bench_grid(images: dict[str, torch.Tensor], columns: int = 8):
    """Original above erased for the first erase-prompt and preserve-prompt samples."""
    rows = ["erase", "preserve", "uncond"]
    before = torch.stack([images[f"{r}_before"][:columns] for r in rows])
    after = torch.stack([images[f"{r}_after"][:columns] for r in rows])
    return grid_image(["erase prompts", "other concepts", "empty prompt"], before, after)


def methods_grid(images: dict[str, dict[str, dict[str, torch.Tensor]]], columns: int = 8):
    """For each erased concept (``{concept: {method: images}}``), the same seeds of its erase
    prompts: the original model, then a row per method."""
    methods = next(iter(images.values())).keys()
    by_concept = list(images.values())
    versions = {"original": torch.stack([next(iter(shown.values()))["erase_before"][:columns] for shown in by_concept])}
    versions.update({m: torch.stack([shown[m]["erase_after"][:columns] for shown in by_concept]) for m in methods})
    return versions_grid([f"prompts with {erase!r}" for erase in images], versions)


TABLE_KEYS = (
    "steps",
    "score_remaining",
    "erase_acc_before",
    "erase_acc_after",
    "into_acc_after",
    "layout_iou",
    "layout_iou_ceiling",
    "layout_box_iou",
    "layout_kept",
    "swap_layout_kept",
    "preserve_layout_kept",
    "color_kept",
    "preserve_acc_before",
    "preserve_acc_after",
    "preserve_pixel_drift",
    "uncond_pixel_drift",
    "purify_removed",
    "purify_layout_iou",
    "purify_layout_kept",
    "purify_removed_layout_kept",
    "attack_acc",
    "seconds",
)


def table_cell(value, key: str = "") -> str:
    """A markdown cell; a drift (``key`` ending in ``drift``), whose figures are small, to three places."""
    places = 3 if key.endswith("drift") else 2
    return "-" if value is None else f"{value:.{places}f}" if isinstance(value, float) else str(value)


def comparison_table(rows: list[dict]) -> str:
    """A markdown table, one row per (concept, method)."""
    header = "| erase | into | method | " + " | ".join(TABLE_KEYS) + " |"
    lines = [header, "|" + "---|" * (3 + len(TABLE_KEYS))]
    for row in rows:
        cells = [row["erase"], row["into"] or "-", row["method"]]
        cells += [table_cell(row.get(k), k) for k in TABLE_KEYS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
