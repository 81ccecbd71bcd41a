"""The UtilGen loop, stage by stage, resumable (docs/method.md, "Loop").

    splits      real data -> few-shot train D_r / meta D_v / untouched test
    tokens      per-class tokens from the real shots (textual inversion)
    pool0       D_g0: the first pool, class tokens                         valued by TODV
    plain       the plain-generation baseline: class tokens, the final (label, seed) list
    valuation   TODV on D_r ∪ D_g0 against D_v -> (f_theta, W_phi)
    mlco-<r>    candidates -> utilities -> pairs -> one Diffusion-DPO round (r = 1..R)
    ilpo        the final pool: per-instance prompt and noise optimisation, same (label, seed) list as plain
    baselines   (optional) untrained tokens, plain + filter, DataDream-style pools
    ablation    (optional) +MLCO, +prompt, +noise, +MLCO+prompt, plain high-guidance pools
    evaluate    fresh classifiers: real only, plain and UtilGen, synthetic-only and joint, over seeds
    report      metrics.json, report.md, plots

Each stage writes its outputs into the run directory (``utilgen.stage_outputs``), then the
manifest marks it done (``utilgen.stages``); the next stage reads what was written, so a run
killed at any moment resumes to the same results. Every image's seed derives from the run seed
and its place in its pool; every stage seeds torch from the run seed and its name.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch

from utilgen import adaptation
from utilgen import stage_outputs as outputs
from utilgen.config import Config, ILPOConfig
from utilgen.data import (
    Splits,
    SyntheticPool,
    load_split_indices,
    make_splits,
    resize_images,
    save_splits,
    splits_from_indices,
)
from utilgen.evaluate import TrainingSet, joint
from utilgen.generator import Generator, build_generator
from utilgen.io import atomic_write_json
from utilgen.judge import judge_pools
from utilgen.metrics import collect_metrics
from utilgen.preflight import planned_bytes
from utilgen.rundir import RunDirectory
from utilgen.stages import StageError, Stages
from utilgen.valuation import Valuation, mislabel_auroc

log = logging.getLogger(__name__)

__all__ = ["StageError", "run"]

# Seeds of the generated images: run seed x 10^7 + an offset per pool + the image's index in it.
_SEED_OFFSETS = {"pool0": 1_000_000, "final": 2_000_000, "mlco": 3_000_000, "filter": 4_000_000}
# Each stage alone (+MLCO, +prompt, +noise), cumulatively (+MLCO then its prompt ascent; all three is
# UtilGen), and plain at the re-denoise's high guidance, the control +noise is read against.
ABLATION_POOLS = (
    "ablation-mlco",
    "ablation-prompt",
    "ablation-noise",
    "ablation-mlco-prompt",
    "ablation-high-guidance",
)
BASELINE_POOLS = ("baseline-untrained-tokens", "baseline-filter", "baseline-datadream")


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares: its config, directory, device, real splits and progress bars."""

    cfg: Config
    directory: RunDirectory
    device: torch.device
    real: Splits
    progress: bool


def run(cfg: Config, directory: RunDirectory, data, *, device: torch.device, progress: bool = True) -> dict:
    """Run (or resume) every stage of ``cfg`` in ``directory`` on ``data`` (checked by preflight); the metrics."""
    stages = Stages(directory, cfg.run.seed, planned_bytes=planned_bytes(cfg, data))
    path = directory.path

    # The run seed keys the first stage, so through the chained keys it keys every stage.
    with stages.stage("splits", [cfg.data, cfg.run.seed], ["splits.json"]) as needed:
        if needed:
            counts = {"shots_per_class": cfg.data.shots_per_class, "meta_per_class": cfg.data.meta_per_class}
            splits = make_splits(data, **counts, test_per_class=cfg.data.test_per_class, seed=cfg.data.split_seed)
            save_splits(splits, path / "splits.json")
    real = splits_from_indices(data, load_split_indices(path / "splits.json"))
    ctx = RunContext(cfg, directory, device, real, progress)

    generator = build_generator(cfg.generator, real.class_names, device)
    with stages.stage("tokens", [cfg.generator, cfg.tokens], ["tokens.safetensors"]) as needed:
        if needed:
            outputs.save_tokens(directory, learn_tokens(generator, ctx), cfg.tokens.steps)
    generator.set_class_tokens(outputs.load_tokens(directory, generator.device))

    # D_g0, valued by TODV, and the plain baseline: the same (label, seed) list as the final UtilGen pool.
    k = len(real.class_names)
    final_labels, final_seeds = instance_list(k, cfg.final_per_class(), cfg.run.seed, "final")
    with stages.stage("pool0", [cfg.synthetic.first_pool_per_class], ["pools/pool0"]) as needed:
        if needed:
            labels, seeds = instance_list(k, cfg.synthetic.first_pool_per_class, cfg.run.seed, "pool0")
            outputs.save_pool(directory, "pool0", generate_plain(generator, labels, seeds, ctx, stage="initial"))
    with stages.stage("plain", [cfg.synthetic.multiple], ["pools/plain"]) as needed:
        if needed:
            outputs.save_pool(
                directory, "plain", generate_plain(generator, final_labels, final_seeds, ctx, stage="plain")
            )
    pool0, plain = outputs.load_pool(directory, "pool0"), outputs.load_pool(directory, "plain")

    # TODV: the classifier and W_phi, bi-level on D_r ∪ D_g0 against the meta set.
    with stages.stage("valuation", [cfg.valuation], ["valuation"]) as needed:
        if needed:
            valuation = outputs.fit_or_stop(real, pool0, cfg.valuation, path / "valuation", **_run_args(ctx))
            outputs.save_valuation(valuation, pool0, path / "valuation")
    valuation_dir = path / "valuation"  # the valuation ILPO climbs: TODV's, or the last refreshed one
    valuation = Valuation.load(valuation_dir, device=device)

    # MLCO: rounds of candidates -> utility pairs -> Diffusion-DPO on the denoiser's adapter.
    for round_index in range(1, cfg.mlco.rounds + 1):
        name = f"mlco-{round_index}"
        # Round r does not depend on the round count, nor on how often it logs.
        round_settings = {k: v for k, v in dataclasses.asdict(cfg.mlco).items() if k not in ("rounds", "log_every")}
        with stages.stage(name, [round_settings], [f"mlco/round-{round_index}", f"pools/{name}"]) as needed:
            if needed:
                mlco_round(generator, valuation, round_index, ctx)
            else:
                outputs.replay_round(generator, cfg.mlco, round_index, directory, seed=cfg.run.seed)
        if cfg.mlco.refresh_valuation and (path / f"mlco/round-{round_index}/valuation").exists():
            valuation_dir = path / f"mlco/round-{round_index}/valuation"
            valuation = Valuation.load(valuation_dir, device=device)

    # ILPO: the final pool, each instance's prompt embedding and initial noise optimised.
    ascend_below = repair_threshold(cfg.ilpo, valuation_dir)
    with stages.stage("ilpo", [cfg.ilpo], ["pools/utilgen", "ilpo.json"]) as needed:
        if needed:
            pool, history = optimise(generator, valuation, final_labels, final_seeds, cfg.ilpo, ascend_below, ctx)
            outputs.save_pool(directory, "utilgen", pool)
            atomic_write_json(path / "ilpo.json", outputs.ilpo_summary(history, pool))
    utilgen_pool = outputs.load_pool(directory, "utilgen")

    # The baselines before the ablation: the stage keys are chained and a stage that runs makes every later
    # one run, so a run extended with the ablation (python -m utilgen.experiment protocol, README) keeps its
    # baselines; extending one with the baselines redoes the ablation.
    baseline_pools: dict[str, SyntheticPool] = {}
    if cfg.baselines.enabled:
        # The DataDream-style adapter borrows MLCO's LoRA shape: its key holds the mlco section too.
        with stages.stage(
            "baselines", [cfg.baselines, cfg.mlco], [*(f"pools/{n}" for n in BASELINE_POOLS), "baselines.json"]
        ) as needed:
            if needed:
                atomic_write_json(
                    path / "baselines.json", baselines(generator.class_tokens, plain, final_labels, final_seeds, ctx)
                )
        baseline_pools = {n: outputs.load_pool(directory, n) for n in BASELINE_POOLS}

    ablation_pools: dict[str, SyntheticPool] = {}
    if cfg.evaluation.ablation:
        written = [f"pools/{n}" for n in ABLATION_POOLS]
        with stages.stage("ablation", [cfg.evaluation.ablation], written) as needed:
            if needed:
                ablation(generator, valuation, final_labels, final_seeds, ascend_below, ctx)
        ablation_pools = {n: outputs.load_pool(directory, n) for n in ABLATION_POOLS}

    # Evaluation: fresh classifiers on real only, plain and UtilGen (synthetic-only and joint), over seeds.
    settings = evaluation_settings(real, plain, utilgen_pool, ablation_pools, baseline_pools)
    with stages.stage("evaluate", [cfg.evaluation], ["evaluation.json"]) as needed:
        if needed:
            outputs.evaluate_or_stop(settings, real, cfg, device, directory, stages.key, progress)
    order = [setting.name for setting in settings]  # the JSON files sort their keys; the tables read in this order
    results = _ordered(json.loads((path / "evaluation.json").read_text()), order)

    # The report. Histograms: D_g0 as TODV valued it, and the plain pool under the valuation ILPO climbed.
    pools = {
        "pool0": pool0.with_utilities(outputs.valued_pool_utilities(path / "valuation")),
        "plain": plain.with_utilities(valuation.score(plain.images, plain.labels)),
        "utilgen": utilgen_pool,
        **ablation_pools,
        **baseline_pools,
    }
    pools.update({f"mlco-round-{r}": outputs.load_pool(directory, f"mlco-{r}") for r in range(1, cfg.mlco.rounds + 1)})
    judged = judge_pools(pools, real.class_names)  # what each pool shows, by a classifier the method never reads
    metrics = collect_metrics(cfg, directory, real, results, device, judged)
    with stages.stage("report", [], ["metrics.json", "report.md", "plots"]) as needed:
        if needed:
            from utilgen.report import write_report  # matplotlib: only when a report is written

            atomic_write_json(path / "metrics.json", metrics)
            write_report(path, metrics, pools)
    saved = json.loads((path / "metrics.json").read_text())
    return {**saved, "accuracy": _ordered(saved["accuracy"], order)}


def _ordered(results: dict, order: list[str]) -> dict:
    return {name: results[name] for name in order if name in results}


def _run_args(ctx: RunContext) -> dict:  # the stage functions' seed, device and progress bars
    return {"seed": ctx.cfg.run.seed, "device": ctx.device, "progress": ctx.progress}


# ------------------------------------------------------------------------------------ generator and pools


def learn_tokens(generator: Generator, ctx: RunContext) -> torch.Tensor:
    """Textual inversion: each class's tokens learned from its real shots (the tokens section as is)."""
    from utilgen.generator.textual_inversion import TokensDivergedError, learn_class_tokens

    train, settings = ctx.real.train, dataclasses.asdict(ctx.cfg.tokens)
    images = resize_images(train.images, generator.image_size)
    try:
        tokens = learn_class_tokens(
            generator, images, train.labels, **settings, seed=ctx.cfg.run.seed, progress=ctx.progress
        )
    except TokensDivergedError as error:
        raise StageError(f"{error}. Lower tokens.lr and resume: --resume DIR --set tokens.lr=...") from error
    return tokens.cpu()


def instance_list(num_classes: int, per_class: int, run_seed: int, pool: str, *, offset: int = 0):
    """(labels (N,), seeds (N,)): class-major, one seed per image, disjoint across pools and runs."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    base = run_seed * 10_000_000 + _SEED_OFFSETS[pool] + offset
    return labels, torch.arange(base, base + labels.shape[0], dtype=torch.int64)


def generate_plain(
    generator: Generator, labels: torch.Tensor, seeds: torch.Tensor, ctx: RunContext, *, stage: str
) -> SyntheticPool:
    """Class-token generation, no UtilGen: the first pool and the plain baseline."""
    sampler = ctx.cfg.generator
    images = generator.sample(
        generator.class_prompt_embeds(labels),
        generator.initial_noise(seeds.tolist()),
        guidance_scale=sampler.guidance_scale,
        steps=sampler.steps,
        batch_size=sampler.batch_size,
        progress=ctx.progress,
    )
    pool = SyntheticPool.create(images, labels, ctx.real.class_names, seeds, round=0, stage=stage)
    return to_task_size(pool, ctx.real)


def to_task_size(pool: SyntheticPool, real: Splits) -> SyntheticPool:
    pool.images = resize_images(pool.images, real.train.images.shape[-1])
    return pool


# ------------------------------------------------------------------------------------ MLCO


def mlco_round(generator: Generator, valuation: Valuation, round_index: int, ctx: RunContext) -> None:
    """Candidates per class -> utility pairs -> one Diffusion-DPO round; adapters, pool and history saved."""
    cfg, real = ctx.cfg, ctx.real
    k = len(real.class_names)
    out = ctx.directory.path / f"mlco/round-{round_index}"
    _, seeds = instance_list(k, cfg.mlco.candidates_per_class, cfg.run.seed, "mlco", offset=round_index * 100_000)
    candidates = adaptation.generate_candidates(
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
        progress=ctx.progress,
    )
    pairs = adaptation.pairs_from_pool(candidates, pairs_per_class=cfg.mlco.pairs_per_class, min_gap=cfg.mlco.min_gap)
    summary = {"round": round_index, "pairs": len(pairs), "mean_candidate_utility": float(candidates.utilities.mean())}
    if len(pairs) == 0:
        log.warning(
            "MLCO round %d: no pairs (every class a near-tie under min_gap %.3g); the generator is unchanged",
            round_index,
            cfg.mlco.min_gap,
        )
        summary["skipped"] = "no pairs"
    else:
        before = adaptation.evaluate_pairs(generator, pairs, beta=cfg.mlco.beta)
        result = outputs.train_dpo_or_stop(
            generator, pairs, cfg.mlco, out, round_index, seed=cfg.run.seed, progress=ctx.progress
        )
        after = adaptation.evaluate_pairs(generator, pairs, beta=cfg.mlco.beta)
        adaptation.save_adapters(generator.denoiser, out / "adapters.safetensors")
        summary.update(
            implicit_accuracy_before=before.implicit_acc,
            implicit_accuracy_after=after.implicit_acc,
            steps=result.steps_done,
            history=dataclasses.asdict(result.history),
        )
    candidates = to_task_size(candidates, real)
    if cfg.mlco.refresh_valuation:
        refreshed = outputs.fit_or_stop(real, candidates, cfg.valuation, out / "valuation", **_run_args(ctx))
        check = refresh_check(valuation, refreshed, real)
        adopted = check["passed"] or not cfg.mlco.refresh_check
        summary["valuation_refresh"] = check | {"adopted": adopted}
        if not check["passed"]:
            log.warning(
                "MLCO round %d: the refreshed valuation ranks the meta set's true labels above wrong ones worse "
                "than the one in use (mislabel AUROC %s < %s); %s",
                round_index,
                check["mislabel_auroc_refreshed"],
                check["mislabel_auroc_in_use"],
                "adopted anyway (mlco.refresh_check=false)" if adopted else "keeping the one in use",
            )
        # A refresh that is not adopted is kept beside the round for diagnosis, under a name the loop ignores.
        outputs.save_valuation(refreshed, candidates, out / ("valuation" if adopted else "valuation-rejected"))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "round.json", summary)
    outputs.save_pool(ctx.directory, f"mlco-{round_index}", candidates)


def refresh_check(in_use: Valuation, refreshed: Valuation, real: Splits) -> dict:
    """Both valuations' ``mislabel_auroc`` on the meta set; ``passed``: the refreshed one ranks true labels
    above wrong ones at least as well as the one in use."""
    before = mislabel_auroc(in_use, real.meta.images, real.meta.labels)
    after = mislabel_auroc(refreshed, real.meta.images, real.meta.labels)
    passed = before is None or (after is not None and after >= before)
    return {"mislabel_auroc_in_use": before, "mislabel_auroc_refreshed": after, "passed": passed}


# ------------------------------------------------------------------------------------ ILPO, ablation


def repair_threshold(config: ILPOConfig, valuation_dir) -> float | None:
    """Repair mode: the ``repair_quantile`` of the utilities of the pool that the valuation in
    ``valuation_dir`` was fitted on (D_g0, or a refresh round's candidates); None: every instance ascends."""
    if config.repair_quantile is None:
        return None
    return float(torch.quantile(outputs.valued_pool_utilities(valuation_dir), config.repair_quantile))


def optimise(
    generator: Generator,
    valuation: Valuation,
    labels: torch.Tensor,
    seeds: torch.Tensor,
    config: ILPOConfig,
    ascend_below: float | None,
    ctx: RunContext,
) -> tuple[SyntheticPool, adaptation.ILPOHistory]:
    """ILPO over the (label, seed) list, rendered with the generator section's sampler, at the task's size."""
    pool, history = adaptation.optimise_instances(
        generator,
        valuation,
        labels,
        seeds,
        config,
        sampler=ctx.cfg.generator,
        ascend_below=ascend_below,
        progress=ctx.progress,
    )
    return to_task_size(pool, ctx.real), history


def ablation(
    generator: Generator,
    valuation: Valuation,
    labels: torch.Tensor,
    seeds: torch.Tensor,
    ascend_below: float | None,
    ctx: RunContext,
) -> None:
    """+MLCO (class prompts, tuned generator), +prompt and +noise (ILPO parts, generator without MLCO), and
    plain generation at the re-denoise's high guidance (the control +noise is read against)."""
    outputs.save_pool(ctx.directory, "ablation-mlco", generate_plain(generator, labels, seeds, ctx, stage="ablation"))
    base = build_generator(ctx.cfg.generator, ctx.real.class_names, generator.device)
    base.set_class_tokens(generator.class_tokens.clone())
    high = dataclasses.replace(ctx.cfg.generator, guidance_scale=ctx.cfg.ilpo.redenoise_high_guidance)
    high_ctx = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, generator=high))
    outputs.save_pool(
        ctx.directory, "ablation-high-guidance", generate_plain(base, labels, seeds, high_ctx, stage="ablation")
    )
    ilpo = ctx.cfg.ilpo  # the final pool's ILPO, one part at a time
    prompt_only = dataclasses.replace(ilpo, noise_strategy="none")
    for name, tuned, part in (
        ("ablation-prompt", base, prompt_only),
        ("ablation-noise", base, dataclasses.replace(ilpo, prompt_steps=0)),
        ("ablation-mlco-prompt", generator, prompt_only),  # cumulative: the MLCO-tuned generator's prompts
    ):
        pool, _ = optimise(tuned, valuation, labels, seeds, part, ascend_below, ctx)
        outputs.save_pool(ctx.directory, name, pool)


# ------------------------------------------------------------------------------------ baselines


def baselines(
    learned_tokens: torch.Tensor, plain: SyntheticPool, labels: torch.Tensor, seeds: torch.Tensor, ctx: RunContext
) -> dict:
    """The baseline pools (``utilgen.baselines``), each |D_g| on the final (label, seed) list, from generators
    without MLCO: plain with the untrained tokens, plain + filter, DataDream-style. Their record."""
    from utilgen import baselines as base
    from utilgen.evaluate import train_classifier

    cfg, real, device = ctx.cfg, ctx.real, ctx.device
    fresh = build_generator(cfg.generator, real.class_names, device)  # the tokens it starts from, untrained
    outputs.save_pool(
        ctx.directory, "baseline-untrained-tokens", generate_plain(fresh, labels, seeds, ctx, stage="baseline")
    )
    fresh.set_class_tokens(learned_tokens.clone())

    # plain + filter: the plain pool and as many again (or more) new images, cut back per class by a classifier
    # trained on the shots + meta set with the evaluation recipe (a seed outside the evaluation seeds' range).
    per_class = cfg.final_per_class()
    extra = max(1, round((cfg.baselines.filter_oversample - 1) * per_class))
    extra_labels, extra_seeds = instance_list(len(real.class_names), extra, cfg.run.seed, "filter")
    candidates = plain.concat(generate_plain(fresh, extra_labels, extra_seeds, ctx, stage="baseline"))
    judge_of_consistency = train_classifier(
        joint(real.train, real.meta), cfg.evaluation, seed=1_000_000 + cfg.run.seed, device=device
    )
    consistency = base.label_consistency(judge_of_consistency, candidates.images, candidates.labels)
    kept = torch.zeros(len(candidates), dtype=torch.bool)
    kept[base.most_consistent(candidates, consistency, per_class)] = True
    outputs.save_pool(ctx.directory, "baseline-filter", candidates.subset(torch.nonzero(kept).flatten()))

    # DataDream-style: a LoRA on the denoiser fitted to the shots with the diffusion loss, then plain generation.
    settings = cfg.baselines
    try:
        losses = base.fit_datadream_adapter(
            fresh,
            real.train,
            steps=settings.datadream_steps,
            lr=settings.datadream_lr,
            batch_size=settings.datadream_batch_size,
            rank=cfg.mlco.lora_rank,
            alpha=cfg.mlco.lora_alpha,
            target_modules=cfg.mlco.target_modules,
            seed=cfg.run.seed,
            progress=ctx.progress,
        )
    except base.DataDreamDivergedError as error:
        raise StageError(f"{error}; resume with --resume DIR --set baselines.datadream_lr=...") from error
    outputs.save_pool(ctx.directory, "baseline-datadream", generate_plain(fresh, labels, seeds, ctx, stage="baseline"))
    return {
        "filter": base.consistency_summary(consistency, kept),
        "datadream": {"steps": len(losses), "loss_first_10": _mean(losses[:10]), "loss_last_10": _mean(losses[-10:])},
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


# ------------------------------------------------------------------------------------ evaluation


BASELINE_LABELS = {
    "baseline-untrained-tokens": "plain untrained-tokens",
    "baseline-filter": "plain + filter",
    "baseline-datadream": "datadream-style",
}


def evaluation_settings(
    real: Splits,
    plain: SyntheticPool,
    utilgen_pool: SyntheticPool,
    ablation_pools: dict[str, SyntheticPool],
    baseline_pools: dict[str, SyntheticPool] | None = None,
) -> list[TrainingSet]:
    """Real only; plain and UtilGen, each synthetic-only and joint with the real shots; the ablation pools;
    with the baselines, real only on the shots + meta set and each baseline pool synthetic-only."""
    settings = [TrainingSet("real-only", real.train, "real", None)]
    if baseline_pools:
        settings.append(TrainingSet("real-only train+meta", joint(real.train, real.meta), "real", None))
    for name, pool in (("plain", plain), ("utilgen", utilgen_pool)):
        synthetic = pool.to_labelled()
        settings.append(TrainingSet(f"{name} synthetic-only", synthetic, "synthetic", name))
        settings.append(TrainingSet(f"{name} joint", joint(real.train, synthetic), "joint", name))
    for name, pool in (baseline_pools or {}).items():
        settings.append(TrainingSet(f"{BASELINE_LABELS[name]} synthetic-only", pool.to_labelled(), "synthetic", name))
    for name, pool in ablation_pools.items():
        label = "plain high-guidance" if name == "ablation-high-guidance" else name.replace("ablation-", "+")
        label = label.replace("-prompt", "+prompt") if name == "ablation-mlco-prompt" else label
        settings.append(TrainingSet(f"{label} synthetic-only", pool.to_labelled(), "synthetic", name))
    return settings
