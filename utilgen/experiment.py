"""``python -m utilgen.experiment``: studies through the library's own stages.

``protocol``: the experiment a reviewer accepts (``utilgen.protocol``): P pipeline seeds x C classifier
seeds, each pipeline seed its own few-shot draw and a full run with the baselines and the ablation;
one table and one JSON with every row's per-seed values and paired differences with 95% intervals.

``tokens``: how well plain generation does with learned class tokens, per textual-inversion setting,
on the validation set (the first 600 train-file images of each class; the default generator was trained
without them and no test read touches them). For each setting and pipeline seed it cuts the few-shot
splits from the validation images (the seed is the split seed and the run seed), learns the tokens,
draws the plain pool exactly as a run does (``loop.generate_plain``), asks the judge what the pool
shows (fine class, coarse group), and trains the evaluation recipe's classifiers on the pool alone,
scored on the rest of the validation images.

This is the gate of the coarse regime (docs/method.md, "The regime"): plain generation with tuned
tokens must be clearly above chance within a group and judged fine-correct below 80%, or the regime
has not been reached. Tune plain first, before any UtilGen setting.

Every (setting, seed) result is written atomically to ``OUT/<setting>/seed-<p>.json`` as it finishes; a
rerun skips the ones already there, so a killed study resumes. ``OUT/summary.json`` gathers them.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

log = logging.getLogger("utilgen.experiment")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utilgen.experiment", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="study", required=True)
    for study, about in (
        ("tokens", "plain generation per textual-inversion setting, on validation"),
        ("mlco", "plain vs the MLCO-tuned generator per DPO setting, on validation"),
    ):
        grid = sub.add_parser(study, help=about)
        grid.add_argument("--out", type=Path, required=True, help="study directory (resumable)")
        grid.add_argument("--preset", default="default")
        grid.add_argument(
            "--grid",
            action="append",
            default=[],
            metavar="KEY=V1,V2",
            help="a config key and its values; several --grid give their product (e.g. --grid tokens.lr=5e-3,2.5e-2)",
        )
        grid.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
        grid.add_argument("--seeds", default="0,1", help="pipeline seeds (each its own few-shot draw)")
        grid.add_argument("--quiet", action="store_true")

    protocol = sub.add_parser(
        "protocol", help="P pipeline seeds x C classifier seeds: every row, paired differences, 95%% intervals"
    )
    protocol.add_argument("--out", type=Path, required=True, help="protocol directory (resumable)")
    protocol.add_argument("--preset", default="default")
    protocol.add_argument("--pipeline-seeds", default="0,1,2,3,4", help="each its own run seed and few-shot draw")
    protocol.add_argument("--classifier-seeds", default="0,1,2", help="evaluation classifiers per setting")
    protocol.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    protocol.add_argument("--no-baselines", action="store_true", help="leave out the baselines (baselines.enabled)")
    protocol.add_argument("--no-ablation", action="store_true", help="leave out the ablation (evaluation.ablation)")
    protocol.add_argument(
        "--loss-utility",
        action="store_true",
        help="also run the method with utility = the plain classifier's loss (valuation.utility=classifier-loss)",
    )
    protocol.add_argument("--quiet", action="store_true")
    return parser


def grid_settings(grid: list[str]) -> list[list[str]]:
    """Each setting of the product of ``--grid KEY=V1,V2`` as a list of ``KEY=V`` overrides."""
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SystemExit(f"--grid takes KEY=V1,V2,..., got {item!r}")
        axes.append([f"{key}={value}" for value in values.split(",")])
    return [list(combination) for combination in itertools.product(*axes)] or [[]]


def setting_name(overrides: list[str]) -> str:
    return "__".join(overrides).replace("/", "_") or "as-configured"


def tokens_study(cfg, seed: int, *, judge, progress: bool) -> dict:
    """One pipeline seed of one setting: the plain pool's judged correctness and synthetic-only accuracy."""
    import torch

    from utilgen.data import make_splits
    from utilgen.evaluate import TrainingSet, evaluate
    from utilgen.generator import build_generator
    from utilgen.loop import RunContext, generate_plain, instance_list, learn_tokens
    from utilgen.preflight import load_task_data
    from utilgen.stages import stage_seed

    device = torch.device("cpu")
    data = load_task_data(cfg)
    real = make_splits(
        data,
        shots_per_class=cfg.data.shots_per_class,
        meta_per_class=cfg.data.meta_per_class,
        test_per_class=cfg.data.test_per_class,
        seed=cfg.data.split_seed,
    )
    ctx = RunContext(cfg, None, device, real, progress)
    generator = build_generator(cfg.generator, real.class_names, device)
    start_tokens = generator.class_tokens.clone()
    torch.manual_seed(stage_seed(cfg.run.seed, "tokens"))  # as the run's stage does
    tokens = learn_tokens(generator, ctx)
    generator.set_class_tokens(tokens.to(device))
    moved = ((tokens - start_tokens).flatten(1).norm(dim=1) / start_tokens.flatten(1).norm(dim=1)).tolist()
    labels, seeds = instance_list(len(real.class_names), cfg.final_per_class(), cfg.run.seed, "final")
    torch.manual_seed(stage_seed(cfg.run.seed, "plain"))
    pool = generate_plain(generator, labels, seeds, ctx, stage="plain")
    accuracy = evaluate(
        [TrainingSet("plain synthetic-only", pool.to_labelled(), "synthetic", "plain")],
        real.test,
        cfg.evaluation,
        device=device,
        progress=progress,
    )["plain synthetic-only"]
    return {
        "seed": seed,
        "judge": judge.verdicts(pool.images, pool.labels),
        "plain_synthetic_only": accuracy,
        "token_moved_relative": [round(m, 4) for m in moved],
        "validation_test_images": len(real.test.labels),
    }


def mlco_study(cfg, seed: int, *, judge, progress: bool, workdir: Path) -> dict:
    """One pipeline seed of one DPO setting: the run's stages up to MLCO (tokens, D_g0, TODV, the rounds with
    their refreshes) in ``workdir``, then the final (label, seed) list drawn from the tuned generator with
    the class prompts (the ablation's +MLCO pool) against the same list from the untuned one (plain):
    judged correctness and synthetic-only accuracy on the rest of the validation images, classifier seed by
    classifier seed."""
    import torch

    from utilgen import stage_outputs as outputs
    from utilgen.data import make_splits
    from utilgen.evaluate import TrainingSet, evaluate
    from utilgen.generator import build_generator
    from utilgen.loop import RunContext, generate_plain, instance_list, learn_tokens, mlco_round
    from utilgen.preflight import load_task_data
    from utilgen.rundir import RunDirectory
    from utilgen.stages import stage_seed

    device = torch.device("cpu")
    data = load_task_data(cfg)
    counts = {"shots_per_class": cfg.data.shots_per_class, "meta_per_class": cfg.data.meta_per_class}
    real = make_splits(data, **counts, test_per_class=cfg.data.test_per_class, seed=cfg.data.split_seed)
    directory = RunDirectory.create(workdir, cfg.to_dict())
    ctx = RunContext(cfg, directory, device, real, progress)
    generator = build_generator(cfg.generator, real.class_names, device)
    torch.manual_seed(stage_seed(cfg.run.seed, "tokens"))
    generator.set_class_tokens(learn_tokens(generator, ctx).to(device))
    k = len(real.class_names)
    labels, seeds = instance_list(k, cfg.final_per_class(), cfg.run.seed, "final")
    plain = generate_plain(generator, labels, seeds, ctx, stage="plain")
    pool0_labels, pool0_seeds = instance_list(k, cfg.synthetic.first_pool_per_class, cfg.run.seed, "pool0")
    pool0 = generate_plain(generator, pool0_labels, pool0_seeds, ctx, stage="initial")
    valuation = outputs.fit_or_stop(
        real, pool0, cfg.valuation, workdir / "valuation", seed=cfg.run.seed, device=device, progress=progress
    )
    rounds = []
    for round_index in range(1, cfg.mlco.rounds + 1):
        torch.manual_seed(stage_seed(cfg.run.seed, f"mlco-{round_index}"))
        mlco_round(generator, valuation, round_index, ctx)
        rounds.append(json.loads((workdir / f"mlco/round-{round_index}/round.json").read_text()))
        refreshed = workdir / f"mlco/round-{round_index}/valuation"
        if cfg.mlco.refresh_valuation and refreshed.exists():
            from utilgen.valuation import Valuation

            valuation = Valuation.load(refreshed, device=device)
    tuned = generate_plain(generator, labels, seeds, ctx, stage="ablation")
    accuracy = evaluate(
        [
            TrainingSet("plain synthetic-only", plain.to_labelled(), "synthetic", "plain"),
            TrainingSet("+mlco synthetic-only", tuned.to_labelled(), "synthetic", "ablation-mlco"),
        ],
        real.test,
        cfg.evaluation,
        device=device,
        progress=progress,
    )
    return {
        "seed": seed,
        "judge": {
            "plain": judge.verdicts(plain.images, plain.labels),
            "+mlco": judge.verdicts(tuned.images, tuned.labels),
        },
        "accuracy": accuracy,
        "rounds": [{k: v for k, v in r.items() if k != "history"} for r in rounds],
        "validation_test_images": len(real.test.labels),
    }


def run_mlco(args: argparse.Namespace) -> int:
    from utilgen.comparison import paired_difference

    def study(cfg, seed, judge, progress, path):
        return mlco_study(cfg, seed, judge=judge, progress=progress, workdir=path.with_suffix(".run"))

    def summary(rows):
        def accuracies(setting):  # pipeline-seed-major, its classifier seeds inside: the pairs of the difference
            return [a for row in rows for a in row["accuracy"][setting]["accuracies"]]

        return {
            "seeds": [r["seed"] for r in rows],
            "judged_fine_plain": statistics.fmean(r["judge"]["plain"]["fine"] for r in rows),
            "judged_fine_mlco": statistics.fmean(r["judge"]["+mlco"]["fine"] for r in rows),
            # paired by (pipeline seed, classifier seed): a screening number, not the protocol's statistics
            "mlco_minus_plain": paired_difference(
                accuracies("+mlco synthetic-only"), accuracies("plain synthetic-only")
            ),
        }

    return _grid_study(args, study, summary)


def run_tokens(args: argparse.Namespace) -> int:
    def study(cfg, seed, judge, progress, path):
        return tokens_study(cfg, seed, judge=judge, progress=progress)

    return _grid_study(args, study, _summarise)


def _grid_study(args: argparse.Namespace, study, summarise) -> int:
    """Each setting of ``--grid`` x each seed on the validation set: ``study(cfg, seed, judge, progress,
    path)`` -> a JSON row, written to ``path`` atomically; rows already there are reused."""
    from utilgen.config import build_config
    from utilgen.io import atomic_write_json
    from utilgen.judge import load_judge

    judge = load_judge()
    seeds = [int(s) for s in args.seeds.split(",")]
    summary_path = args.out / "summary.json"  # earlier invocations' settings stay in it
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for overrides in grid_settings(args.grid):
        name = setting_name(overrides)
        rows = []
        for seed in seeds:
            path = args.out / name / f"seed-{seed}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
                continue
            settings = [
                "data.source=validation",
                f"run.seed={seed}",
                f"data.split_seed={seed}",
                *args.overrides,
                *overrides,
            ]
            cfg = build_config(args.preset, None, settings)
            start = time.perf_counter()
            shutil.rmtree(path.with_suffix(".run"), ignore_errors=True)  # a killed attempt's scratch run
            row = study(cfg, seed, judge, not args.quiet, path)
            row.update(seconds=round(time.perf_counter() - start, 1), config=cfg.to_dict())
            atomic_write_json(path, row)
            rows.append(row)
            log.info("%s seed %d done in %.0f s", name, seed, row["seconds"])
        summary[name] = summarise(rows)
        print(f"{name}: {json.dumps(summary[name])}", flush=True)
    atomic_write_json(summary_path, summary)
    return 0


def _summarise(rows: list[dict]) -> dict:
    def mean(values):
        return round(statistics.fmean(values), 4)

    return {
        "seeds": [row["seed"] for row in rows],
        "judged_fine": mean([row["judge"]["fine"] for row in rows]),
        "judged_coarse": mean([row["judge"]["coarse"] for row in rows]),
        "plain_synthetic_only": mean([row["plain_synthetic_only"]["mean"] for row in rows]),
        "plain_synthetic_only_per_seed": [round(row["plain_synthetic_only"]["mean"], 4) for row in rows],
        "token_moved_relative": mean([statistics.fmean(row["token_moved_relative"]) for row in rows]),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s")
    if args.study == "tokens":
        return run_tokens(args)
    if args.study == "mlco":
        return run_mlco(args)
    if args.study == "protocol":
        from utilgen.protocol import run_protocol

        return run_protocol(args)
    raise AssertionError(args.study)


if __name__ == "__main__":
    sys.exit(main())
