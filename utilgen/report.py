"""The run report: ``<run>/report.md`` and the plots it embeds (layer 5).

``write_report(run_dir, metrics, pools)`` turns a run's metrics (the dict saved as
metrics.json) and its synthetic pools into ``<run>/plots/*.png`` and
``<run>/report.md``. ``accuracy_table_markdown`` renders the accuracy table on
its own (the README reuses it).

- All or nothing: every plot and the Markdown are rendered in memory before the
  first file is written, so a plot that raises leaves the previous report and its
  plots exactly as they were. Files go through ``utilgen.io`` (temp + fsync +
  rename), PNGs first and report.md last: a report.md on disk never links to a
  plot that was not written. Plots of ours that the new report no longer has are
  removed after, so plots/ matches report.md.
- Missing sections (no MLCO rounds, an unvalued pool, no timings, ...) are skipped
  with a note in the report; only ``metrics["accuracy"]`` is required.
- Deterministic: no timestamps in the text, PNGs saved without matplotlib's
  Software stamp (Agg writes no date), samples taken in pool order; the same
  inputs give the same bytes.
- matplotlib is imported inside the plotting functions and used through
  ``matplotlib.figure.Figure`` (its savefig renders PNG with Agg), never pyplot:
  importing this module loads neither matplotlib nor torch, and the global
  backend of the caller is never changed.

metrics (every section optional except "accuracy")::

    experiment  free-form key -> value (preset, data, shots_per_class, classifier, seeds, ...)
    accuracy    setting -> {"train_set": "real"|"synthetic"|"joint", "pool", "accuracies": [per seed],
                "mean", "std", "train_size"}, in display order
    comparisons [{"a", "b", "seeds", "difference_points", "per_seed_points", "ci95_points", "reading"}]
                (``utilgen.comparison``; computed from "accuracy" when absent)
    valuation   {"curve": {"loss": [...], "weight": [...]}, "meta_loss", "mean_weight_real", "mean_weight_synthetic"}
    mlco        [{"round", "pairs", "history": {"loss": [...], "implicit_acc": [...], ...},
                  "implicit_accuracy_before", "implicit_accuracy_after", "mean_candidate_utility"}]
    ilpo        {"utility_before", "utility_after"}
    timings     stage -> seconds
    machine     free-form
"""

from __future__ import annotations

import io
import json
import math
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from utilgen.comparison import comparisons
from utilgen.io import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from utilgen.data import SyntheticPool

REPORT_FILE = "report.md"
PLOTS_DIR = "plots"
DPI = 110
SAMPLES_PER_CLASS = 8
HISTOGRAM_BINS = 20
MISSING = "—"

# Plot files this module owns in plots/: only these are ever removed as stale.
_OWNED_PLOT = re.compile(r"^(accuracy|utility_histograms|weight_curve|dpo_curves|samples_[A-Za-z0-9_.-]+)\.png$")
_TRAIN_SETS = {"real": "real", "synthetic": "synthetic only", "joint": "real + synthetic"}
_GROUP_TITLES = {"synthetic": "synthetic-only", "joint": "joint (real + synthetic)"}
_FIXED_COLOURS = {"pool0": "#8c8c8c", "plain": "#4c72b0", "utilgen": "#dd8452"}
_OTHER_COLOURS = ("#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#ccb974", "#64b5cd")


@dataclass
class _Section:
    markdown: str
    plots: dict[str, bytes] = field(default_factory=dict)  # file name in plots/ -> PNG bytes


def write_report(run_dir: str | Path, metrics: Mapping[str, Any], pools: Mapping[str, SyntheticPool]) -> Path:
    """Write ``<run_dir>/plots/*.png`` and ``<run_dir>/report.md`` (atomically, via utilgen.io); return the report path.

    metrics: the run's metrics (module docstring); only ``metrics["accuracy"]`` is required.
    pools: name -> SyntheticPool; expected "pool0", "mlco-round-<r>", "plain", "utilgen"; any may be absent.
    Raises ValueError when metrics has no accuracy results; any plotting error propagates
    before a file is written.
    """
    accuracy = metrics.get("accuracy")
    if not isinstance(accuracy, Mapping) or not accuracy:
        raise ValueError(
            "metrics['accuracy'] must be a non-empty mapping of setting name -> result; the report needs it"
        )
    experiment = metrics.get("experiment") or {}
    pools = dict(pools)
    sections = [
        _title_section(experiment),
        _accuracy_section(accuracy, metrics.get("comparisons")),
        _utility_section(pools),
        _judge_section(metrics.get("judge")),
        _valuation_section(metrics.get("valuation"), _class_count(pools, experiment)),
        _mlco_section(metrics.get("mlco")),
        _ilpo_section(metrics.get("ilpo")),
        _samples_section(pools),
        _timings_section(metrics.get("timings")),
        _machine_section(metrics.get("machine")),
    ]
    plots = {name: data for section in sections for name, data in section.plots.items()}
    text = "\n\n".join(section.markdown.strip("\n") for section in sections) + "\n"
    return _write_outputs(Path(run_dir), text, plots)


def _write_outputs(run_dir: Path, text: str, plots: Mapping[str, bytes]) -> Path:
    plots_dir = run_dir / PLOTS_DIR
    for name, data in plots.items():
        atomic_write_bytes(plots_dir / name, data)
    report = atomic_write_text(run_dir / REPORT_FILE, text)  # last: it links to the plots above
    if plots_dir.is_dir():
        for path in plots_dir.glob("*.png"):
            if path.name not in plots and _OWNED_PLOT.match(path.name):
                path.unlink(missing_ok=True)  # from an earlier report of this run; nothing links to it now
    return report


# ---------------------------------------------------------------- sections


def _title_section(experiment: Mapping[str, Any]) -> _Section:
    lines = ["# UtilGen run report", "", "## Experiment", ""]
    if experiment:
        lines.append(_table(["setting", "value"], [[key, _plain_value(value)] for key, value in experiment.items()]))
    else:
        lines.append(_skipped("experiment summary", "metrics has no `experiment` section"))
    return _Section("\n".join(lines))


def _accuracy_section(
    accuracy: Mapping[str, Mapping[str, Any]], compared: Sequence[Mapping[str, Any]] | None
) -> _Section:
    lines = [
        "## Test accuracy",
        "",
        "Top-1 accuracy on the untouched test split, a fresh classifier per seed.",
        "",
        accuracy_table_markdown(accuracy).rstrip("\n"),
        "",
        "### Comparisons",
        "",
        _comparisons_markdown(accuracy, compared),
        "",
    ]
    plots = {}
    if any(_accuracy_stats(result)[0] is not None for result in accuracy.values()):
        plots["accuracy.png"] = _plot_accuracy(accuracy)
        lines.append(
            _figure(
                "Test accuracy per setting",
                "accuracy.png",
                "Bars: mean over seeds, whiskers ± std, dots: single seeds; dashed line: real-only. "
                "Look for UtilGen above plain in each group, and joint above the real-only line.",
            )
        )
    else:
        lines.append(_skipped("accuracy plot", "no setting has a mean or per-seed accuracy"))
    return _Section("\n".join(lines), plots)


def _comparisons_markdown(
    accuracy: Mapping[str, Mapping[str, Any]], compared: Sequence[Mapping[str, Any]] | None
) -> str:
    """Paired differences over seeds with their 95% intervals, read plainly (``utilgen.comparison``)."""
    if compared is None:
        try:
            compared = comparisons(accuracy)
        except (KeyError, ValueError):  # a setting without per-seed accuracies cannot be paired
            compared = []
    if not compared:
        return _skipped("comparisons", "no pair of compared settings has per-seed accuracies")
    rows = []
    for comparison in compared:
        interval = comparison.get("ci95_points")
        rows.append(
            [
                f"{comparison['a']} − {comparison['b']}",
                str(comparison["seeds"]),
                f"{comparison['difference_points']:+.1f}",
                f"{interval[0]:+.1f} to {interval[1]:+.1f}" if interval else MISSING,
                comparison["reading"],
            ]
        )
    header = ["comparison", "seeds", "difference (points)", "95% CI (points)", "reading"]
    note = (
        "Paired by classifier seed; the interval is Student's t over the per-seed differences. "
        '"within noise": the interval contains 0.'
    )
    return _table(header, rows, "lrrrl") + "\n\n" + note


def _utility_section(pools: Mapping[str, SyntheticPool]) -> _Section:
    lines = ["## Synthetic utility", ""]
    if not pools:
        lines.append(_skipped("utility histograms", "no synthetic pools were given"))
        return _Section("\n".join(lines))
    rows, valued, unvalued = [], [], []
    for name in _ordered_pool_names(pools):
        utilities = _to_numpy(pools[name].utilities).astype(np.float64)
        finite = utilities[np.isfinite(utilities)]
        rows.append(
            [
                name,
                str(len(utilities)),
                str(len(finite)),
                _number(finite.mean() if len(finite) else None),
                _number(np.median(finite) if len(finite) else None),
            ]
        )
        (valued if len(finite) else unvalued).append((name, finite, len(utilities)))
    lines.append(_table(["pool", "images", "valued", "mean utility", "median utility"], rows, "lrrrr"))
    lines.append("")
    if unvalued:
        names = ", ".join(f"`{name}`" for name, _, _ in unvalued)
        lines += [f"_Not in the histograms (no finite utility): {names}._", ""]
    if valued:
        lines.append(
            _figure(
                "Utility histograms per pool",
                "utility_histograms.png",
                "Utility W_phi(loss) of each valued image, shared bins on [0, 1], dashed line: mean. "
                "Look for the mass moving right from pool0 through the MLCO rounds to utilgen.",
            )
        )
        return _Section("\n".join(lines), {"utility_histograms.png": _plot_utility_histograms(valued)})
    lines.append(_skipped("utility histograms", "no pool has a finite utility"))
    return _Section("\n".join(lines))


def _valuation_section(valuation: Mapping[str, Any] | None, class_count: int | None) -> _Section:
    lines = ["## Learned weight curve w(loss)", ""]
    valuation = valuation or {}
    curve = valuation.get("curve") or {}
    loss, weight = _float_list(curve.get("loss")), _float_list(curve.get("weight"))
    summary = _valuation_summary(valuation)
    if summary:
        lines += [summary, ""]
    if not loss or len(loss) != len(weight):
        why = "metrics has no `valuation.curve`" if not loss else "`valuation.curve` loss and weight differ in length"
        lines.append(_skipped("weight curve", why))
        return _Section("\n".join(lines))
    ln_k = math.log(class_count) if class_count and class_count > 1 else None
    marker = f" Dotted line: ln K = {ln_k:.2f} (K = {class_count}), the loss of a uniform prediction." if ln_k else ""
    lines.append(
        _figure(
            "Learned weight curve",
            "weight_curve.png",
            "The TODV weight net's weight for each per-sample loss; the dot marks its peak, the loss level that "
            f"maximising utility pushes samples toward.{marker}",
        )
    )
    return _Section("\n".join(lines), {"weight_curve.png": _plot_weight_curve(loss, weight, ln_k, class_count)})


def _valuation_summary(valuation: Mapping[str, Any]) -> str:
    parts = []
    meta = _float_list(valuation.get("meta_loss"))
    if meta:
        parts.append(f"meta loss {meta[0]:.3f} → {meta[-1]:.3f} (first → last step)")
    real, synthetic = (
        _float_list(valuation.get("mean_weight_real")),
        _float_list(valuation.get("mean_weight_synthetic")),
    )
    if real and synthetic:
        parts.append(f"final mean weight real {real[-1]:.3f}, synthetic {synthetic[-1]:.3f}")
    return ("TODV: " + "; ".join(parts) + ".") if parts else ""


def _mlco_section(mlco: Sequence[Mapping[str, Any]] | None) -> _Section:
    lines = ["## MLCO (Diffusion-DPO rounds)", ""]
    if not mlco:
        lines.append(_skipped("MLCO table and DPO curves", "metrics has no `mlco` rounds"))
        return _Section("\n".join(lines))
    rows = []
    for entry in mlco:
        before, after = entry.get("implicit_accuracy_before"), entry.get("implicit_accuracy_after")
        utility = _number(entry.get("mean_candidate_utility"))
        rows.append(
            [
                str(entry.get("round", MISSING)),
                str(entry.get("pairs", MISSING)),
                f"{_percent(before)} → {_percent(after)}",
                utility,
            ]
        )
    lines += [
        _table(["round", "pairs", "implicit accuracy % before → after", "mean candidate utility"], rows, "rrrr"),
        "",
    ]
    curves = []
    for entry in mlco:
        history = entry.get("history") or {}
        loss, accuracy = _float_list(history.get("loss")), _float_list(history.get("implicit_acc"))
        if loss or accuracy:
            curves.append((entry.get("round", len(curves) + 1), loss, accuracy))
    if not curves:
        lines.append(_skipped("DPO curves", "no MLCO round has a loss or implicit-accuracy history"))
        return _Section("\n".join(lines))
    lines.append(
        _figure(
            "DPO loss and implicit accuracy per round",
            "dpo_curves.png",
            "Left: Diffusion-DPO loss per step (it starts at ln 2 with the adapter off); right: implicit accuracy, "
            "the share of pairs the tuned model prefers the right way (50% = chance). Look for loss below ln 2 "
            "and accuracy above 50%.",
        )
    )
    return _Section("\n".join(lines), {"dpo_curves.png": _plot_dpo_curves(curves)})


def _ilpo_section(ilpo: Mapping[str, Any] | None) -> _Section:
    lines = ["## ILPO (prompt and noise optimisation)", ""]
    before, after = (ilpo or {}).get("utility_before"), (ilpo or {}).get("utility_after")
    if not (_finite(before) and _finite(after)):
        lines.append(_skipped("ILPO", "metrics has no `ilpo.utility_before` and `ilpo.utility_after`"))
    else:
        lines.append(f"Mean utility of the optimised instances: {before:.3f} → {after:.3f} ({after - before:+.3f}).")
        moved, count = (ilpo or {}).get("prompt_moved"), (ilpo or {}).get("instances")
        if moved is not None and count:
            lines.append(
                f"The prompt ascent moved {moved} of {count} instances"
                + (
                    f"; their utility with the class prompt {ilpo['moved_utility_before']:.3f}, at the optimised "
                    f"prompt {ilpo['moved_utility_after_prompt']:.3f}."
                    if moved and _finite(ilpo.get("moved_utility_before"))
                    else "."
                )
            )
    return _Section("\n".join(lines))


def _judge_section(judged: Mapping[str, Any] | None) -> _Section:
    lines = ["## What the pools show (the judge)", ""]
    if not judged:
        lines.append(_skipped("the judge", "it reads Fashion-MNIST's ten classes only"))
        return _Section("\n".join(lines))
    lines += [
        "A fine-label classifier trained on the Fashion-MNIST train file (less the validation set), never read",
        "by the method, says which share of each pool shows its own class, and its class's group",
        "(tops, footwear, other). Utility AUROC: how well the pool's utilities separate the images in their own",
        "class from the others (0.5: not at all; blank: the pool holds no utilities).",
        "",
        _table(
            ["pool", "images", "right class %", "right group %", "utility AUROC"],
            [
                [name, str(v["images"]), _percent(v["fine"]), _percent(v["coarse"]), _auroc(v.get("utility_auroc"))]
                for name, v in judged.items()
            ],
            "lrrrr",
        ),
    ]
    return _Section("\n".join(lines))


def _auroc(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _samples_section(pools: Mapping[str, SyntheticPool]) -> _Section:
    lines = ["## Samples", ""]
    names = [name for name in ("plain", "utilgen") if name in pools]
    if "plain" not in pools and "pool0" in pools:
        names.insert(0, "pool0")  # the un-tuned generator's images stand in for the plain baseline
    names = [name for name in names if len(pools[name])]
    if not names:
        lines.append(_skipped("sample grids", "no non-empty `plain`, `pool0` or `utilgen` pool"))
        return _Section("\n".join(lines))
    how = f"One row per class, the first {SAMPLES_PER_CLASS} images of each class in pool order (not picked)."
    plots = {}
    for name in names:
        plots[f"samples_{name}.png"] = _plot_samples(name, pools[name])
        lines += [_figure(f"Samples from {name}", f"samples_{name}.png", f"`{name}`. {how}"), ""]
    if "plain" in names and "utilgen" in names:
        if pools["plain"].class_names == pools["utilgen"].class_names:
            plots["samples_plain_vs_utilgen.png"] = _plot_samples_side_by_side(pools["plain"], pools["utilgen"])
            lines.append(
                _figure(
                    "Plain vs UtilGen samples",
                    "samples_plain_vs_utilgen.png",
                    f"Left plain, right UtilGen, same class per row. {how} Look for images that carry more of "
                    "the class's distinguishing detail on the right.",
                )
            )
        else:
            lines.append(_skipped("plain vs UtilGen grid", "the two pools have different class lists"))
    return _Section("\n".join(lines), plots)


def _timings_section(timings: Mapping[str, Any] | None) -> _Section:
    lines = ["## Stage timings", ""]
    seconds = {stage: float(value) for stage, value in (timings or {}).items() if _finite(value)}
    if not seconds:
        lines.append(_skipped("stage timings", "metrics has no `timings`"))
        return _Section("\n".join(lines))
    total = sum(seconds.values())
    rows = [
        [stage, _duration(value), _percent(value / total if total > 0 else None)] for stage, value in seconds.items()
    ]
    rows.append(["**total**", _duration(total), "100.0" if total > 0 else MISSING])
    lines.append(_table(["stage", "time", "share %"], rows, "lrr"))
    return _Section("\n".join(lines))


def _machine_section(machine: Mapping[str, Any] | None) -> _Section:
    lines = ["## Machine", ""]
    if machine:
        lines.append(_table(["property", "value"], [[key, _plain_value(value)] for key, value in machine.items()]))
    else:
        lines.append(_skipped("machine description", "metrics has no `machine` section"))
    return _Section("\n".join(lines))


# ---------------------------------------------------------------- Markdown


def accuracy_table_markdown(accuracy: Mapping[str, Mapping[str, Any]]) -> str:
    """The accuracy table in Markdown: setting | train set | train size | mean ± std | per seed, in percent.

    accuracy: setting -> {"train_set", "accuracies" (fractions, one per seed), "mean", "std", "train_size"};
    a missing mean or std is computed from the per-seed accuracies (std over seeds, ddof=0).
    Rows keep the mapping's order; missing values read "—". Ends with a newline.
    """
    rows = []
    for setting, result in accuracy.items():
        mean, std, per_seed = _accuracy_stats(result)
        if mean is None:
            summary = MISSING
        else:
            summary = f"{_percent(mean)} ± {_percent(std)}" if std is not None else _percent(mean)
        train_set = result.get("train_set")
        size = result.get("train_size")
        rows.append(
            [
                setting,
                _TRAIN_SETS.get(train_set, train_set or MISSING),
                str(int(size)) if _finite(size) else MISSING,
                summary,
                ", ".join(_percent(value) for value in per_seed) or MISSING,
            ]
        )
    header = ["setting", "train set", "train size", "accuracy % (mean ± std)", "per seed %"]
    return _table(header, rows, "llrrr") + "\n"


def _accuracy_stats(result: Mapping[str, Any]) -> tuple[float | None, float | None, list[float]]:
    """(mean, std, per-seed accuracies) as fractions; mean/std from the seeds when not recorded."""
    per_seed = [value for value in _float_list(result.get("accuracies")) if math.isfinite(value)]
    mean, std = result.get("mean"), result.get("std")
    mean = float(mean) if _finite(mean) else (float(np.mean(per_seed)) if per_seed else None)
    std = float(std) if _finite(std) else (float(np.std(per_seed)) if per_seed else None)
    return mean, std, per_seed


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table; align: one of "l"/"r" per column (default all left)."""
    align = align or "l" * len(header)
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", rule]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")  # a raw "|" would split the cell


def _figure(alt: str, name: str, caption: str) -> str:
    return f"![{alt}]({PLOTS_DIR}/{name})\n\n_{caption}_"


def _skipped(what: str, why: str) -> str:
    return f"_Skipped {what}: {why}._"


def _plain_value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _percent(value: object) -> str:
    return f"{100 * float(value):.1f}" if _finite(value) else MISSING


def _number(value: object, digits: int = 3) -> str:
    return f"{float(value):.{digits}f}" if _finite(value) else MISSING


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds:.1f} s ({seconds / 60:.1f} min)"


def _finite(value: object) -> bool:
    # bool is an int, but a True "accuracy" is a bug upstream, not a number to print
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        return False
    return math.isfinite(float(value))


def _float_list(values: object) -> list[float]:
    if not isinstance(values, (list, tuple, np.ndarray)):
        return []
    return [float(value) if _finite(value) else math.nan for value in values]


# ---------------------------------------------------------------- pools


def _ordered_pool_names(pools: Mapping[str, SyntheticPool]) -> list[str]:
    """pool0, mlco-round-1..R (numerically), plain, utilgen, then any others by name."""

    def key(name: str) -> tuple[int, int, str]:
        if name == "pool0":
            return (0, 0, name)
        match = re.fullmatch(r"mlco-round-(\d+)", name)
        if match:
            return (1, int(match.group(1)), name)
        return {"plain": (2, 0, name), "utilgen": (3, 0, name)}.get(name, (4, 0, name))

    return sorted(pools, key=key)


def _class_count(pools: Mapping[str, SyntheticPool], experiment: Mapping[str, Any]) -> int | None:
    """K, for the ln K marker: from any pool's class list, else the experiment's num_classes / class_names."""
    if pools:
        return len(next(iter(pools.values())).class_names)
    if _finite(experiment.get("num_classes")):
        return int(experiment["num_classes"])
    names = experiment.get("class_names")
    return len(names) if isinstance(names, (list, tuple)) and names else None


def _to_numpy(tensor: Any) -> np.ndarray:
    # pools hold torch tensors; going through their methods keeps torch out of this module's imports
    return tensor.detach().cpu().numpy() if hasattr(tensor, "detach") else np.asarray(tensor)


def _pool_colour(name: str | None, position: int) -> str:
    return _FIXED_COLOURS.get(name or "", _OTHER_COLOURS[position % len(_OTHER_COLOURS)])


def _class_rows(pool: SyntheticPool, per_class: int) -> list[np.ndarray]:
    """Per class k, the first ``per_class`` images of label k in pool order, as (n_k, H, W, 3) float in [0, 1]."""
    labels = _to_numpy(pool.labels)
    rows = []
    for k in range(len(pool.class_names)):
        index = np.flatnonzero(labels == k)[:per_class]
        images = _to_numpy(pool.images[index.tolist()]) if len(index) else np.zeros((0, *pool.images.shape[1:]))
        images = np.transpose(images, (0, 2, 3, 1)).astype(np.float32)  # (n_k, H, W, C)
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)  # grayscale as equal RGB channels: one imshow path
        rows.append(np.clip(images, 0.0, 1.0))
    return rows


def _montage(rows: Sequence[np.ndarray], columns: int, height: int, width: int, pad: int) -> np.ndarray:
    """(K*(H+pad)-pad, columns*(W+pad)-pad, 3) canvas: row k holds rows[k], white between cells and in empty ones."""
    canvas = np.ones((len(rows) * (height + pad) - pad, columns * (width + pad) - pad, 3), dtype=np.float32)
    for r, images in enumerate(rows):
        for c, image in enumerate(images[:columns]):
            top, left = r * (height + pad), c * (width + pad)
            canvas[top : top + height, left : left + width] = image
    return canvas


# ---------------------------------------------------------------- plots (data -> PNG bytes)


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure  # lazy: `import utilgen.report` stays cheap

    return Figure(figsize=(width, height), layout="constrained")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    # Software=None drops matplotlib's version stamp; Agg PNGs carry no date, so the bytes repeat.
    # bbox "tight" grows or trims the canvas to what was drawn: constrained layout alone clipped
    # long class names left of the fixed-aspect sample grids.
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.1)
    return buffer.getvalue()


def _plot_accuracy(accuracy: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Bars per non-real setting, grouped by train set; real-only settings as reference lines."""
    stats = {name: _accuracy_stats(result) for name, result in accuracy.items()}
    groups: dict[str, list[str]] = {}
    for name, result in accuracy.items():
        if result.get("train_set") != "real" and stats[name][0] is not None:
            groups.setdefault(result.get("train_set") or "other", []).append(name)
    order = sorted(groups, key=lambda g: {"synthetic": 0, "joint": 1}.get(g, 2))  # stable: others keep their order
    bar_count = sum(len(names) for names in groups.values())
    figure = _new_figure(max(5.0, 1.8 + 1.0 * bar_count), 4.4)
    axes = figure.add_subplot()
    pool_positions = {}
    ticks, labels, x = [], [], 0.0
    for position, group in enumerate(order):
        start = x
        for name in groups[group]:
            mean, std, per_seed = stats[name]
            pool = accuracy[name].get("pool")
            colour = _pool_colour(pool, pool_positions.setdefault(pool, len(pool_positions)))
            axes.bar(x, 100 * mean, width=0.75, color=colour, yerr=None if std is None else 100 * std, capsize=4)
            if per_seed:
                offsets = np.linspace(-0.15, 0.15, len(per_seed)) if len(per_seed) > 1 else np.zeros(1)
                axes.scatter(x + offsets, 100 * np.asarray(per_seed), s=12, color="black", zorder=3)
            ticks.append(x)
            labels.append(textwrap.fill(_bar_label(name, group), 14))
            x += 1.0
        axes.text(
            (start + x - 1.0) / 2,
            1.01,
            _GROUP_TITLES.get(group, group),
            transform=axes.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontweight="bold",
        )
        if position < len(order) - 1:
            axes.axvline(x - 0.25, color="#bbbbbb", linewidth=1)
            x += 0.5  # a gap marks the group boundary
    # one line style per real-only setting (three at most; there is normally one)
    real_only = [name for name, result in accuracy.items() if result.get("train_set") == "real"]
    for style, name in zip(("--", "-.", ":"), real_only, strict=False):
        mean, std, _ = stats[name]
        if mean is None:
            continue
        axes.axhline(100 * mean, color="black", linestyle=style, linewidth=1.2, label=f"{name}: {_percent(mean)}%")
        if std:
            axes.axhspan(100 * (mean - std), 100 * (mean + std), color="black", alpha=0.08, linewidth=0)
    axes.set_xticks(ticks, labels)
    if not ticks:
        axes.set_xlim(-0.5, 0.5)
    top = max(
        [100 * (m + (s or 0)) for m, s, _ in stats.values() if m is not None]
        + [100 * v for _, _, seeds in stats.values() for v in seeds]
    )
    axes.set_ylim(0, min(100.0, top * 1.08 + 2))
    axes.set_ylabel("test accuracy (%)")
    axes.grid(axis="y", alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        figure.legend(loc="outside lower center", frameon=False)
    return _png(figure)


def _bar_label(setting: str, group: str) -> str:
    # "utilgen synthetic-only" under the "synthetic-only" group reads "utilgen"
    for suffix in (" synthetic-only", " joint") if group in ("synthetic", "joint") else ():
        if setting.endswith(suffix):
            return setting[: -len(suffix)]
    return setting


def _plot_utility_histograms(valued: Sequence[tuple[str, np.ndarray, int]]) -> bytes:
    """One panel per (pool name, finite utilities, pool size), shared bins on [0, 1], mean dashed."""
    edges = np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1)
    figure = _new_figure(6.5, 0.9 + 1.35 * len(valued))
    panels = figure.subplots(len(valued), 1, sharex=True, squeeze=False)[:, 0]
    for position, (axes, (name, values, total)) in enumerate(zip(panels, valued, strict=True)):
        outside = int(np.sum((values < 0) | (values > 1)))
        # clipped into the end bins so an out-of-range value is still counted (and said so in the title)
        axes.hist(np.clip(values, 0.0, 1.0), bins=edges, color=_pool_colour(name, position))
        mean = float(values.mean())
        axes.axvline(mean, color="black", linestyle="--", linewidth=1.2)
        note = f", {outside} outside [0, 1] clipped" if outside else ""
        axes.set_title(f"{name}: {len(values)} of {total} valued, mean {mean:.3f}{note}", loc="left", fontsize=9)
        axes.set_ylabel("images")
    panels[-1].set_xlim(0.0, 1.0)
    panels[-1].set_xlabel("utility W_phi(loss)")
    return _png(figure)


def _plot_weight_curve(loss: list[float], weight: list[float], ln_k: float | None, class_count: int | None) -> bytes:
    """w(loss) as a line, its peak as a dot, ln K dotted when the class count is known."""
    loss_array, weight_array = np.asarray(loss), np.asarray(weight)
    order = np.argsort(loss_array, kind="stable")
    figure = _new_figure(6.0, 3.8)
    axes = figure.add_subplot()
    axes.plot(loss_array[order], weight_array[order], color="#4c72b0", linewidth=1.8, label="w(loss)")
    if np.isfinite(weight_array).any():
        peak = int(np.nanargmax(weight_array))
        axes.scatter(
            [loss_array[peak]],
            [weight_array[peak]],
            color="#c44e52",
            zorder=3,
            label=f"peak w = {weight_array[peak]:.3f} at loss {loss_array[peak]:.2f}",
        )
    if ln_k is not None:
        axes.axvline(ln_k, color="black", linestyle=":", linewidth=1.2, label=f"ln K = {ln_k:.2f} (K = {class_count})")
    axes.set_xlabel("per-sample loss")
    axes.set_ylabel("weight w")
    axes.grid(alpha=0.3)
    axes.legend(frameon=False, fontsize=9)
    return _png(figure)


def _plot_dpo_curves(curves: Sequence[tuple[Any, list[float], list[float]]]) -> bytes:
    """Two panels over steps, one line per round: DPO loss (ln 2 dotted) and implicit accuracy % (50% dotted)."""
    figure = _new_figure(10.0, 3.8)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for position, (round_index, loss, accuracy) in enumerate(curves):
        colour = _OTHER_COLOURS[position % len(_OTHER_COLOURS)]
        if loss:
            loss_axes.plot(np.arange(len(loss)), loss, color=colour, label=f"round {round_index}")
        if accuracy:
            accuracy_axes.plot(
                np.arange(len(accuracy)), 100 * np.asarray(accuracy), color=colour, label=f"round {round_index}"
            )
    loss_axes.axhline(math.log(2), color="black", linestyle=":", linewidth=1, label="ln 2")
    accuracy_axes.axhline(50, color="black", linestyle=":", linewidth=1, label="chance")
    for axes, title, ylabel in ((loss_axes, "DPO loss", "loss"), (accuracy_axes, "implicit accuracy", "%")):
        axes.set_title(title, loc="left", fontsize=10)
        axes.set_xlabel("step")
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(frameon=False, fontsize=8)
    return _png(figure)


_CELL_INCHES = 0.55
_PAD = 2


def _plot_samples(name: str, pool: SyntheticPool) -> bytes:
    """One row per class (class name as row label), up to SAMPLES_PER_CLASS images per row."""
    rows, columns, height, width = _grid_geometry(pool)
    figure = _new_figure(1.3 + columns * _CELL_INCHES * width / height, 0.6 + len(rows) * _CELL_INCHES)
    axes = figure.add_subplot()
    _draw_grid(axes, _montage(rows, columns, height, width, _PAD), pool.class_names, height, show_labels=True)
    axes.set_title(f"{name}: first {columns} per class", loc="left", fontsize=10)
    return _png(figure)


def _plot_samples_side_by_side(plain: SyntheticPool, utilgen: SyntheticPool) -> bytes:
    """Left plain, right utilgen, rows = the shared classes."""
    left, right = _grid_geometry(plain), _grid_geometry(utilgen)
    widths = [geometry[1] * geometry[3] / geometry[2] for geometry in (left, right)]  # columns * aspect
    figure = _new_figure(1.3 + sum(widths) * _CELL_INCHES + 0.3, 0.6 + len(left[0]) * _CELL_INCHES)
    panels = figure.subplots(1, 2, width_ratios=widths)
    for axes, (rows, columns, height, width), title, show in zip(
        panels, (left, right), ("plain", "utilgen"), (True, False), strict=True
    ):
        _draw_grid(axes, _montage(rows, columns, height, width, _PAD), plain.class_names, height, show_labels=show)
        axes.set_title(title, loc="left", fontsize=10)
    return _png(figure)


def _grid_geometry(pool: SyntheticPool) -> tuple[list[np.ndarray], int, int, int]:
    rows = _class_rows(pool, SAMPLES_PER_CLASS)
    columns = max(1, max(len(images) for images in rows))
    _, _, height, width = pool.images.shape
    return rows, columns, int(height), int(width)


def _draw_grid(axes: Axes, canvas: np.ndarray, class_names: Sequence[str], height: int, show_labels: bool) -> None:
    # nearest when pixels are enlarged (crisp small images), antialiased when large images are shrunk
    enlarged = _CELL_INCHES * DPI >= height
    axes.imshow(canvas, vmin=0.0, vmax=1.0, interpolation="nearest" if enlarged else "antialiased")
    centres = [k * (height + _PAD) + (height - 1) / 2 for k in range(len(class_names))]
    axes.set_yticks(centres, list(class_names) if show_labels else [""] * len(centres))
    axes.set_xticks([])
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
