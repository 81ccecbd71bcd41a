"""``python -m utilgen.experiment protocol``: the experiment a skeptical reviewer accepts (layer 6).

P pipeline seeds x C classifier seeds. Each pipeline seed p is one full run (``python -m utilgen.run``)
with run seed p and split seed p, so it has its own few-shot draw, tokens, pools and valuation; inside
it every evaluated setting trains C classifiers. By default each run also builds the baselines
(``baselines.enabled``) and the ablation (``evaluation.ablation``); ``--loss-utility`` adds a second run
per seed whose utility is the plain classifier's loss (``valuation.utility=classifier-loss``).

The unit of the statistics is the pipeline seed: a row's value for seed p is the mean over its C
classifiers, and every comparison pairs two rows seed by seed (the same draw, the same plain pool), with
a 95% Student-t interval over the P differences and the number of seeds where it is positive. A row is
compared with plain generation of its kind (synthetic-only with plain synthetic-only, joint with plain
joint, real only with plain synthetic-only).

The runs live in ``OUT/runs/seed-<p>[-classifier-loss]``; a rerun resumes each (finished ones cost a
few seconds), so a killed protocol continues where it stopped. ``OUT/protocol.json`` and
``OUT/protocol.md`` hold the result, with the test split's digest per seed and the number of test reads.
Tune on the validation set (``--set data.source=validation``), never on the test split.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from utilgen.comparison import ABLATION_SETTINGS, COMPARISONS, CONTROLS, HIGH_GUIDANCE, paired_difference

LOSS_UTILITY = "classifier-loss"
# Switches that only add stages to a finished run (the baselines' pools, the ablation's pools, and the
# evaluation of them): a run made without them is extended by resuming it, its other stages kept, so a
# protocol run with --no-ablation can take the ablation later without redoing the method.
EXTENSIONS = ("baselines.enabled", "evaluation.ablation")
LOSS_UTILITY_ROW = "utilgen, classifier-loss utility synthetic-only"
PLAIN = {"synthetic": "plain synthetic-only", "joint": "plain joint", "real": "plain synthetic-only"}
# The table's order (metrics.json sorts its keys): real only, the generated pools from the weakest baseline
# up to UtilGen, the ablation, then the joint pools. Rows not named here follow in name order.
ROW_ORDER = (
    "real-only",
    "real-only train+meta",
    "plain untrained-tokens synthetic-only",
    "plain synthetic-only",
    "plain high-guidance synthetic-only",
    "plain + filter synthetic-only",
    "datadream-style synthetic-only",
    "utilgen synthetic-only",
    LOSS_UTILITY_ROW,
    "+mlco synthetic-only",
    "+prompt synthetic-only",
    "+noise synthetic-only",
    "+mlco+prompt synthetic-only",
    "plain joint",
    "utilgen joint",
)


def run_protocol(args) -> int:
    from utilgen.config import ConfigError, build_config
    from utilgen.io import atomic_write_json, atomic_write_text

    pipeline_seeds = _seeds(args.pipeline_seeds, "--pipeline-seeds")
    classifier_seeds = _seeds(args.classifier_seeds, "--classifier-seeds")
    common = [
        f"evaluation.seeds={','.join(map(str, classifier_seeds))}",
        f"baselines.enabled={str(not args.no_baselines).lower()}",
        f"evaluation.ablation={str(not args.no_ablation).lower()}",
        *args.overrides,
    ]
    try:  # every setting checked before the first run starts
        frozen = build_config(args.preset, None, common)
    except ConfigError as error:
        print(f"utilgen: bad input: {error}", file=sys.stderr)
        return 2
    variants = {"main": []}
    if args.loss_utility:
        variants[LOSS_UTILITY] = [
            f"valuation.utility={LOSS_UTILITY}",
            "baselines.enabled=false",
            "evaluation.ablation=false",
        ]
    runs: dict[str, dict[int, dict]] = {name: {} for name in variants}
    start = time.perf_counter()
    for seed in pipeline_seeds:
        for name, extra in variants.items():
            directory = args.out / "runs" / (f"seed-{seed}" + ("" if name == "main" else f"-{name}"))
            overrides = [*common, f"run.seed={seed}", f"data.split_seed={seed}", *extra]
            if name != "main" and not directory.exists():
                _start_from_main(args.out / "runs" / f"seed-{seed}", directory, args.preset, overrides)
            status = _run(args.preset, overrides, directory, quiet=args.quiet)
            if status != 0:
                print(
                    f"utilgen: the run {directory} stopped (exit {status}); fix what it names and rerun this "
                    "command: finished runs and stages are kept",
                    file=sys.stderr,
                )
                return status
            runs[name][seed] = _read_run(directory)
            print(f"protocol: pipeline seed {seed} ({name}) done, {time.perf_counter() - start:.0f} s", flush=True)
    result = summarise(runs["main"], runs.get(LOSS_UTILITY, {}))
    result["protocol"] = {
        "preset": args.preset,
        "overrides": common,
        "pipeline_seeds": pipeline_seeds,
        "classifier_seeds": classifier_seeds,
        "loss_utility_variant": args.loss_utility,
        "config_seed_0": frozen.to_dict(),
    }
    atomic_write_json(args.out / "protocol.json", result)
    atomic_write_text(args.out / "protocol.md", markdown(result))
    print(markdown(result))
    return 0


# The stages before TODV read no valuation, baseline or ablation setting: a variant run (another utility)
# of the same pipeline seed has them identical to the main run's, so it starts from copies of them. The
# classifiers the main run scored (real only, plain) are adopted too, through their digests.
SHARED_STAGES = ("splits", "tokens", "pool0", "plain")


def _start_from_main(main: Path, variant: Path, preset: str, overrides: list[str]) -> None:
    """Create ``variant`` as a run of ``overrides`` holding the main run's ``SHARED_STAGES``; the resume
    that follows runs the rest. Built beside it and renamed, so a kill leaves no half-made run."""
    from utilgen.config import build_config
    from utilgen.rundir import RunDirectory
    from utilgen.stage_outputs import EVALUATED

    if not (main / "manifest.json").exists():
        return
    building = variant.with_name(f".{variant.name}.starting")
    shutil.rmtree(building, ignore_errors=True)
    run = RunDirectory.create(building, build_config(preset, None, overrides).to_dict())
    adopted = run.adopt_stages(main, SHARED_STAGES, files=(EVALUATED,))
    building.rename(variant)
    print(f"protocol: {variant.name} starts from {main.name}'s stages {', '.join(adopted) or '(none)'}", flush=True)


def _read_run(directory: Path) -> dict:
    """A finished run's ``metrics.json``, with its first TODV fit's attempts (the inversion guard's record,
    ``valuation/history.json``; runs from before the guard have none)."""
    metrics = json.loads((directory / "metrics.json").read_text())
    history = directory / "valuation/history.json"
    metrics["valuation_first_fit"] = json.loads(history.read_text()).get("attempts", []) if history.exists() else []
    return metrics


def _switched_on(key: str, config: dict) -> bool:
    section, _, name = key.partition(".")
    return config[section][name] is True


def _seeds(text: str, flag: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"{flag} takes comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"{flag} needs at least one seed and no repeats, got {text!r}")
    return seeds


def _run(preset: str, overrides: list[str], directory: Path, *, quiet: bool) -> int:
    """One pipeline seed's run: started, or resumed where it stopped (a finished one only re-reads).

    A run directory made with other settings is refused (exit 2): its stages would not be redone, so the
    protocol would mix configurations. The one exception is an ``EXTENSIONS`` switch turned on: the run is
    resumed with it, which adds its stages and re-evaluates."""
    from utilgen.config import build_config

    command = [sys.executable, "-m", "utilgen.run"]
    if (directory / "manifest.json").exists():
        expected = build_config(preset, None, overrides).to_dict()
        saved = json.loads((directory / "config.json").read_text())
        changed = sorted(
            f"{section}.{key}"
            for section, values in expected.items()
            if isinstance(values, dict)
            for key, value in values.items()
            if json.loads(json.dumps(value)) != saved.get(section, {}).get(key)
        )
        added = [key for key in changed if key in EXTENSIONS and _switched_on(key, expected)]
        if added and len(added) == len(changed) and saved.get("preset") == preset:
            print(f"protocol: extending {directory} with {', '.join(added)}: its finished stages are kept", flush=True)
        elif changed or saved.get("preset") != preset:
            print(
                f"utilgen: {directory} was run with other settings ({', '.join(changed) or 'the preset'}); "
                "a protocol holds one configuration: use a new --out",
                file=sys.stderr,
            )
            return 2
        command += ["--resume", str(directory)]
    else:
        command += ["--preset", preset, "--out", str(directory)]
    for override in overrides:
        command += ["--set", override]
    if quiet:
        command.append("--quiet")
    directory.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command, check=False).returncode


# ------------------------------------------------------------------------------------ the statistics


def summarise(runs: dict[int, dict], loss_runs: dict[int, dict]) -> dict:
    """The protocol's result from each pipeline seed's ``metrics.json`` (and the loss-utility variant's)."""
    seeds = sorted(runs)
    accuracy = {seed: dict(runs[seed]["accuracy"]) for seed in seeds}
    for seed, metrics in loss_runs.items():
        accuracy[seed][LOSS_UTILITY_ROW] = {**metrics["accuracy"]["utilgen synthetic-only"], "pool": "utilgen"}
    names = sorted(accuracy[seeds[0]], key=lambda n: (ROW_ORDER.index(n) if n in ROW_ORDER else len(ROW_ORDER), n))

    def per_seed(name: str) -> list[float]:
        return [accuracy[seed][name]["mean"] for seed in seeds]

    rows = []
    for name in names:
        if not all(name in accuracy[seed] for seed in seeds):
            continue
        values = per_seed(name)
        row = {
            "setting": name,
            "train_set": accuracy[seeds[0]][name]["train_set"],
            "mean": statistics.fmean(values),
            "std_over_pipeline_seeds": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_pipeline_seed": values,
            "per_classifier_seed": [accuracy[seed][name]["accuracies"] for seed in seeds],
        }
        reference = PLAIN[row["train_set"]]
        if name != reference and reference in names:
            row["vs_plain"] = _difference(values, per_seed(reference), reference)
        runs_of_row = loss_runs if name == LOSS_UTILITY_ROW else runs
        row["judge"] = _judged(runs_of_row, seeds, accuracy[seeds[0]][name].get("pool"))
        rows.append(row)
    pairs = [*COMPARISONS, *((a, "plain synthetic-only") for a in (*ABLATION_SETTINGS, HIGH_GUIDANCE)), *CONTROLS]
    pairs += [(LOSS_UTILITY_ROW, "utilgen synthetic-only")]
    comparisons = [
        {"a": a, "b": b, **_difference(per_seed(a), per_seed(b), b)} for a, b in pairs if a in names and b in names
    ]
    experiments = [runs[seed]["experiment"] for seed in seeds] + [m["experiment"] for m in loss_runs.values()]
    timings = {seed: sum(runs[seed]["timings"].values()) for seed in seeds}
    for seed, metrics in loss_runs.items():
        timings[seed] += sum(metrics["timings"].values())
    return {
        "rows": rows,
        "comparisons": comparisons,
        "valuation_auroc": _valuation_auroc(runs, seeds),
        "judged_pools": _judged_pools(runs, seeds),
        "valuation_first_fit": {seed: runs[seed].get("valuation_first_fit", []) for seed in seeds},
        "valuation_refresh": _refreshes(runs, seeds),
        "ilpo": {seed: runs[seed]["ilpo"] for seed in seeds if runs[seed].get("ilpo")},
        "test": {
            "test_reads": sum(e["test_reads"] for e in experiments),
            "test_split_sha256": {seed: runs[seed]["experiment"]["test_split_sha256"] for seed in seeds},
            "test_images": runs[seeds[0]]["experiment"]["test_images"],
            "data": runs[seeds[0]]["experiment"]["data"],
        },
        "stage_seconds_per_pipeline_seed": timings,
        "machine": runs[seeds[0]]["machine"],
    }


def _difference(a: list[float], b: list[float], against: str) -> dict:
    difference = paired_difference(a, b)
    positive = sum(d > 0 for d in difference["per_seed_points"])
    return {"against": against, **difference, "positive_seeds": positive}


def _judged(runs: dict[int, dict], seeds: list[int], pool: str | None) -> dict | None:
    """The judge's shares on the row's pool, mean over pipeline seeds (None: no pool or no judge)."""
    verdicts = [runs[seed].get("judge", {}) or {} for seed in seeds if seed in runs]
    if pool is None or not verdicts or not all(pool in v for v in verdicts):
        return None
    return {
        "fine": statistics.fmean(v[pool]["fine"] for v in verdicts),
        "coarse": statistics.fmean(v[pool]["coarse"] for v in verdicts),
    }


def _valuation_auroc(runs: dict[int, dict], seeds: list[int]) -> dict:
    """Per pool with utilities: how well they separate the judge's right-fine-class images from the wrong,
    per pipeline seed and on average."""
    return _per_pool(runs, seeds, "utility_auroc")


def _judged_pools(runs: dict[int, dict], seeds: list[int]) -> dict:
    """Every judged pool's share in its own fine class, per pipeline seed and on average: what each stage's
    images show (pool0 -> the MLCO rounds' candidates -> plain vs UtilGen)."""
    return _per_pool(runs, seeds, "fine")


def _per_pool(runs: dict[int, dict], seeds: list[int], field: str) -> dict:
    """{pool: {mean, per_pipeline_seed}} of the judge's ``field`` for the pools that have it in every seed."""
    found: dict[str, list[float]] = {}
    for seed in seeds:
        for pool, verdict in (runs[seed].get("judge") or {}).items():
            if verdict.get(field) is not None:
                found.setdefault(pool, []).append(verdict[field])
    return {
        pool: {"mean": statistics.fmean(values), "per_pipeline_seed": values}
        for pool, values in found.items()
        if len(values) == len(seeds)
    }


def _refreshes(runs: dict[int, dict], seeds: list[int]) -> dict:
    """Per pipeline seed, each MLCO round's refresh check (``mlco.refresh_check``): the mislabel AUROC of the
    valuation in use and of the refit, and whether the refit was adopted."""
    return {
        seed: [
            {"round": r["round"], **r["valuation_refresh"]}
            for r in runs[seed].get("mlco") or []
            if r.get("valuation_refresh")
        ]
        for seed in seeds
    }


# ------------------------------------------------------------------------------------ the table


def markdown(result: dict) -> str:
    protocol, test = result.get("protocol", {}), result["test"]
    seeds = len(result["rows"][0]["per_pipeline_seed"]) if result["rows"] else 0
    lines = [
        "# UtilGen protocol",
        "",
        f"{seeds} pipeline seeds (each its own few-shot draw) x {len(protocol.get('classifier_seeds', []))} "
        f"classifier seeds, preset `{protocol.get('preset', '?')}`, data `{test['data']}`, "
        f"{test['test_images']} test images per seed; test reads: {test['test_reads']}.",
        "A row's value per pipeline seed is the mean of its classifiers; differences are paired by pipeline "
        "seed, with a 95% t-interval over seeds and the count of seeds where the difference is positive.",
        "",
        "| setting | mean % | per pipeline seed % | vs plain (points) | 95% CI | positive seeds | judged fine % "
        "| judged group % |",
        "|---|---:|---|---:|---|---:|---:|---:|",
    ]
    for row in result["rows"]:
        versus = row.get("vs_plain")
        judge = row.get("judge")
        lines.append(
            "| "
            + " | ".join(
                [
                    row["setting"],
                    f"{100 * row['mean']:.1f}",
                    ", ".join(f"{100 * v:.1f}" for v in row["per_pipeline_seed"]),
                    f"{versus['difference_points']:+.1f}" if versus else "",
                    _interval(versus),
                    f"{versus['positive_seeds']}/{versus['seeds']}" if versus else "",
                    f"{100 * judge['fine']:.1f}" if judge else "",
                    f"{100 * judge['coarse']:.1f}" if judge else "",
                ]
            )
            + " |"
        )
    lines += ["", "## Comparisons", ""]
    for c in result["comparisons"]:
        lines.append(
            f"- {c['a']} vs {c['b']}: {c['difference_points']:+.1f} points ({_interval(c) or 'no interval'}; "
            f"positive in {c['positive_seeds']} of {c['seeds']} seeds): {c['reading']}"
        )
    if result["valuation_auroc"]:
        lines += ["", "## Does the utility see wrong-class images?", ""]
        lines.append(
            "AUROC of the utility for the judge's right-fine-class images against its wrong ones (0.5: blind)."
        )
        lines.append("")
        for pool, auroc in result["valuation_auroc"].items():
            per_seed = ", ".join(f"{v:.3f}" for v in auroc["per_pipeline_seed"])
            lines.append(f"- {pool}: {auroc['mean']:.3f} (per seed {per_seed})")
    if result.get("judged_pools"):
        lines += ["", "## What the judge sees in each pool", ""]
        lines.append("Share of each pool's images in their own fine class, mean over pipeline seeds (per seed).")
        lines.append("")
        for pool, share in result["judged_pools"].items():
            per_seed = ", ".join(f"{100 * v:.1f}" for v in share["per_pipeline_seed"])
            lines.append(f"- {pool}: {100 * share['mean']:.1f}% ({per_seed})")
    first_fits = {seed: attempts for seed, attempts in (result.get("valuation_first_fit") or {}).items() if attempts}
    if first_fits:
        lines += ["", "## TODV's first fit and the inversion guard", ""]
        lines.append(
            "Mislabel AUROC on the meta set of each attempt (below 0.5: inverted, refit from another seed); "
            "the kept one is marked."
        )
        lines.append("")
        for seed, attempts in first_fits.items():
            tried = ", ".join(f"{a['mislabel_auroc']}" + (" (kept)" if a.get("kept") else "") for a in attempts)
            lines.append(f"- seed {seed}: {tried}")
    refreshes = [(seed, r) for seed, rounds in (result.get("valuation_refresh") or {}).items() for r in rounds]
    if refreshes:
        lines += ["", "## The valuation refresh after each MLCO round", ""]
        lines.append("Mislabel AUROC on the meta set of the valuation in use and of the refit; adopted or kept.")
        lines.append("")
        for seed, r in refreshes:
            verdict = "adopted" if r["adopted"] else "kept the one in use"
            lines.append(
                f"- seed {seed}, round {r['round']}: in use {r['mislabel_auroc_in_use']}, "
                f"refit {r['mislabel_auroc_refreshed']}: {verdict}"
            )
    if result.get("ilpo"):
        lines += ["", "## What ILPO changed", ""]
        lines.append("Mean utility of the final pool's instances under the valuation ILPO climbs.")
        lines.append("")
        for seed, ilpo in result["ilpo"].items():
            lines.append(
                f"- seed {seed}: {ilpo['utility_before']:.3f} before, {ilpo['utility_after_prompt']:.3f} after the "
                f"prompt step ({ilpo['prompt_moved']} of {ilpo['instances']} prompts moved), "
                f"{ilpo['utility_after']:.3f} after the noise step"
            )
    seconds = result["stage_seconds_per_pipeline_seed"]
    lines += [
        "",
        f"Stage time per pipeline seed: {', '.join(f'{s / 60:.1f}' for s in seconds.values())} minutes "
        f"({result['machine'].get('processor', '?')}, {result['machine'].get('torch_threads', '?')} threads).",
    ]
    return "\n".join(lines) + "\n"


def _interval(difference: dict | None) -> str:
    if not difference or not difference.get("ci95_points"):
        return ""
    low, high = difference["ci95_points"]
    return f"{low:+.1f} to {high:+.1f}"
