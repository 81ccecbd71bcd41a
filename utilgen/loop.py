"""The UtilGen loop (METHOD.md, "Loop"; DESIGN.md section 2), stage by stage, resumable.

    splits      real data -> few-shot train D_r / meta D_v / untouched test
    tokens      per-class tokens from the real shots (textual inversion)
    pool0       D_g0: the first pool, class tokens                         valued by TODV
    plain       the plain-generation baseline: class tokens, the final (label, seed) list
    valuation   TODV on D_r ∪ D_g0 against D_v -> (f_theta, W_phi)
    mlco-<r>    candidates -> utilities -> pairs -> one Diffusion-DPO round (r = 1..R)
    ilpo        the final pool: per-instance prompt and noise optimisation, same (label, seed) list as plain
    ablation    (optional) +MLCO, +prompt, +noise pools
    evaluate    fresh classifiers: real only, plain and UtilGen, synthetic-only and joint, over seeds
    report      metrics.json, report.md, plots

Each stage writes its outputs into the run directory, then the manifest marks it done
(``utilgen.rundir``). The next stage reads what was written (pools are 8-bit PNGs, so an
uninterrupted run and a resumed one compute on the same pixels), which is what makes a run
killed at any moment resume to the same results. Every image's seed derives from the run
seed and its place in its pool, and every stage seeds torch from the run seed and its name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import platform
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from utilgen import adaptation
from utilgen import config as config_module
from utilgen.adaptation import (
    DPOConfig,
    DPONonFiniteError,
    generate_candidates,
    load_adapters,
    optimise_instances,
    pairs_from_pool,
    train_dpo_round,
)
from utilgen.adaptation.mlco import prepare_round
from utilgen.config import Config
from utilgen.data import (
    LabelledImages,
    Splits,
    SyntheticPool,
    load_split_indices,
    make_splits,
    resize_images,
    save_splits,
    splits_from_indices,
)
from utilgen.evaluate import NonFiniteTrainingError, TrainingSet, evaluate, joint
from utilgen.generator import Generator
from utilgen.io import atomic_write_bytes, atomic_write_json
from utilgen.rundir import RunDirectory, stage_key
from utilgen.valuation import BiLevelConfig, NonFiniteLossError, Valuation, fit_valuation

log = logging.getLogger(__name__)

# Seeds of the generated images: run seed x 10^7 + an offset per pool + the image's index in it.
_SEED_OFFSETS = {"pool0": 1_000_000, "final": 2_000_000, "mlco": 3_000_000}


class StageError(RuntimeError):
    """A stage stopped (a non-finite loss); what finished before it is kept and the run can be resumed."""


# ------------------------------------------------------------------------------------ the loop


def run(cfg: Config, directory: RunDirectory, data: LabelledImages, *, progress: bool = True) -> dict:
    """Run (or resume) every stage of ``cfg`` in ``directory`` on ``data``; return the metrics."""
    device = resolve_device(cfg.run.device)
    stages = _Stages(directory, cfg.run.seed)
    method = stage_configs(cfg, device, progress)

    # The run seed keys the first stage, so through the chained keys it keys every stage.
    with stages.stage("splits", [cfg.data, cfg.run.seed], ["splits.json"]) as needed:
        if needed:
            save_splits(
                make_splits(
                    data,
                    shots_per_class=cfg.data.shots_per_class,
                    meta_per_class=cfg.data.meta_per_class,
                    test_per_class=cfg.data.test_per_class,
                    seed=cfg.data.split_seed,
                ),
                directory.path / "splits.json",
            )
    real = splits_from_indices(data, load_split_indices(directory.path / "splits.json"))

    generator = build_generator(cfg, real.class_names, device)
    with stages.stage("tokens", [cfg.generator, cfg.tokens], ["tokens.safetensors"]) as needed:
        if needed:
            tokens = learn_tokens(generator, real.train, cfg, progress)
            if not bool(torch.isfinite(tokens).all()):
                raise StageError(
                    f"textual inversion diverged: the class tokens hold NaN/inf after {cfg.tokens.steps} "
                    "steps. Lower tokens.lr and resume: --resume DIR --set tokens.lr=..."
                )
            atomic_write_bytes(directory.path / "tokens.safetensors", _tensor_bytes({"class_tokens": tokens}))
    generator.set_class_tokens(load_file(directory.path / "tokens.safetensors")["class_tokens"].to(generator.device))

    k = len(real.class_names)
    final_labels, final_seeds = instance_list(k, final_per_class(cfg), cfg.run.seed, "final")
    with stages.stage("pool0", [cfg.synthetic.first_pool_per_class], ["pools/pool0"]) as needed:
        if needed:
            labels, seeds = instance_list(k, cfg.synthetic.first_pool_per_class, cfg.run.seed, "pool0")
            pool = generate_plain(generator, labels, seeds, cfg, real, stage="initial", progress=progress)
            pool.save(directory.path / "pools/pool0")
    with stages.stage("plain", [cfg.synthetic.multiple], ["pools/plain"]) as needed:
        if needed:
            pool = generate_plain(generator, final_labels, final_seeds, cfg, real, stage="plain", progress=progress)
            pool.save(directory.path / "pools/plain")
    pool0, plain = load_pool(directory, "pool0"), load_pool(directory, "plain")

    with stages.stage("valuation", [cfg.valuation], ["valuation"]) as needed:
        if needed:
            valuation = fit_or_stop(real, pool0, method.valuation, directory.path / "valuation")
            save_valuation(valuation, pool0, directory.path / "valuation")
    valuation_dir = directory.path / "valuation"  # the valuation ILPO climbs: TODV's, or the last refreshed one
    valuation = Valuation.load(valuation_dir, device=device)

    for round_index in range(1, cfg.mlco.rounds + 1):
        name = f"mlco-{round_index}"
        round_settings = _without(dataclasses.asdict(cfg.mlco), "rounds")  # round r does not depend on the count
        with stages.stage(name, [round_settings], [f"mlco/round-{round_index}", f"pools/{name}"]) as needed:
            if needed:
                mlco_round(generator, valuation, real, cfg, method, round_index, directory)
            else:
                replay_round(generator, method.dpo, round_index, directory)
        if cfg.mlco.refresh_valuation and (directory.path / f"mlco/round-{round_index}/valuation").exists():
            valuation_dir = directory.path / f"mlco/round-{round_index}/valuation"
            valuation = Valuation.load(valuation_dir, device=device)

    with stages.stage("ilpo", [cfg.ilpo], ["pools/utilgen", "ilpo.json"]) as needed:
        if needed:
            ilpo = ilpo_config(cfg, method, valuation_dir)
            pool, history = optimise_instances(generator, valuation, final_labels, final_seeds, ilpo)
            to_task_size(pool, real).save(directory.path / "pools/utilgen")
            atomic_write_json(directory.path / "ilpo.json", ilpo_summary(history, pool))
    utilgen_pool = load_pool(directory, "utilgen")

    ablation_pools: dict[str, SyntheticPool] = {}
    if cfg.evaluation.ablation:
        names = ["ablation-mlco", "ablation-prompt", "ablation-noise"]
        with stages.stage("ablation", [cfg.evaluation.ablation], [f"pools/{n}" for n in names]) as needed:
            if needed:
                ablation(generator, valuation, valuation_dir, real, cfg, method, final_labels, final_seeds, directory)
        ablation_pools = {n: load_pool(directory, n) for n in names}

    settings = evaluation_settings(real, plain, utilgen_pool, ablation_pools)
    with stages.stage("evaluate", [cfg.evaluation], ["evaluation.json"]) as needed:
        if needed:
            checkpoint = directory.path / "evaluation.partial.json"
            results = evaluate_or_stop(settings, real.test, cfg, device, checkpoint, stages.key, progress)
            atomic_write_json(directory.path / "evaluation.json", results)
            checkpoint.unlink(missing_ok=True)
    order = [setting.name for setting in settings]  # the JSON files sort their keys; the tables read in this order
    results = _ordered(json.loads((directory.path / "evaluation.json").read_text()), order)

    # For the histograms: D_g0 as TODV valued it, and the plain pool under the valuation ILPO climbed.
    pool0_utilities = json.loads((directory.path / "valuation/history.json").read_text())["pool_utilities"]
    pools = {
        "pool0": pool0.with_utilities(torch.tensor(pool0_utilities)),
        "plain": plain.with_utilities(valuation.score(plain.images, plain.labels)),
        "utilgen": utilgen_pool,
        **ablation_pools,
    }
    pools.update({f"mlco-round-{r}": load_pool(directory, f"mlco-{r}") for r in range(1, cfg.mlco.rounds + 1)})
    metrics = collect_metrics(cfg, directory, real, results, device)
    with stages.stage("report", [], ["metrics.json", "report.md", "plots"]) as needed:
        if needed:
            from utilgen.report import write_report  # matplotlib: only when a report is written

            atomic_write_json(directory.path / "metrics.json", metrics)
            write_report(directory.path, metrics, pools)
    saved = json.loads((directory.path / "metrics.json").read_text())
    return {**saved, "accuracy": _ordered(saved["accuracy"], order)}


def _ordered(results: dict, order: list[str]) -> dict:
    return {name: results[name] for name in order if name in results}


# ------------------------------------------------------------------------------------ stages


class _Stages:
    """Skip-or-run bookkeeping: the chained stage keys, timing, the manifest, per-stage torch seeds."""

    def __init__(self, directory: RunDirectory, seed: int):
        self.directory, self.seed, self.key = directory, seed, "start"
        self.rerun = False  # once a stage runs, every later one does: its inputs may have changed

    @contextlib.contextmanager
    def stage(self, name: str, settings: list, outputs: list[str]) -> Iterator[bool]:
        self.key = stage_key(self.key, [_plain(s) for s in settings])
        if not self.rerun and self.directory.is_done(name, self.key):
            log.info("stage %s: done earlier, reusing its outputs", name)
            yield False
            return
        self.rerun = True
        self.directory.clear(outputs)
        torch.manual_seed(_stage_seed(self.seed, name))
        log.info("stage %s: running", name)
        start = time.perf_counter()
        try:
            yield True
        except StageError as error:
            self.directory.mark_failed(name, self.key, str(error), time.perf_counter() - start)
            raise
        seconds = time.perf_counter() - start
        self.directory.mark_done(name, self.key, outputs, seconds)
        log.info("stage %s: done in %.1f s", name, seconds)


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def _stage_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


@dataclass(frozen=True)
class StageConfigs:
    """The config sections as the stages' own config objects (built up front: bad values fail before any work)."""

    valuation: BiLevelConfig
    dpo: DPOConfig
    ilpo: adaptation.ILPOConfig


def stage_configs(cfg: Config, device: torch.device, progress: bool) -> StageConfigs:
    """Raises ``config.ConfigError`` naming the section when a value is out of range."""
    gen = cfg.generator
    built = {}
    for section, build in (
        (
            "valuation",
            lambda: BiLevelConfig(
                **dataclasses.asdict(cfg.valuation), seed=cfg.run.seed, device=str(device), progress=progress
            ),
        ),
        (
            "mlco",
            lambda: DPOConfig(
                beta=cfg.mlco.beta,
                lr=cfg.mlco.lr,
                steps=cfg.mlco.steps,
                batch_pairs=cfg.mlco.batch_pairs,
                lora_rank=cfg.mlco.lora_rank,
                lora_alpha=cfg.mlco.lora_alpha,
                rounds=max(cfg.mlco.rounds, 1),
                seed=cfg.run.seed,
                progress=progress,
            ),
        ),
        (
            "ilpo",
            lambda: adaptation.ILPOConfig(
                **_without(dataclasses.asdict(cfg.ilpo), "repair_quantile"),
                steps=gen.steps,
                guidance_scale=gen.guidance_scale,
                progress=progress,
            ),
        ),
    ):
        try:
            built[section] = build()
        except (ValueError, TypeError) as error:
            raise config_module.ConfigError(f"[{section}]: {error}") from None
    from utilgen.models.classifier import CLASSIFIERS

    for key, name in (
        ("valuation.classifier", cfg.valuation.classifier),
        ("evaluation.classifier", cfg.evaluation.classifier),
    ):
        if name not in CLASSIFIERS:
            raise config_module.ConfigError(
                f"{key}={name!r} is not a classifier; choose one of {', '.join(CLASSIFIERS)}"
            )
    return StageConfigs(valuation=built["valuation"], dpo=built["mlco"], ilpo=built["ilpo"])


def check_generator_fits_data(cfg: Config, data: LabelledImages) -> None:
    """The generator can make the task's images: the embedded one knows 10 gray classes, Stable Diffusion paints RGB."""
    channels = data.images.shape[1]
    if cfg.generator.kind == "embedded":
        from utilgen.generator.embedded import EmbeddedConfig

        embedded = EmbeddedConfig()
        if len(data.class_names) != embedded.num_classes or channels != embedded.channels:
            raise config_module.ConfigError(
                f"the embedded generator makes {embedded.channels}-channel images of Fashion-MNIST's "
                f"{embedded.num_classes} classes; the data has {len(data.class_names)} classes with {channels} "
                "channel(s). Use --generator PATH (a Stable Diffusion directory) for other datasets"
            )
    elif channels != 3:
        raise config_module.ConfigError(
            f"Stable Diffusion makes RGB images; the data is read with {channels} "
            "channel(s): set data.channels=3 (or use --preset sd21)"
        )


# ------------------------------------------------------------------------------------ data and generator


def _without(values: dict, *keys: str) -> dict:
    return {k: v for k, v in values.items() if k not in keys}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise config_module.ConfigError(f"run.device={requested!r} but torch sees no CUDA device here; use cpu or auto")
    return device


def load_task_data(cfg: Config) -> LabelledImages:
    """The real dataset the splits are cut from (embedded Fashion-MNIST or an ImageFolder), checked."""
    from utilgen.data import load_embedded, load_image_folder

    if cfg.data.source == "embedded":
        if cfg.data.channels != 1:
            raise config_module.ConfigError(
                "the embedded Fashion-MNIST data is grayscale: data.channels must be 1 "
                "(give --data PATH for an RGB ImageFolder)"
            )
        return load_embedded(cfg.data.image_size)
    data, report = load_image_folder(cfg.data.source, image_size=cfg.data.image_size, channels=cfg.data.channels)
    log.info("ImageFolder %s: %s", cfg.data.source, report.counts)
    return data


def build_generator(cfg: Config, class_names: tuple[str, ...], device: torch.device) -> Generator:
    if cfg.generator.kind == "embedded":
        from utilgen.generator import load_pretrained

        return load_pretrained(device)
    from utilgen.generator.stable_diffusion import StableDiffusionGenerator

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[cfg.generator.dtype]
    return StableDiffusionGenerator.from_directory(
        cfg.generator.path, class_names, device=device, dtype=dtype, attention=cfg.generator.attention
    )


def learn_tokens(generator: Generator, train: LabelledImages, cfg: Config, progress: bool) -> torch.Tensor:
    from utilgen.generator import learn_class_tokens

    size = generator.image_size
    return learn_class_tokens(
        generator,
        resize_images(train.images, size),
        train.labels,
        steps=cfg.tokens.steps,
        lr=cfg.tokens.lr,
        batch_size=cfg.tokens.batch_size,
        seed=cfg.run.seed,
        progress=progress,
    ).cpu()


def final_per_class(cfg: Config) -> int:
    return max(1, round(cfg.synthetic.multiple * cfg.data.shots_per_class))


def instance_list(num_classes: int, per_class: int, run_seed: int, pool: str, *, offset: int = 0):
    """(labels (N,), seeds (N,)): class-major, one seed per image, disjoint across pools and runs."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    base = run_seed * 10_000_000 + _SEED_OFFSETS[pool] + offset
    return labels, torch.arange(base, base + labels.shape[0], dtype=torch.int64)


def generate_plain(
    generator: Generator,
    labels: torch.Tensor,
    seeds: torch.Tensor,
    cfg: Config,
    real: Splits,
    *,
    stage: str,
    progress: bool = False,
) -> SyntheticPool:
    """Class-token generation, no UtilGen: the first pool and the plain baseline."""
    images = generator.sample(
        generator.class_prompt_embeds(labels),
        generator.initial_noise(seeds.tolist()),
        guidance_scale=cfg.generator.guidance_scale,
        steps=cfg.generator.steps,
        batch_size=cfg.generator.batch_size,
        progress=progress,
    )
    pool = SyntheticPool.create(images, labels, real.class_names, seeds, round=0, stage=stage)
    return to_task_size(pool, real)


def to_task_size(pool: SyntheticPool, real: Splits) -> SyntheticPool:
    pool.images = resize_images(pool.images, real.train.images.shape[-1])
    return pool


def load_pool(directory: RunDirectory, name: str) -> SyntheticPool:
    return SyntheticPool.load(directory.path / "pools" / name)


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()})


# ------------------------------------------------------------------------------------ TODV


def fit_or_stop(real: Splits, synthetic: SyntheticPool, config: BiLevelConfig, out: Path) -> Valuation:
    try:
        return fit_valuation(real.train, synthetic, real.meta, config)
    except NonFiniteLossError as error:
        partial = out.with_name(out.name + ".partial")
        error.valuation.save(partial)
        raise StageError(
            f"{error}. The weights before that step are in {partial}. Lower valuation.inner_lr "
            "or valuation.meta_lr and resume: --resume DIR --set valuation.inner_lr=..."
        ) from error


def save_valuation(valuation: Valuation, pool: SyntheticPool, out: Path) -> None:
    """The valuation, its learned w(loss) curve and training history, and the utilities of the pool it valued."""
    valuation.save(out)
    history = valuation.history
    curve = {}
    if valuation.features == ("loss",):
        losses, weights = valuation.curve()
        curve = {"loss": losses.tolist(), "weight": weights.tolist()}
    atomic_write_json(
        out / "history.json",
        {
            "curve": curve,
            "meta_loss": history.meta_loss if history else [],
            "mean_weight_real": history.mean_weight_real if history else [],
            "mean_weight_synthetic": history.mean_weight_synthetic if history else [],
            "pool_utilities": valuation.score(pool.images, pool.labels).tolist(),
        },
    )


# ------------------------------------------------------------------------------------ MLCO


def mlco_round(
    generator: Generator,
    valuation: Valuation,
    real: Splits,
    cfg: Config,
    method: StageConfigs,
    round_index: int,
    directory: RunDirectory,
) -> None:
    """Candidates per class -> utility pairs -> one Diffusion-DPO round; adapters, pool and history saved."""
    k = len(real.class_names)
    out = directory.path / f"mlco/round-{round_index}"
    _, seeds = instance_list(k, cfg.mlco.candidates_per_class, cfg.run.seed, "mlco", offset=round_index * 100_000)
    candidates = generate_candidates(
        generator,
        valuation,
        range(k),
        cfg.mlco.candidates_per_class,
        seeds.tolist(),
        class_names=real.class_names,
        round=round_index,
        guidance_scale=cfg.generator.guidance_scale,
        steps=cfg.generator.steps,
        batch_size=cfg.generator.batch_size,
        progress=method.dpo.progress,
    )
    pairs = pairs_from_pool(candidates, pairs_per_class=cfg.mlco.pairs_per_class, min_gap=cfg.mlco.min_gap)
    summary = {"round": round_index, "pairs": len(pairs), "mean_candidate_utility": float(candidates.utilities.mean())}
    if len(pairs) == 0:
        log.warning(
            "MLCO round %d: no pairs (every class a near-tie under min_gap %.3g); the generator is unchanged",
            round_index,
            cfg.mlco.min_gap,
        )
        summary["skipped"] = "no pairs"
    else:
        before = adaptation.evaluate_pairs(generator, pairs, beta=method.dpo.beta)
        try:
            result = train_dpo_round(generator, pairs, method.dpo, round_index=round_index - 1)
        except DPONonFiniteError as error:
            adaptation.save_adapters(generator.denoiser, out.with_name(out.name + ".partial.safetensors"))
            raise StageError(
                f"{error}. Resume with a smaller step: --resume DIR --set mlco.lr=... (or mlco.beta=...)"
            ) from error
        after = adaptation.evaluate_pairs(generator, pairs, beta=method.dpo.beta)
        adaptation.save_adapters(generator.denoiser, out / "adapters.safetensors")
        summary.update(
            implicit_accuracy_before=before.implicit_acc,
            implicit_accuracy_after=after.implicit_acc,
            steps=result.steps_done,
            history=dataclasses.asdict(result.history),
        )
    candidates = to_task_size(candidates, real)
    if cfg.mlco.refresh_valuation:
        refreshed = fit_or_stop(real, candidates, method.valuation, out / "valuation")
        save_valuation(refreshed, candidates, out / "valuation")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "round.json", summary)
    candidates.save(directory.path / f"pools/mlco-{round_index}")


def replay_round(generator: Generator, config: DPOConfig, round_index: int, directory: RunDirectory) -> None:
    """Put a finished round's adapter back: the state ``train_dpo_round`` left (attach or re-anchor, then weights)."""
    path = directory.path / f"mlco/round-{round_index}/adapters.safetensors"
    if not path.exists():  # a round without pairs changed nothing
        return
    prepare_round(generator, config, round_index - 1)
    load_adapters(generator.denoiser, path)


# ------------------------------------------------------------------------------------ ILPO, ablation


def ilpo_config(cfg: Config, method: StageConfigs, valuation_dir: Path) -> adaptation.ILPOConfig:
    """The ILPO config with the repair threshold resolved: a quantile of the utilities of the pool that
    the valuation in ``valuation_dir`` was fitted on (D_g0, or a refresh round's candidates)."""
    if cfg.ilpo.repair_quantile is None:
        return method.ilpo
    utilities = json.loads((valuation_dir / "history.json").read_text())["pool_utilities"]
    threshold = float(torch.quantile(torch.tensor(utilities), cfg.ilpo.repair_quantile))
    return dataclasses.replace(method.ilpo, ascend_below=threshold)


def ilpo_summary(history, pool: SyntheticPool) -> dict:
    """Mean utility with the class prompt, at the optimised prompt (differentiable proxy), of the final images."""
    before = torch.cat([h.utility_before for h in history.prompt]) if history.prompt else torch.empty(0)
    after = torch.cat([h.utility_after for h in history.prompt]) if history.prompt else torch.empty(0)
    # No wall times here (the manifest has the stage's): this file is a result, equal across resumed runs.
    return {
        "utility_before": _mean(before),
        "utility_after_prompt": _mean(after),
        "utility_after": _mean(pool.utilities),
    }


def _mean(values: torch.Tensor) -> float | None:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else None


def ablation(
    generator: Generator,
    valuation: Valuation,
    valuation_dir: Path,
    real: Splits,
    cfg: Config,
    method: StageConfigs,
    labels: torch.Tensor,
    seeds: torch.Tensor,
    directory: RunDirectory,
) -> None:
    """+MLCO (class prompts, tuned generator), +prompt and +noise (ILPO parts, generator without MLCO)."""
    pool = generate_plain(generator, labels, seeds, cfg, real, stage="ablation", progress=method.ilpo.progress)
    pool.save(directory.path / "pools/ablation-mlco")
    base = build_generator(cfg, real.class_names, generator.device)
    base.set_class_tokens(generator.class_tokens.clone())
    ilpo_all = ilpo_config(cfg, method, valuation_dir)  # the final pool's ILPO, one part at a time
    for name, ilpo in (
        ("ablation-prompt", dataclasses.replace(ilpo_all, noise_strategy="none")),
        ("ablation-noise", dataclasses.replace(ilpo_all, prompt_steps=0)),
    ):
        pool, _ = optimise_instances(base, valuation, labels, seeds, ilpo)
        to_task_size(pool, real).save(directory.path / f"pools/{name}")


# ------------------------------------------------------------------------------------ evaluation, metrics


def evaluation_settings(
    real: Splits, plain: SyntheticPool, utilgen_pool: SyntheticPool, ablation_pools: dict[str, SyntheticPool]
) -> list[TrainingSet]:
    settings = [TrainingSet("real-only", real.train, "real", None)]
    for name, pool in (("plain", plain), ("utilgen", utilgen_pool)):
        synthetic = pool.to_labelled()
        settings.append(TrainingSet(f"{name} synthetic-only", synthetic, "synthetic", name))
        settings.append(TrainingSet(f"{name} joint", joint(real.train, synthetic), "joint", name))
    for name, pool in ablation_pools.items():
        settings.append(
            TrainingSet(f"{name.replace('ablation-', '+')} synthetic-only", pool.to_labelled(), "synthetic", name)
        )
    return settings


def evaluate_or_stop(settings, test, cfg: Config, device, checkpoint: Path, key: str, progress: bool) -> dict:
    try:
        return evaluate(
            settings, test, cfg.evaluation, device=device, checkpoint=checkpoint, checkpoint_key=key, progress=progress
        )
    except NonFiniteTrainingError as error:
        raise StageError(f"{error}; the classifiers finished so far are kept in {checkpoint}") from error


BAR_POINTS = 3.0  # the bar: UtilGen synthetic-only >= plain + 3 points, joint > real-only


def collect_metrics(cfg: Config, directory: RunDirectory, real: Splits, results: dict, device: torch.device) -> dict:
    path = directory.path
    gain = 100 * (results["utilgen synthetic-only"]["mean"] - results["plain synthetic-only"]["mean"])
    joint_gain = 100 * (results["utilgen joint"]["mean"] - results["real-only"]["mean"])
    valuation = json.loads((path / "valuation/history.json").read_text())
    rounds = [json.loads((path / f"mlco/round-{r}/round.json").read_text()) for r in range(1, cfg.mlco.rounds + 1)]
    return {
        "experiment": {
            "preset": cfg.preset,
            "data": cfg.data.source,
            "generator": cfg.generator.kind,
            "classes": len(real.class_names),
            "shots_per_class": cfg.data.shots_per_class,
            "meta_per_class": cfg.data.meta_per_class,
            "test_images": len(real.test.labels),
            "synthetic_per_class": final_per_class(cfg),
            "mlco_rounds": cfg.mlco.rounds,
            "classifier": cfg.evaluation.classifier,
            "seeds": list(cfg.evaluation.seeds),
            "sampler_steps": cfg.generator.steps,
            "guidance_scale": cfg.generator.guidance_scale,
        },
        "accuracy": results,
        "bar": {
            "synthetic_only_gain_points": gain,
            "required_points": BAR_POINTS,
            "joint_gain_over_real_only_points": joint_gain,
            "joint_above_real_only": joint_gain > 0,
            "met": gain >= BAR_POINTS and joint_gain > 0,
        },
        "valuation": {k: valuation[k] for k in ("curve", "meta_loss", "mean_weight_real", "mean_weight_synthetic")},
        "mlco": rounds,
        "ilpo": json.loads((path / "ilpo.json").read_text()),
        "timings": directory.seconds(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }


# ------------------------------------------------------------------------------------ planning


def planned_bytes(cfg: Config, num_classes: int, channels: int, image_size: int) -> int:
    """A generous estimate of what the run writes: PNGs (worst case uncompressed) plus per-image tensors."""
    per_image = channels * image_size * image_size + 512
    final = final_per_class(cfg) * num_classes
    images = (
        cfg.synthetic.first_pool_per_class * num_classes
        + final * (2 + 2 * cfg.evaluation.ablation)
        + cfg.mlco.rounds * cfg.mlco.candidates_per_class * num_classes
    )
    latent = 4 * 64 * 64 * 4 if cfg.generator.kind != "embedded" else 4 * image_size * image_size
    prompt = 77 * 1024 * 4 if cfg.generator.kind != "embedded" else 4 * 64 * 4
    tensors = final * (1 + 2 * cfg.evaluation.ablation) * (latent + prompt)
    return int(1.5 * (images * per_image + tensors)) + 64 * 2**20


def describe_plan(cfg: Config) -> str:
    per_class = final_per_class(cfg)
    return (
        f"{cfg.data.shots_per_class} real shots/class, meta {cfg.data.meta_per_class}/class, "
        f"{per_class} synthetic/class ({cfg.synthetic.multiple:g}x), MLCO rounds {cfg.mlco.rounds}, "
        f"evaluation seeds {list(cfg.evaluation.seeds)}"
    )
