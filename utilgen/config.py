"""The run's configuration: frozen dataclasses per stage, named presets, files and ``--set`` overrides.

Layer 0: standard library only (``python -m utilgen.run --help`` and config errors answer
without importing torch). Each stage section is the stage's own config: ``fit_valuation`` takes
``ValuationConfig``, ``train_dpo_round`` ``MLCOConfig``, ``optimise_instances`` ``ILPOConfig``, so a
preset, a file and ``--set`` build exactly what the stage runs with, with no translation step.

Resolution order, later wins: the dataclass defaults, the preset (``PRESETS``), the config
file (``--config``, YAML or TOML, nested sections), then each ``--set section.key=value``.
Every key is checked against the dataclasses: an unknown key is rejected with the list of
valid ones, a value of the wrong type with the type expected, so a typo never runs an hour
with a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message says what would be accepted."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _one_of(section: str, key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{section}.{key} must be one of {', '.join(choices)}; got {value!r}")


# Range checks of a section's fields, each naming the key. Floats must also be finite: a learning rate of
# inf or 1e300 (or a NaN) passes "> 0" and only fails stages later, as a NaN loss or a raw traceback.
# "Finite" is float32's: the stages compute in float32 (or narrower), where anything above its largest value,
# 1e300 say, is already inf.
FLOAT32_MAX = 3.4028234663852886e38


def _finite(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def _at_least(config: Any, section: str, names: tuple[str, ...], minimum: int) -> None:
    for name in names:
        value = getattr(config, name)
        _require(value >= minimum, f"{section}.{name} must be >= {minimum}, got {value}")


def _positive_finite(config: Any, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        _require(_finite(value) and value > 0, f"{section}.{name} must be > 0 and finite (float32), got {value}")


def _non_negative_finite(config: Any, section: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        _require(_finite(value) and value >= 0, f"{section}.{name} must be >= 0 and finite (float32), got {value}")


def _seed(section_key: str, value: int) -> None:
    # numpy's default_rng (the splits) refuses negative seeds; one rule for every seed keeps them interchangeable
    _require(value >= 0, f"{section_key} must be >= 0, got {value}")


@dataclass(frozen=True)
class DataConfig:
    # "embedded": the Fashion-MNIST test-file subset shipped with utilgen (the default task); "validation":
    # the shipped validation set (train-file images the coarse generator never saw), for tuning; or an ImageFolder path.
    source: str = "embedded"
    image_size: int = 16  # ImageFolder images are resized to this side (the generator's output is resized too)
    channels: int = 1  # ImageFolder: 1 (grayscale) or 3 (RGB)
    shots_per_class: int = 16  # D_r: real training images per class (the paper's 16 shots)
    meta_per_class: int = 10  # D_v: held-out real images per class for TODV's outer loss
    test_per_class: int | None = None  # None: every remaining image is test (the untouched split)
    split_seed: int = 0

    def __post_init__(self) -> None:
        _require(self.source != "", "data.source is empty: give --data PATH (an ImageFolder) or use 'embedded'")
        _require(self.channels in (1, 3), f"data.channels must be 1 or 3, got {self.channels}")
        _require(self.image_size >= 8, f"data.image_size must be >= 8, got {self.image_size}")
        _require(self.shots_per_class >= 1, f"data.shots_per_class must be >= 1, got {self.shots_per_class}")
        _require(
            self.meta_per_class >= 1,
            f"data.meta_per_class must be >= 1 (TODV needs a meta set), got {self.meta_per_class}",
        )
        _require(
            self.test_per_class is None or self.test_per_class >= 1,
            f"data.test_per_class must be >= 1 or none (none: every remaining image), got {self.test_per_class}",
        )
        _seed("data.split_seed", self.split_seed)


@dataclass(frozen=True)
class GeneratorConfig:
    kind: str = "embedded"  # "embedded" or "stable-diffusion" (a local diffusers directory in ``path``)
    path: str | None = None
    # The embedded generator's shipped weights: "coarse" knows only tops/footwear/other, so the fine classes
    # are the task's to teach it (the paper's regime); "fine" knows the ten classes already (in-domain).
    embedded_weights: str = "coarse"
    dtype: str = "float32"  # "float32", "float16" or "bfloat16" (Stable Diffusion on a GPU: float16)
    steps: int = 10  # DDIM steps of every generation (plain, candidates, ILPO): one sampler for all pools
    guidance_scale: float = 2.0
    batch_size: int = 100
    attention: str = "auto"  # "auto", "xformers", "sdpa" or "plain" (Stable Diffusion only)

    def __post_init__(self) -> None:
        _one_of("generator", "kind", self.kind, ("embedded", "stable-diffusion"))
        _one_of("generator", "embedded_weights", self.embedded_weights, ("coarse", "fine"))
        _one_of("generator", "dtype", self.dtype, ("float32", "float16", "bfloat16"))
        _one_of("generator", "attention", self.attention, ("auto", "xformers", "sdpa", "plain"))
        _at_least(self, "generator", ("steps", "batch_size"), 1)
        # eps = eps_null + s * (eps_cond - eps_null): s = 1 is the conditional model alone (no guidance); below 1
        # the unconditional model takes over and at 0 the images ignore their class, so every pool would be
        # labelled by a class its images do not show, a wrong result that exits 0.
        _require(
            _finite(self.guidance_scale) and self.guidance_scale >= 1,
            "generator.guidance_scale must be >= 1 and finite (1: the conditional model alone, no guidance), "
            f"got {self.guidance_scale}",
        )


@dataclass(frozen=True)
class TokensConfig:
    """Textual inversion: per-class tokens from the real shots (docs/method.md, "Class tokens")."""

    # Tuned for plain generation on the validation set, before any UtilGen setting (issue 11's gate;
    # benchmarks/results/tuning-tokens-validation.json): of 200/400 steps x lr 5e-3/2.5e-2/1e-1, 400 at 0.1
    # gave plain the best synthetic-only accuracy (the grid's edge: plain might gain from more).
    steps: int = 400
    lr: float = 0.1
    batch_size: int = 32

    def __post_init__(self) -> None:
        _at_least(self, "tokens", ("steps",), 0)
        _at_least(self, "tokens", ("batch_size",), 1)
        _positive_finite(self, "tokens", ("lr",))


@dataclass(frozen=True)
class SyntheticConfig:
    first_pool_per_class: int = 30  # D_g0: generated with the class tokens, valued by TODV
    multiple: float = 5.0  # |D_g| = multiple x |D_r| for the plain and the UtilGen pool (the paper's 5x)

    def __post_init__(self) -> None:
        _at_least(self, "synthetic", ("first_pool_per_class",), 1)
        _positive_finite(self, "synthetic", ("multiple",))


# The choices of a few stage settings, here so that a bad value fails before torch is even imported.
NOISE_STRATEGIES = ("redenoise", "gradient", "none")
DRIFTS = ("l2", "class_consistency")
UTILITIES = ("meta-learned", "classifier-loss")
REAL_STEPS = ("fresh_forward", "reuse_forward", "lagged")  # TODV's theta step after the phi step
LOOKAHEAD_HVPS = ("exact", "forward_over_reverse", "finite_difference", "gauss_newton")
LORA_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' attention projections


@dataclass(frozen=True)
class ValuationConfig:
    """TODV: the classifier and the weight net W_phi trained bi-level (``utilgen.valuation.fit_valuation``).

    The run seed, the device and progress bars are the caller's, not settings of the stage.
    """

    # "meta-learned": W_phi trained bi-level against the meta set (TODV). "classifier-loss": the ablation
    # without meta-learning: the classifier trains unweighted and the utility is its p(y | x) = exp(-loss).
    utility: str = "meta-learned"
    # A key of utilgen.valuation.META_GRADIENTS (one step ahead), or "unrolled_hvp": lookahead_steps ahead.
    # finite_difference + the lagged real step: the only pair within 2.5x a plain training step's time and
    # 1.3x its memory (benchmarks/results/README.md, "TODV meta-iteration"), with the same flipped-label AUROC
    # as the others over 5 seeds (benchmarks/results/todv-variants.json).
    strategy: str = "finite_difference"
    # unrolled_hvp only (utilgen/valuation/multistep.py): T virtual steps on the next T training batches; the
    # Hessian-vector products' method (exact | forward_over_reverse | finite_difference | gauss_newton) and how
    # the logit tangent is taken (forward | finite_difference). gauss_newton + finite_difference is the
    # low-memory pair (~1.05x a training step at T = 5), exact + forward the accurate one (~2.6x).
    lookahead_steps: int = 1
    lookahead_hvp: str = "exact"
    lookahead_tangent: str = "forward"
    # How theta steps after each phi step (utilgen.valuation.meta_iteration): one of REAL_STEPS.
    real_step: str = "lagged"
    classifier: str = "cnn-small"  # a utilgen.models.build_classifier name
    steps: int = 150
    batch_size: int = 64
    meta_batch_size: int = 50
    meta_every: int = 1  # k: meta-update every k steps; 0 = no reweighting (all weights 1)
    inner_lr: float = 0.05  # a: SGD lr of theta and of the virtual step
    momentum: float = 0.9
    weight_decay: float = 5e-4
    meta_lr: float = 1e-3  # Adam on phi (Meta-Weight-Net)
    meta_weight_decay: float = 1e-4
    weight_net_hidden: int = 100
    features: tuple[str, ...] = ("loss",)
    fix_real_weights: bool = False  # real samples keep weight 1; only synthetic ones are reweighted
    normalize_weights: bool = True  # batch mean 1, as Meta-Weight-Net's code (docs/method.md, "TODV")
    # The inversion guard: refit from another seed, at most this many times, while the fit ranks the meta set's
    # wrong labels above the true ones (mislabel AUROC < 0.5); the best fit is kept. 0 = off. Inverted fits
    # are common (2 of 10 fit seeds on the flipped-label task of tests/test_valuation_fit.py): 4 restarts leave
    # about 0.03% to chance there.
    restarts: int = 4

    def __post_init__(self) -> None:
        _one_of("valuation", "utility", self.utility, UTILITIES)
        _one_of("valuation", "real_step", self.real_step, REAL_STEPS)
        _one_of("valuation", "lookahead_hvp", self.lookahead_hvp, LOOKAHEAD_HVPS)
        _one_of("valuation", "lookahead_tangent", self.lookahead_tangent, ("forward", "finite_difference"))
        _at_least(self, "valuation", ("lookahead_steps",), 1)
        _at_least(self, "valuation", ("restarts",), 0)
        _require(
            self.strategy == "unrolled_hvp" or self.lookahead_steps == 1,
            f"valuation.lookahead_steps={self.lookahead_steps} needs valuation.strategy=unrolled_hvp "
            f"(the strategy {self.strategy!r} looks one step ahead)",
        )
        _require(
            self.strategy != "unrolled_hvp" or self.real_step != "reuse_forward",
            "valuation.strategy=unrolled_hvp keeps no forward graph for the real step: "
            "use valuation.real_step=lagged or fresh_forward",
        )
        _at_least(self, "valuation", ("steps", "batch_size", "meta_batch_size", "weight_net_hidden"), 1)
        _require(self.meta_every >= 0, f"valuation.meta_every must be >= 0 (0: no reweighting), got {self.meta_every}")
        _positive_finite(self, "valuation", ("inner_lr", "meta_lr"))
        _non_negative_finite(self, "valuation", ("weight_decay", "meta_weight_decay"))
        # SGD accepts momentum >= 1, but then the step never decays: the classifier's weights run away
        _require(0 <= self.momentum < 1, f"valuation.momentum must lie in [0, 1), got {self.momentum}")
        object.__setattr__(self, "features", tuple(self.features))
        _require(len(self.features) >= 1, "valuation.features needs at least one feature (e.g. loss)")


@dataclass(frozen=True)
class MLCOConfig:
    """Model-level optimisation: rounds of candidates -> utility pairs -> Diffusion-DPO on a LoRA adapter
    (``utilgen.adaptation.train_dpo_round``)."""

    # The paper's strength: 2 rounds of 8 pairs per class from 32 candidates, the valuation refreshed after
    # each. A gap of 0.05 left sandal and shirt with 1-3 pairs on the coarse default (their candidates' top-8
    # vs bottom-8 utilities differ by 0.01-0.03): 0.01 skips only near-exact ties.
    rounds: int = 2  # 0 = no MLCO
    candidates_per_class: int = 32
    pairs_per_class: int = 8
    min_gap: float = 0.01  # pairs closer in utility than this are near-ties and skipped
    beta: float = 2500.0  # the convention: utilgen/adaptation/mlco.py's docstring
    # Chosen on validation (python -m utilgen.experiment mlco; benchmarks/results/tuning-mlco-validation.json):
    # of lr 5e-5/2e-4 x beta 2500/10000 at 50 steps per round, lr 2e-4 at beta 2500 gave the +MLCO pool the
    # largest gain over plain (+2.9 points, 95% CI -0.7 to +6.4 over 2 pipeline x 3 classifier seeds).
    lr: float = 2e-4  # AdamW on the adapter
    weight_decay: float = 0.0
    steps: int = 50  # per round
    batch_pairs: int = 16
    lora_rank: int = 8
    lora_alpha: float = 8.0
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    reanchor: bool = True  # merge the adapter into the base weights at the start of every round after the first
    max_grad_norm: float = 1.0  # clip the adapter's gradient norm; inf = no clipping
    log_every: int = 25
    refresh_valuation: bool = True  # refit TODV on D_r + the round's candidates after each round
    # A refit can invert: in 3 of 5 protocol seeds the refreshed W_phi rose with the loss and valued the
    # judge's wrong-class candidates highest. So the refreshed valuation replaces the one in use only if it
    # ranks the meta set's true labels above wrong labels at least as well (utilgen.valuation.probe).
    refresh_check: bool = True

    def __post_init__(self) -> None:
        _require(self.rounds >= 0, f"mlco.rounds must be >= 0, got {self.rounds}")
        _require(self.candidates_per_class >= 2, "mlco.candidates_per_class must be >= 2 (a pair needs two)")
        _at_least(self, "mlco", ("pairs_per_class", "steps", "batch_pairs", "lora_rank", "log_every"), 1)
        _positive_finite(self, "mlco", ("beta", "lr", "lora_alpha"))
        _non_negative_finite(self, "mlco", ("min_gap", "weight_decay"))
        _require(  # inf is documented as "no clipping"; NaN would clip every gradient to NaN
            self.max_grad_norm > 0, f"mlco.max_grad_norm must be > 0 (inf: no clipping), got {self.max_grad_norm}"
        )
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        # Other module names are legitimate LoRA targets (proj_in, ff.net.0.proj, ...): peft checks they exist.
        _require(len(self.target_modules) >= 1, "mlco.target_modules needs at least one module")


@dataclass(frozen=True)
class ILPOConfig:
    """Instance-level optimisation of the final pool (``utilgen.adaptation.optimise_instances``).

    The sampler (DDIM steps, guidance) is the generator section's: ILPO renders exactly the images the
    final generation makes. The repair threshold is resolved by the loop from ``repair_quantile``.
    """

    prompt_steps: int = 4  # Adam steps on the prompt embeddings; 0 = keep the class prompt
    prompt_lr: float = 0.05
    noise_strategy: str = "redenoise"  # one of NOISE_STRATEGIES
    noise_steps: int = 5  # "gradient" only
    noise_lr: float = 0.05  # "gradient" only
    # Prompt ascent: denoiser calls kept in the graph (the last ones). On the coarse default's validation run
    # (200 instances, prompt ascent alone; benchmarks/results/ilpo-prompt-gradient-depth.json) the utility
    # rose 0.0020 with 1 call, 0.0036 with 2 and 0.0054 with 3, at 1.18x and 1.34x the time of 1.
    grad_steps: int = 2
    # Noise ascent ("gradient"): None = every call. Truncation gives the noise a wrong gradient: the early
    # calls' epsilon is then a constant and only the clipped x0 path remains. Measured on the committed
    # embedded generator (20 steps, 4 noises, d sum(images)/d noise): norm 572 with 1 or 2 kept calls vs
    # 33.6 exact; on the tiny test model exactly 0 (x0 clipping saturates at t = T).
    noise_grad_steps: int | None = None
    redenoise_high_guidance: float = 5.5  # Golden Noise's defaults
    redenoise_low_guidance: float = 1.0
    drift: str = "l2"  # one of DRIFTS
    drift_weight: float = 1.0
    clip_weight: float = 0.0  # weight of the CLIP class-text penalty (the paper's drift); needs a ClipAlignment
    embed_max_distance: float | None = None  # hard L2 bound ||p - p_y|| (latent_update's anchor projection)
    # Repair mode (this project's extension): only instances whose class-prompt utility is below this
    # quantile of D_g0's utilities ascend; the rest keep the class prompt. None (the default): every instance
    # ascends, the paper's form. (On the in-domain generator every-instance ascent cost 1.7 points on
    # validation and repair mode at 0.25 was level with plain: benchmarks/results/README.md.)
    repair_quantile: float | None = None
    patience: int = 2  # evaluations without improvement before an instance stops
    min_improvement: float = 1e-4  # of the objective J
    batch_size: int = 100
    backend: str | None = None  # latent_update backend (None: utilgen.ops' automatic choice)
    # Kept denoiser calls under torch.utils.checkpoint: the same gradient for one more forward per kept call.
    # "auto": only when the ascent's saved activations would pass 2 GiB (measured on the generator: the embedded
    # one saves ~5.3 MiB per instance per kept guided call, so its prompt ascent (2 calls, batch 100: 1.0 GiB)
    # runs without it and its noise ascent (10 calls) with it). "always" or "never".
    checkpoint: str = "auto"
    # Reuse what the stage rendered already (adaptation/ilpo.py's docstring, "Cost"): a rounding-level change that
    # Adam's per-entry scaling grows to ~1e-3 in prompts and images (tests/test_ilpo.py, REUSE_PROMPT_ATOL).
    # False renders every image as Generator.sample does, bit for bit (the reference path).
    reuse_renders: bool = True

    def __post_init__(self) -> None:
        _one_of("ilpo", "noise_strategy", self.noise_strategy, NOISE_STRATEGIES)
        _one_of("ilpo", "checkpoint", self.checkpoint, ("auto", "always", "never"))
        _require(
            isinstance(self.reuse_renders, bool),
            f"ilpo.reuse_renders must be true or false, got {self.reuse_renders!r}",
        )
        _one_of("ilpo", "drift", self.drift, DRIFTS)
        _at_least(self, "ilpo", ("prompt_steps", "noise_steps", "grad_steps"), 0)
        _at_least(self, "ilpo", ("patience", "batch_size"), 1)
        _positive_finite(self, "ilpo", ("prompt_lr", "noise_lr"))
        # The re-denoising guidances may go below 1 (the inversion step is often run unconditional, at 0); the
        # class comes from the final sampler's generator.guidance_scale, checked >= 1 there.
        _non_negative_finite(self, "ilpo", ("redenoise_high_guidance", "redenoise_low_guidance"))
        _non_negative_finite(self, "ilpo", ("drift_weight", "clip_weight", "min_improvement"))
        _require(
            self.noise_grad_steps is None or self.noise_grad_steps >= 1,
            f"ilpo.noise_grad_steps must be >= 1 or none, got {self.noise_grad_steps}",
        )
        _require(
            self.embed_max_distance is None or (_finite(self.embed_max_distance) and self.embed_max_distance > 0),
            f"ilpo.embed_max_distance must be > 0 and finite, or none (no bound), got {self.embed_max_distance}",
        )
        _require(
            self.repair_quantile is None or 0 < self.repair_quantile <= 1,  # NaN fails both comparisons
            f"ilpo.repair_quantile must lie in (0, 1] or be none, got {self.repair_quantile}",
        )

    def check_sampler(self, steps: int) -> None:
        """The kept denoiser calls fit in a sampler of ``steps`` DDIM steps (generator.steps)."""
        _require(
            self.grad_steps <= steps, f"ilpo.grad_steps ({self.grad_steps}) cannot exceed generator.steps ({steps})"
        )
        _require(
            self.noise_grad_steps is None or self.noise_grad_steps <= steps,
            f"ilpo.noise_grad_steps ({self.noise_grad_steps}) cannot exceed generator.steps ({steps})",
        )


@dataclass(frozen=True)
class EvaluationConfig:
    classifier: str = "cnn-small"
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 400
    batch_size: int = 64
    lr: float = 0.05
    augment: bool = True  # random 1/16-side shifts and horizontal flips, the same for every setting
    ablation: bool = False  # also: plain, +MLCO, +prompt, +noise, all (synthetic-only)
    # Train the stage's classifiers together (utilgen.evaluate.training_plan: on CPU one per torch thread, on
    # CUDA as stacked models; the CNN family only, others one after another); false: one after another, the
    # reference. Each classifier draws the same random streams; the two differ by float rounding.
    batched: bool = True

    def __post_init__(self) -> None:
        _require(isinstance(self.batched, bool), f"evaluation.batched must be true or false, got {self.batched!r}")
        _require(len(self.seeds) >= 1, "evaluation.seeds needs at least one seed")
        for seed in self.seeds:
            _seed("evaluation.seeds", seed)
        _at_least(self, "evaluation", ("steps", "batch_size"), 1)
        _positive_finite(self, "evaluation", ("lr",))


@dataclass(frozen=True)
class BaselinesConfig:
    """The baselines a reviewer asks for, each trained and evaluated like UtilGen (``utilgen.baselines``).

    Off in a single run (they double its cost); ``python -m utilgen.experiment protocol`` turns them on.
    Rows: real only on the shots + meta set (UtilGen reads the meta labels, so the baseline gets them too);
    plain generation with the untrained tokens (each class's starting token); plain + filter (a larger plain
    pool cut back to |D_g| by a classifier trained on shots + meta); DataDream-style (a LoRA on the
    denoiser fitted with the diffusion loss on the shots, with the learned tokens, then plain generation).
    """

    enabled: bool = False
    filter_oversample: float = 2.0  # plain + filter draws this many times |D_g| and keeps the most consistent
    # DataDream-style LoRA (the adapter DPO uses: same rank, alpha and modules as mlco.*), fitted with the
    # denoising loss on the real shots under the learned tokens. Same optimiser budget as textual inversion.
    datadream_steps: int = 400
    datadream_lr: float = 1e-4
    datadream_batch_size: int = 32

    def __post_init__(self) -> None:
        _require(
            _finite(self.filter_oversample) and self.filter_oversample > 1,
            f"baselines.filter_oversample must be > 1 (a filter needs more images than it keeps), "
            f"got {self.filter_oversample}",
        )
        _at_least(self, "baselines", ("datadream_steps", "datadream_batch_size"), 1)
        _positive_finite(self, "baselines", ("datadream_lr",))


@dataclass(frozen=True)
class RunSettings:
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when present), "cpu", "cuda", "cuda:1", ...
    threads: int | None = None  # torch intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        _require(self.threads is None or self.threads >= 1, f"run.threads must be >= 1 or none, got {self.threads}")
        _seed("run.seed", self.seed)
        _require(self.device != "", "run.device is empty: use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class Config:
    preset: str = "default"
    run: RunSettings = field(default_factory=RunSettings)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    valuation: ValuationConfig = field(default_factory=ValuationConfig)
    mlco: MLCOConfig = field(default_factory=MLCOConfig)
    ilpo: ILPOConfig = field(default_factory=ILPOConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)

    def __post_init__(self) -> None:
        self.ilpo.check_sampler(self.generator.steps)

    def final_per_class(self) -> int:
        """Images per class of the plain and the UtilGen pool: ``synthetic.multiple`` x the real shots."""
        return max(1, round(self.synthetic.multiple * self.data.shots_per_class))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# The presets: overrides of the defaults above. "default" is the embedded experiment of the README.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {},
    # The whole loop at toy scale (tests, a first look): every stage runs, nothing is meaningful.
    "smoke": {
        "data": {"shots_per_class": 4, "meta_per_class": 3, "test_per_class": 20},
        "generator": {"steps": 4, "batch_size": 64},
        "tokens": {"steps": 5},
        "synthetic": {"first_pool_per_class": 4, "multiple": 1.0},
        "valuation": {"steps": 10, "batch_size": 32, "meta_batch_size": 16},
        "mlco": {
            "rounds": 1,
            "candidates_per_class": 4,
            "pairs_per_class": 1,
            "min_gap": 0.0,
            "steps": 4,
            "batch_pairs": 4,
        },
        "ilpo": {"prompt_steps": 1, "batch_size": 32},
        "evaluation": {"seeds": (0,), "steps": 10, "batch_size": 32},
    },
    # The negative control: the default method with a generator pretrained on the ten fine classes, so the
    # task holds nothing for a utility to repair (UtilGen must not hurt here).
    "in-domain": {"generator": {"embedded_weights": "fine"}},
    # Stable Diffusion 2.1 (local diffusers directory, --generator) on an ImageFolder (--data), on the GPU.
    "sd21": {
        "data": {"image_size": 224, "channels": 3},  # the source: --data PATH (required)
        "generator": {
            "kind": "stable-diffusion",
            "dtype": "float16",
            "steps": 25,
            "guidance_scale": 2.0,
            "batch_size": 16,
        },
        "tokens": {"steps": 500, "lr": 5e-3, "batch_size": 8},
        "synthetic": {"first_pool_per_class": 16},
        "valuation": {"classifier": "resnet18", "steps": 400, "batch_size": 64, "meta_batch_size": 64},
        "mlco": {
            "rounds": 2,
            "candidates_per_class": 8,
            "pairs_per_class": 2,
            "beta": 5000.0,
            "lr": 1e-5,
            "steps": 200,
            "batch_pairs": 4,
        },
        "ilpo": {"prompt_steps": 6, "prompt_lr": 1e-3, "batch_size": 8, "drift_weight": 1.0},
        "evaluation": {"classifier": "resnet18", "steps": 1500, "batch_size": 64, "lr": 0.05, "augment": True},
        "run": {"device": "auto"},
    },
}


# ------------------------------------------------------------------------------------------- building


def build_config(
    preset: str = "default",
    file_values: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    file_name: str = "the config file",
) -> Config:
    """The resolved config: defaults <- preset <- ``file_values`` (nested dict) <- ``overrides`` ("a.b=v")."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; the presets are {', '.join(sorted(PRESETS))}")
    values: dict[str, dict[str, Any]] = {}
    _merge(values, PRESETS[preset], origin=f"preset {preset}")
    if file_values:
        file_values = dict(file_values)
        file_preset = file_values.pop("preset", None)
        if file_preset is not None and file_preset != preset:
            raise ConfigError(f"{file_name} names preset {file_preset!r}, the command line {preset!r}; use one")
        _merge(values, file_values, origin=file_name)
    for override in overrides:
        section, key, raw = _split_override(override)
        try:
            value = parse_value(raw, _field_type(section, key))
        except ConfigError as error:
            raise ConfigError(f"--set {override}: {error}") from None
        _merge(values, {section: {key: value}}, origin=f"--set {override}")
    sections = {name: _build_section(name, section_values) for name, section_values in values.items()}
    return Config(preset=preset, **sections)


def config_from_dict(value: dict[str, Any]) -> Config:
    """A ``Config`` from its ``to_dict()`` form (``config.json`` of a run), every key checked."""
    value = dict(value)
    preset = value.pop("preset", "default")
    sections = {
        name: _build_section(name, _checked_section(name, section, "config.json")) for name, section in value.items()
    }
    return Config(preset=preset, **sections)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The nested dict of a YAML (.yaml/.yml) or TOML (.toml) config file; JSON (.json) too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read config file {path}: {error}") from error
    try:
        if suffix == ".toml":
            import tomllib

            value = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml  # PyYAML: a dependency of utilgen (through huggingface-hub and declared)

            value = yaml.safe_load(text)
        elif suffix == ".json":
            value = json.loads(text)
        else:
            raise ConfigError(f"config file {path}: unknown format {suffix!r}; use .yaml, .yml, .toml or .json")
    except ConfigError:
        raise
    except Exception as error:  # the parsers' own errors (line and column) are the useful part
        raise ConfigError(f"config file {path} does not parse: {error}") from error
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(value).__name__}")
    return value


def valid_keys() -> list[str]:
    """Every ``section.key`` a config accepts, in declaration order."""
    return [f"{section}.{key}" for section, cls in _sections().items() for key in _field_names(cls)]


# ------------------------------------------------------------------------------------------- checking


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config) if f.name != "preset"}


def _field_names(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _field_type(section: str, key: str) -> Any:
    sections = _sections()
    if section not in sections:
        raise ConfigError(f"unknown config section {section!r}; the sections are {', '.join(sections)}")
    hints = typing.get_type_hints(sections[section])
    if key not in hints:
        raise ConfigError(
            f"unknown config key {section}.{key}; the keys of [{section}] are "
            f"{', '.join(_field_names(sections[section]))}"
        )
    return hints[key]


def _merge(into: dict[str, dict[str, Any]], values: dict[str, Any], *, origin: str) -> None:
    for section, section_values in values.items():
        checked = _checked_section(section, section_values, origin)
        into.setdefault(section, {}).update(checked)


def _checked_section(section: str, section_values: Any, origin: str) -> dict[str, Any]:
    if section not in _sections():
        raise ConfigError(f"{origin}: unknown config section {section!r}; the sections are {', '.join(_sections())}")
    if not isinstance(section_values, dict):
        raise ConfigError(f"{origin}: section {section!r} must be a mapping of keys, got {section_values!r}")
    checked = {}
    for key, value in section_values.items():
        expected = _field_type(section, key)
        try:
            checked[key] = coerce(value, expected)
        except ConfigError as error:
            raise ConfigError(f"{origin}: {section}.{key}: {error}") from None
    return checked


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = _sections()[name]
    return cls(**values)


def _split_override(text: str) -> tuple[str, str, str]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. --set mlco.rounds=2")
    name, raw = text.split("=", 1)
    parts = name.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {text!r}: the key must be section.key; valid keys: {', '.join(valid_keys())}")
    return parts[0], parts[1], raw.strip()


def _describe(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(expected))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(expected)[0])}"
    if expected is type(None):
        return "none"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(expected, str(expected))


def coerce(value: Any, expected: Any) -> Any:
    """``value`` (from a file or ``parse_value``) as type ``expected``, or ConfigError saying what was expected."""
    origin = typing.get_origin(expected)
    if origin in (typing.Union, types.UnionType):
        arguments = typing.get_args(expected)
        if value is None and type(None) in arguments:
            return None
        for argument in arguments:
            if argument is type(None):
                continue
            try:
                return coerce(value, argument)
            except ConfigError:
                pass
        raise ConfigError(f"expected {_describe(expected)}, got {value!r}")
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(expected)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected {_describe(expected)}, got {value!r}")
        return tuple(coerce(item, item_type) for item in value)
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads 5e-5, without a dot, as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif expected is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"expected {_describe(expected)}, got {value!r}")


def parse_value(raw: str, expected: Any) -> Any:
    """A ``--set`` value string as type ``expected``: numbers, true/false, none/null, comma-separated lists."""
    origin = typing.get_origin(expected)
    optional = origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(expected)
    if optional and raw.lower() in ("none", "null", ""):
        return None
    if optional:
        (expected,) = [a for a in typing.get_args(expected) if a is not type(None)]
        origin = typing.get_origin(expected)
    if origin is tuple:
        item_type = typing.get_args(expected)[0]
        items = [item.strip() for item in raw.strip("[]() ").split(",") if item.strip()]
        return tuple(parse_value(item, item_type) for item in items)
    if expected is bool:
        lowered = raw.lower()
        if lowered in ("true", "yes", "on", "1"):
            return True
        if lowered in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"expected true or false, got {raw!r}")
    if expected is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"expected an integer, got {raw!r}") from None
    if expected is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"expected a number, got {raw!r}") from None
    return raw
