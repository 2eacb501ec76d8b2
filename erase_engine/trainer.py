"""The erasure loop: sample trajectories once, then train the deltas."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .adversary import Adversary
from .deltas import WeightDeltas
from .denoiser import Conditioning, Denoiser
from .objective import Objective, surgery_loss
from .parallel import Ranks
from .parameters import MOST_PAIRS_PER_STEP, REPLACED_STOP_SHARE, EraseConfig
from .sampling import TrajectoryCache
from .score import HELD_OUT_TRAJECTORIES, Score, ScoreProbe

OUT_OF_MEMORY_HINT = (
    "try fewer trajectories, a smaller resolution, LoRA mode (a small rank) or fewer trainable layers (xattn)"
)
# With the automatic learning rate, each step changes every trained weight by about this
# fraction of its RMS (docs/method.md, section 8; chosen on the built-in benchmark).
RELATIVE_STEP = 1e-2
# That step was measured on stacks of up to this many trained layers (SD1.5's cross-attention;
# the built-in model's is 16). The layers' changes all push the output the same way, so they add
# up: a deeper stack gets a step smaller by DEEPEST_MEASURED / layers, and the whole moves as far
# as one of that depth (a sqrt rule left SDXL's 281 unstable at lambda_u 8; docs/method.md, 8).
DEEPEST_MEASURED = 64
CHECK_EVERY = 20  # training steps between two held-out scores
# Rows of each kind (erased, preserve) in one student call: a longer batch runs in pieces whose
# gradients add up (the same step, in less memory).
MICRO_BATCH_ROWS = 32
# A robust erasure: every ADVERSARY_EVERY steps, ADVERSARY_STEPS steps of an attack with
# ADVERSARY_TOKENS learned vectors on the current deltas (warm-started: the attack grows with the
# erasure). Four vectors left less to the benchmark's attack than one on five shapes of six (the
# same on the sixth) at the same cost; eight cost the circle's erasure and the triangle's
# neighbours (docs/method.md, 11).
ADVERSARY_EVERY = 10
ADVERSARY_STEPS = 10
ADVERSARY_TOKENS = 4
BROKEN_MODEL_HINT = "the model file is damaged, or it runs in a precision too low for it (try full precision)"


class ErasureCancelled(Exception):
    """Raised when the host asks to stop; nothing has been written."""


class ErasureFailed(RuntimeError):
    """The run could not finish (out of memory, a non-finite loss); nothing was kept."""


@dataclass
class Erasure:
    """The result: trained deltas, the model they were trained on, and what describes them."""

    deltas: WeightDeltas
    denoiser: Denoiser
    config: EraseConfig
    objective: Objective
    losses: list[dict[str, float]]
    scores: list[tuple[int, Score]]  # (steps done, held-out score), from step 0
    stopped: str  # why training ended
    seconds: dict[str, float]

    @property
    def score(self) -> Score:
        return self.scores[-1][1]


@dataclass(frozen=True)
class Progress:
    """Where a run is: sampling the trajectory cache (the longest part on a CPU), then training."""

    phase: str  # "sampling" or "training"
    step: int  # steps done in this phase
    total: int  # steps in this phase
    losses: dict[str, float]  # the last training step's ({} while sampling)
    score: Score | None = None  # the last held-out score (None while sampling)


ProgressFn = Callable[[Progress], None]


@dataclass(frozen=True)
class RunHooks:
    """What a host gives a long run: a progress callback and a stop request, both optional."""

    progress: ProgressFn | None = None
    should_stop: Callable[[], bool] | None = None

    def stop_if_asked(self, phase: str, step: int, total: int) -> None:
        if self.should_stop is not None and self.should_stop():
            raise ErasureCancelled(f"stopped while {phase}, after {step} of {total} steps")

    def report(self, phase: str, step: int, total: int, losses: dict[str, float], score: Score | None = None) -> None:
        if self.progress is not None:
            self.progress(Progress(phase, step, total, losses, score))


@dataclass
class Draw:
    """One training step's states: a few erased prompts' ``x_t`` (a row each) and each preserve
    prompt's own, with the frozen model's outputs there (kept by the trajectory cache)."""

    erase: list[str]  # [E] erased prompts (concepts in contexts)
    into: list[str]  # [E] their alternatives ("" for none)
    base: list[str]  # [E] their contexts without the concept ("" for the concept alone)
    x: torch.Tensor  # [E, C, H, W]
    t: torch.Tensor  # [E]
    teacher_uncond: torch.Tensor  # [E, C, H, W]
    teacher_erase: torch.Tensor  # [E, C, H, W]
    preserve: list[str]
    preserve_x: torch.Tensor  # [P, C, H, W] (P = 0 when nothing is preserved)
    preserve_t: torch.Tensor  # [P]
    teacher_preserve: torch.Tensor | None  # [P, C, H, W]
    batch: tuple[int, int]  # (E, P) of the whole step's batch (its pieces, on every rank, together)
    asked: list[int] = field(default_factory=list)  # [E] robust: which sentence each row asks the word in

    def pieces(self, ranks: Ranks, most_rows: int) -> list[Draw]:
        """This rank's rows of the batch (all of them on one rank), in pieces of at most
        ``most_rows`` rows of each kind; one piece when they fit, an empty one when it has none."""
        erase, preserve = ranks.own(len(self.erase)), ranks.own(len(self.preserve))
        count = max(1, -(-len(erase) // most_rows), -(-len(preserve) // most_rows))
        return [self._rows(erase[i::count], preserve[i::count]) for i in range(count)]

    def _rows(self, erase: list[int], preserve: list[int]) -> Draw:
        return Draw(
            [self.erase[i] for i in erase],
            [self.into[i] for i in erase],
            [self.base[i] for i in erase],
            self.x[erase],
            self.t[erase],
            self.teacher_uncond[erase],
            self.teacher_erase[erase],
            [self.preserve[i] for i in preserve],
            self.preserve_x[preserve],
            self.preserve_t[preserve],
            self.teacher_preserve[preserve] if self.teacher_preserve is not None else None,
            self.batch,
            [self.asked[i] for i in erase] if self.asked else [],
        )


def erase_concept(
    denoiser: Denoiser,
    config: EraseConfig,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Erasure:
    """Train weight deltas that erase ``config.erase`` from ``denoiser``.

    ``progress(Progress)`` is called after every sampler step of the trajectory cache and
    every training step; if ``should_stop()`` turns true (checked as often) the run raises
    ``ErasureCancelled``.  Running out
    of memory or a non-finite loss raises ``ErasureFailed``.  The denoiser's own
    weights are never modified, whatever happens.
    """
    try:
        return _erase_concept(denoiser, config, progress, should_stop)
    except torch.OutOfMemoryError as error:
        raise ErasureFailed(f"out of memory: {OUT_OF_MEMORY_HINT}") from error


def _erase_concept(denoiser, config, progress, should_stop) -> Erasure:
    config = config.in_model_sentences(denoiser.example_prompts)
    objective = config.objective()
    generator = torch.Generator().manual_seed(config.seed)
    pick = random.Random(config.seed)
    started = time.perf_counter()

    ranks = Ranks.current()  # under torchrun: this process's share of the work (parallel.py)
    hooks = RunHooks(progress, should_stop)
    stop_if_asked, report = hooks.stop_if_asked, hooks.report

    def sampler_step(done: int, total: int) -> None:
        report("sampling", done, total, {})
        stop_if_asked("sampling the trajectory cache", done, total)

    cond = encode_prompts(denoiser, config)
    adversaries = Adversaries(denoiser, config) if config.robust == "on" else None  # before the long part
    use_preserve = bool(config.preserve) and objective.lambda_p > 0
    preserve = config.preserve if use_preserve else []
    stop_if_asked("sampling the trajectory cache", 0, config.sampler_steps)
    cache, held_out = sample_cache(denoiser, config, preserve, generator, sampler_step, ranks)
    pairs, concepts = config.prompt_pairs(), config.prompt_concepts()
    probe = ScoreProbe(
        denoiser, objective, held_out, pairs, preserve, cond, concepts, ranks, bases=config.context_bases()
    )
    sampled = time.perf_counter()

    # The deltas and their optimizer (the host's weights stay frozen and untouched).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        deltas = WeightDeltas.create(denoiser.unet_layers(), config.train, config.lora_rank, config.lora_alpha)
    deltas.to(denoiser.device)
    optimizer = torch.optim.AdamW(
        deltas.parameter_groups(config.lr, relative_step(len(deltas.layers))), weight_decay=0.0
    )

    most, every = config.most_steps, check_every(config)

    def score() -> Score:
        return probe.score(deltas, adversaries.in_own_sentences() if adversaries is not None else None)

    losses, scores = [], [(0, score())]
    for step in range(most):
        stop_if_asked("training", step, most)
        if adversaries is not None and step % ADVERSARY_EVERY == 0:
            adversaries.attack(deltas, cache, pick, generator)
        draw = draw_states(cache, config, preserve, pick, generator)
        if adversaries is not None:  # (drawn for the whole batch: every rank draws the same)
            draw.asked = adversaries.choose_sentences(draw.erase)
        optimizer.zero_grad(set_to_none=True)
        pieces = [
            backward_piece(denoiser, deltas, objective, piece, cond, adversaries)
            for piece in draw.pieces(ranks, MICRO_BATCH_ROWS)
        ]
        losses.append(ranks.sum({name: sum(p[name] for p in pieces) for name in pieces[0]}))
        if not math.isfinite(losses[-1]["loss"]):
            raise ErasureFailed(
                f"the loss became {losses[-1]['loss']} at step {step + 1}; nothing was kept (try a lower learning rate)"
            )
        ranks.sum_gradients(deltas.parameters())
        optimizer.step()
        done = step + 1
        if done % every == 0 or done == most:
            scores.append((done, score()))
        report("training", done, most, losses[-1], scores[-1][1])
        checked = scores[-1][0] == done
        if config.steps is None and checked and ranks.agree(erased(scores[-1][1], config.stop_threshold)):
            break  # auto: the held-out score says the concept is gone and the empty prompt is in place

    finished = time.perf_counter()
    deltas.requires_grad_(False)
    seconds = {"sampling": sampled - started, "training": finished - sampled, "total": finished - started}
    return Erasure(deltas, denoiser, config, objective, losses, scores, why_stopped(config, scores[-1][1]), seconds)


def backward_piece(
    denoiser: Denoiser,
    deltas: WeightDeltas,
    objective: Objective,
    draw: Draw,
    cond: dict[str, Conditioning],
    adversaries: Adversaries | None,
) -> dict[str, float]:
    """A piece of a step's batch: its share of the whole batch's loss, whose gradient is added
    to the deltas' (the pieces' shares add up to the batch's loss); its loss terms."""
    target = teacher_target(denoiser, objective, draw, cond)
    student = student_outputs(denoiser, deltas, objective, draw, cond, adversaries)
    asked_twice = adversaries is not None  # the concept asked through the attack's word: the same target
    if "adversary" in student:
        student["erase"] = torch.cat([student["erase"], student.pop("adversary")])
        target = torch.cat([target, target])
    batch_erase, batch_preserve = draw.batch
    terms = surgery_loss(
        objective,
        target,
        student.get("erase"),
        student_uncond=student.get("uncond"),
        teacher_uncond=draw.teacher_uncond,
        student_preserve=student.get("preserve"),
        teacher_preserve=draw.teacher_preserve,
        batch_rows=(batch_erase * (1 + asked_twice), batch_erase, batch_preserve),
    )
    if terms.total.requires_grad:  # (not on a rank whose share held no row)
        terms.total.backward()
    return terms.as_floats()


def relative_step(layers: int) -> float:
    """The automatic learning rate's step for each of ``layers`` trained layers, relative to its
    weights' RMS: ``RELATIVE_STEP``, smaller for a stack deeper than ``DEEPEST_MEASURED``."""
    return RELATIVE_STEP * DEEPEST_MEASURED / max(layers, DEEPEST_MEASURED)


def check_every(config: EraseConfig) -> int:
    """Training steps between two held-out scores: ``CHECK_EVERY``, or for a list longer than a
    step holds, the steps that train each concept about that often (a check scores every concept)."""
    return CHECK_EVERY * -(-len(config.erase) // MOST_PAIRS_PER_STEP)


def erased(score: Score, stop_at: float) -> bool:
    """Auto steps' test: the concept has gone far enough (in a robust erasure, also asked through
    the adversary's word), and the empty prompt's prediction has settled (early on, large steps
    move everything, and an alternative's direction is reached before the rest is pulled back in place)."""
    adversary = score.adversary_remaining if score.adversary_remaining is not None else 0.0
    return max(score.worst_remaining, score.uncond_drift, adversary) <= stop_at


def why_stopped(config: EraseConfig, score: Score) -> str:
    if config.steps is not None:
        return f"ran the {config.steps} steps asked for"
    reached = f"remaining {score.worst_remaining:.2f} and uncond drift {score.uncond_drift:.2f}"
    if score.adversary_remaining is not None:
        reached += f", through the adversary {score.adversary_remaining:.2f}"
    threshold = config.stop_threshold
    named = f"stop_at {config.stop_at:g}"
    if threshold != config.stop_at:
        named = f"{threshold:.2g}: {named} x {REPLACED_STOP_SHARE:.2g} for a replacement"
    if erased(score, threshold):
        return f"auto: the held-out score reached {reached} <= {named}"
    return f"auto: stopped at max_steps {config.most_steps} with {reached} ({named})"


def encode_prompts(denoiser: Denoiser, config: EraseConfig) -> dict[str, Conditioning]:
    """Every prompt's text conditioning, once (cloned: a host may have made it under inference mode)."""
    erased, alternatives = zip(*config.prompt_pairs(), strict=True)
    bases = [b for b in config.context_bases().values() if b]
    prompts = list(dict.fromkeys(["", *erased, *(a for a in alternatives if a), *bases, *config.preserve]))
    with torch.no_grad():
        encoded = denoiser.encode(prompts).detached().to(denoiser.device)
    cond = {p: encoded[i] for i, p in enumerate(prompts)}
    broken = [p for p, c in cond.items() if not all(v.isfinite().all() for v in (c.context, *c.extras.values()))]
    if broken:
        raise ErasureFailed(f"the model's text encoder gives NaN or inf for {broken[0]!r}: {BROKEN_MODEL_HINT}")
    return cond


def sample_cache(
    denoiser: Denoiser,
    config: EraseConfig,
    preserve: list[str],
    generator: torch.Generator,
    on_step: Callable[[int, int], None] | None = None,
    ranks: Ranks | None = None,
) -> tuple[TrajectoryCache, TrajectoryCache]:
    """The trajectory cache: the frozen model samples x_t once, for the erased and preserve
    prompts; the last trajectories of each prompt are held out of training, for the score.
    Each rank samples its share, and every rank gets the whole cache."""
    cache = TrajectoryCache.sample(
        denoiser,
        list(dict.fromkeys(erase for erase, _ in config.prompt_pairs())) + preserve,
        config.trajectories + HELD_OUT_TRAJECTORIES,
        config.sampler_steps,
        config.sampler_cfg,
        denoiser.latent_shape(config.resolution),
        generator,
        on_step,
        ranks,
    )
    if not all(x.isfinite().all() for x in (*cache.latents.values(), *cache.outputs.values())):
        raise ErasureFailed(f"the model's own samples became NaN or inf: {BROKEN_MODEL_HINT}")
    return cache.split(HELD_OUT_TRAJECTORIES)


def draw_states(
    cache: TrajectoryCache, config: EraseConfig, preserve: list[str], pick: random.Random, generator: torch.Generator
) -> Draw:
    """``config.pairs_per_step`` random (erased, alternative) prompt pairs, each at a random
    cached state of its own, and each preserve prompt at one of its own."""
    pairs, bases = config.prompt_pairs(), config.context_bases()
    chosen = pick.sample(pairs, config.pairs_per_step)
    erased = [cache.draw(erase, generator) for erase, _ in chosen]
    draws = [cache.draw(p, generator) for p in preserve]
    outputs = torch.stack([out for _, _, out in erased])  # [E, 2, C, H, W]: (uncond, erased prompt)
    return Draw(
        [erase for erase, _ in chosen],
        [into for _, into in chosen],
        [bases[erase] for erase, _ in chosen],
        torch.cat([x for x, _, _ in erased]),
        torch.cat([t for _, t, _ in erased]),
        teacher_uncond=outputs[:, 0],
        teacher_erase=outputs[:, 1],
        preserve=preserve,
        preserve_x=torch.cat([x for x, _, _ in draws]) if draws else erased[0][0][:0],
        preserve_t=torch.cat([t for _, t, _ in draws]) if draws else erased[0][1][:0],
        teacher_preserve=torch.stack([out[1] for _, _, out in draws]) if draws else None,
        batch=(len(chosen), len(preserve)),
    )


def teacher_target(denoiser: Denoiser, objective: Objective, draw: Draw, cond: dict[str, Conditioning]) -> torch.Tensor:
    """The erased prompts' targets.  The cache holds the empty prompt's and the erased prompt's
    outputs; a context's base (the sentence without the concept) and an alternative are computed
    (a row without an alternative takes its base's, which adds no guidance)."""
    base = teacher_outputs(denoiser, draw, draw.base, cond, draw.teacher_uncond)
    alternative = teacher_outputs(denoiser, draw, draw.into, cond, base)
    return objective.target(base, draw.teacher_erase, draw.t, denoiser.schedule.num_timesteps, alternative)


@torch.no_grad()
def teacher_outputs(
    denoiser: Denoiser, draw: Draw, prompts: list[str], cond: dict[str, Conditioning], otherwise: torch.Tensor
) -> torch.Tensor:
    """The frozen model's outputs for one prompt per row, at the rows' states (``otherwise``'s row where it is "")."""
    outputs = otherwise.clone()
    rows = [i for i, prompt in enumerate(prompts) if prompt]
    if rows:
        asked = Conditioning.cat([cond[prompts[i]] for i in rows])
        outputs[rows] = denoiser.output(draw.x[rows], draw.t[rows], asked)
    return outputs


def student_outputs(
    denoiser: Denoiser,
    deltas: WeightDeltas,
    objective: Objective,
    draw: Draw,
    cond: dict[str, Conditioning],
    adversaries: Adversaries | None = None,
) -> dict[str, torch.Tensor]:
    """The student's outputs for the erased prompts, the empty prompt (when it is pinned), the
    preserve prompts and, in a robust erasure, the erased prompts with the adversary's word in
    the concept's place (at the same states), from one batched call, by name."""
    rows = {}
    if draw.erase:  # (a rank's share of a small batch may hold no erased prompt)
        rows["erase"] = (Conditioning.cat([cond[p] for p in draw.erase]), draw.x, draw.t)
        if adversaries is not None:
            rows["adversary"] = (adversaries.conditions(draw.erase, draw.asked), draw.x, draw.t)
        if objective.lambda_u:
            rows["uncond"] = (cond[""].repeat(len(draw.x)), draw.x, draw.t)
    if draw.preserve:
        rows["preserve"] = (Conditioning.cat([cond[p] for p in draw.preserve]), draw.preserve_x, draw.preserve_t)
    if not rows:
        return {}
    conds, xs, ts = zip(*rows.values(), strict=True)
    outputs = denoiser.output(torch.cat(xs), torch.cat(ts), Conditioning.cat(list(conds)), deltas)
    return dict(zip(rows, outputs.split([len(x) for x in xs]), strict=True))


class Adversaries:
    """A robust erasure's attackers (AdvUnlearn's idea, docs/method.md section 11): for each
    erased concept, a word embedding learned against the current deltas to bring the concept
    back, and each erased prompt's conditioning with that word in the concept's place."""

    def __init__(self, denoiser: Denoiser, config: EraseConfig):
        self.denoiser = denoiser
        # erased prompt -> (concept, the sentences asking for it with the word: its own first)
        self.asked = config.adversarial_prompts(ADVERSARY_TOKENS)
        try:
            self.by_concept = {e: Adversary(denoiser, e, ADVERSARY_TOKENS) for e in config.erase}
        except NotImplementedError as error:
            raise ValueError(f"robust erasure is not available here yet: {error}; set robust to off") from None
        # per concept, its (erased prompt, a sentence with the word) pairs
        self.pairs = {
            e: [(p, asked) for p, (c, sentences) in self.asked.items() if c == e for asked in sentences]
            for e in config.erase
        }
        self.choose = random.Random(config.seed)  # draws the sentence a training row asks in
        self.sentences: dict[str, list[Conditioning]] = {}  # erased prompt -> each sentence's conditioning
        self._update_conditions()

    def attack(self, deltas: WeightDeltas, cache: TrajectoryCache, pick: random.Random, generator) -> None:
        """``ADVERSARY_STEPS`` attack steps per concept, at its cached states, on ``deltas`` as they are."""
        for concept, adversary in self.by_concept.items():
            for _ in range(ADVERSARY_STEPS):
                adversary.step(self.denoiser, deltas, cache, self.pairs[concept], pick, generator)
        self._update_conditions()

    def choose_sentences(self, erased: list[str]) -> list[int]:
        """For each erased prompt, which of its sentences a training row asks the word in (at random)."""
        return [self.choose.randrange(len(self.sentences[p])) for p in erased]

    def conditions(self, erased: list[str], asked: list[int]) -> Conditioning:
        """The erased prompts asked through the word, each in its ``asked`` sentence."""
        return Conditioning.cat([self.sentences[p][k] for p, k in zip(erased, asked, strict=True)])

    def in_own_sentences(self) -> dict[str, Conditioning]:
        """Each erased prompt asked through the word in its own sentence (what the score asks)."""
        return {erased: sentences[0] for erased, sentences in self.sentences.items()}

    def _update_conditions(self) -> None:
        by_concept = {}  # each distinct sentence encoded once (a concept's prompts share the carriers)
        for concept, adversary in self.by_concept.items():
            sentences = list(dict.fromkeys(asked for _, asked in self.pairs[concept]))
            encoded = adversary.condition(self.denoiser, sentences)
            by_concept[concept] = {sentence: encoded[i] for i, sentence in enumerate(sentences)}
        self.sentences = {p: [by_concept[c][s] for s in sentences] for p, (c, sentences) in self.asked.items()}
