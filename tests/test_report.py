"""The run report: files written, sections and notes, numbers and formats, determinism, all-or-nothing writes."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utilgen import report
from utilgen.comparison import comparisons
from utilgen.data import SyntheticPool

CLASSES = ("t-shirt/top", "trouser", "bag")
FULL_PLOTS = {
    "accuracy.png",
    "utility_histograms.png",
    "weight_curve.png",
    "dpo_curves.png",
    "samples_plain.png",
    "samples_utilgen.png",
    "samples_plain_vs_utilgen.png",
}


def _pool(
    n: int, channels: int = 1, round: int = 0, seed: int = 0, utilities: list[float] | None = None
) -> SyntheticPool:
    generator = torch.Generator().manual_seed(seed)
    pool = SyntheticPool.create(
        torch.rand(n, channels, 8, 8, generator=generator),
        torch.arange(n) % len(CLASSES),
        CLASSES,
        torch.arange(seed, seed + n),
        round=round,
        stage="initial" if round == 0 else "mlco",
    )
    return pool if utilities is None else pool.with_utilities(torch.tensor(utilities))


def _result(train_set: str, pool: str | None, accuracies: list[float], train_size: int) -> dict:
    return {
        "train_set": train_set,
        "pool": pool,
        "accuracies": accuracies,
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "train_size": train_size,
    }


ACCURACY = {
    "real-only": _result("real", None, [0.71, 0.70, 0.72], 48),
    "plain synthetic-only": _result("synthetic", "plain", [0.55, 0.56, 0.54], 240),
    "plain joint": _result("joint", "plain", [0.73, 0.72, 0.74], 288),
    "utilgen synthetic-only": _result("synthetic", "utilgen", [0.585, 0.59, 0.6], 240),
    "utilgen joint": _result("joint", "utilgen", [0.75, 0.74, 0.76], 288),
}


def _full_metrics() -> dict:
    return {
        "experiment": {"preset": "smoke", "data": "embedded fashion-mnist", "seeds": [0, 1, 2]},
        "accuracy": ACCURACY,
        "comparisons": comparisons(ACCURACY),
        "valuation": {
            "curve": {"loss": [0.0, 0.5, 1.0, 2.0, 3.0], "weight": [0.2, 0.6, 0.9, 0.5, 0.1]},
            "meta_loss": [1.5, 0.9],
            "mean_weight_real": [0.5, 0.62],
            "mean_weight_synthetic": [0.5, 0.41],
        },
        "mlco": [
            {
                "round": 1,
                "pairs": 12,
                "history": {"loss": [0.69, 0.6, 0.5], "implicit_acc": [0.5, 0.7, 0.8]},
                "implicit_accuracy_before": 0.5,
                "implicit_accuracy_after": 0.833,
                "mean_candidate_utility": 0.41,
            },
        ],
        "ilpo": {
            "utility_before": 0.40,
            "utility_after": 0.46,
            "instances": 9,
            "prompt_moved": 3,
            "moved_utility_before": 0.2,
            "moved_utility_after_prompt": 0.35,
        },
        "judge": {
            "plain": {"fine": 0.4, "coarse": 0.95, "images": 9, "per_class": {}},
            "utilgen": {"fine": 0.5, "coarse": 0.96, "images": 9, "per_class": {}},
        },
        "timings": {"generate": 12.0, "valuation": 90.0},
        "machine": {"cpu": "2 cores"},
    }


def _full_pools() -> dict[str, SyntheticPool]:
    return {
        "utilgen": _pool(9, channels=3, round=3, seed=4, utilities=[0.6] * 9),
        "plain": _pool(9, seed=3),  # never valued: all NaN
        "mlco-round-1": _pool(6, round=1, seed=1, utilities=[0.3, 0.4, 0.5, 0.2, 0.3, 0.4]),
        "pool0": _pool(6, seed=0, utilities=[0.1, 0.2, 0.3, math.nan, 0.2, 0.1]),
    }


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("full")
    report.write_report(run_dir, _full_metrics(), _full_pools())
    return run_dir


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_full_report_writes_every_plot_as_a_valid_png(full_run):
    text = (full_run / "report.md").read_text()
    written = {p.name for p in (full_run / "plots").iterdir()}
    assert written == FULL_PLOTS
    for name in FULL_PLOTS:
        with Image.open(full_run / "plots" / name) as image:
            assert image.format == "PNG"
            width, height = image.size
            image.verify()
        assert 300 <= width <= 3000, (name, width)
        assert 200 <= height <= 3000, (name, height)
    linked = set(re.findall(r"!\[[^\]]*\]\(plots/([^)]+)\)", text))
    assert linked == FULL_PLOTS  # every plot embedded, no dangling link
    assert "Skipped" not in text  # nothing missing in the full run


def test_full_report_sections_and_numbers(full_run):
    text = (full_run / "report.md").read_text()
    assert text.startswith("# UtilGen run report\n")
    assert "| preset | smoke |" in text
    assert "| seeds | 0, 1, 2 |" in text
    assert "| 1 | 12 | 50.0 → 83.3 | 0.410 |" in text  # MLCO table
    assert "Mean utility of the optimised instances: 0.400 → 0.460 (+0.060)." in text
    assert "| generate | 12.0 s | 11.8 |" in text
    assert "| valuation | 90.0 s (1.5 min) | 88.2 |" in text
    assert "| **total** | 102.0 s (1.7 min) | 100.0 |" in text
    assert "meta loss 1.500 → 0.900" in text
    assert "real 0.620, synthetic 0.410" in text
    assert "ln K = 1.10 (K = 3)" in text  # K inferred from the pools' class list
    # pool0 has one NaN: 5 of 6 valued, mean over the finite ones
    assert "| pool0 | 6 | 5 | 0.180 | 0.200 |" in text
    # sections appear in reading order
    headings = re.findall(r"^## (.+)$", text, flags=re.MULTILINE)
    assert headings == [
        "Experiment",
        "Test accuracy",
        "Synthetic utility",
        "What the pools show (the judge)",
        "Learned weight curve w(loss)",
        "MLCO (Diffusion-DPO rounds)",
        "ILPO (prompt and noise optimisation)",
        "Samples",
        "Stage timings",
        "Machine",
    ]


def test_accuracy_table_numbers_and_format():
    table = report.accuracy_table_markdown(ACCURACY)
    lines = table.splitlines()
    assert lines[0] == "| setting | train set | train size | accuracy % (mean ± std) | per seed % |"
    assert lines[1] == "|---|---|---:|---:|---:|"
    assert lines[2] == "| real-only | real | 48 | 71.0 ± 0.8 | 71.0, 70.0, 72.0 |"
    assert lines[5] == "| utilgen synthetic-only | synthetic only | 240 | 59.2 ± 0.6 | 58.5, 59.0, 60.0 |"
    assert lines[6] == "| utilgen joint | real + synthetic | 288 | 75.0 ± 0.8 | 75.0, 74.0, 76.0 |"
    assert len(lines) == 2 + len(ACCURACY)
    assert table.endswith("\n")


def test_accuracy_table_fills_in_and_marks_missing_values():
    table = report.accuracy_table_markdown(
        {
            "seeds only": {"train_set": "synthetic", "accuracies": [0.5, 0.6]},
            "nothing | here": {"train_set": "custom"},
        }
    )
    lines = table.splitlines()
    # mean and std (ddof=0) from the seeds when not recorded
    assert lines[2] == "| seeds only | synthetic only | — | 55.0 ± 5.0 | 50.0, 60.0 |"
    assert lines[3] == "| nothing \\| here | custom | — | — | — |"  # a "|" in a name must not split the cell


def test_comparisons_table_reads_each_interval(tmp_path):
    text = report.write_report(tmp_path, {"accuracy": ACCURACY}, {}).read_text()
    section = text.split("### Comparisons")[1].split("![")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in section.splitlines() if " − " in line}
    # utilgen 58.5, 59.0, 60.0 vs plain 55, 56, 54: differences +3.5, +3.0, +6.0 points: mean +4.2,
    # sd 1.61, t(2) = 4.303 -> 95% CI +0.2 to +8.2, above 0
    synthetic = rows["utilgen synthetic-only − plain synthetic-only"]
    assert "| +4.2 | +0.2 to +8.2 | higher |" in synthetic
    # utilgen joint 75, 74, 76 vs plain joint 73, 72, 74: +2 points on every seed, a zero-width interval
    assert "+2.0 to +2.0" in rows["utilgen joint − plain joint"]
    assert rows["utilgen joint − plain joint"].rstrip(" |").endswith("higher")
    assert "Paired by classifier seed" in section


def test_comparisons_given_in_metrics_are_used_as_given(tmp_path):
    given = [{"a": "x", "b": "y", "seeds": 1, "difference_points": -1.5, "ci95_points": None, "reading": "lower"}]
    text = report.write_report(tmp_path, {"accuracy": ACCURACY, "comparisons": given}, {}).read_text()
    section = text.split("### Comparisons")[1].split("![")[0]
    assert "| x − y | 1 | -1.5 | — | lower |" in section
    assert "utilgen joint" not in section


def test_missing_sections_are_skipped_with_a_note(tmp_path):
    path = report.write_report(tmp_path, {"accuracy": ACCURACY}, {})
    assert path == tmp_path / "report.md"
    text = path.read_text()
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"accuracy.png"}
    for note in (
        "_Skipped experiment summary: metrics has no `experiment` section._",
        "_Skipped utility histograms: no synthetic pools were given._",
        "_Skipped weight curve: metrics has no `valuation.curve`._",
        "_Skipped MLCO table and DPO curves: metrics has no `mlco` rounds._",
        "_Skipped ILPO:",
        "_Skipped sample grids:",
        "_Skipped stage timings: metrics has no `timings`._",
        "_Skipped machine description:",
    ):
        assert note in text
    assert "| real-only | real | 48 | 71.0 ± 0.8 |" in text


def test_partial_sections_skip_only_what_is_missing(tmp_path):
    metrics = {
        "accuracy": ACCURACY,
        "valuation": {"curve": {"loss": [0.1, 0.2], "weight": [0.5]}},  # damaged: lengths differ
        "mlco": [{"round": 1, "pairs": 4, "implicit_accuracy_before": 0.5}],  # a round without history
    }
    pools = {"pool0": _pool(6, utilities=[0.2] * 6)}  # no plain: pool0 stands in for the sample grid
    text = report.write_report(tmp_path, metrics, pools).read_text()
    assert "_Skipped weight curve: `valuation.curve` loss and weight differ in length._" in text
    assert "| 1 | 4 | 50.0 → — | — |" in text
    assert "_Skipped DPO curves: no MLCO round has a loss or implicit-accuracy history._" in text
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "accuracy.png",
        "utility_histograms.png",
        "samples_pool0.png",
    }


def test_unvalued_pools_are_left_out_of_the_histograms_in_order(tmp_path, monkeypatch):
    seen = []
    original = report._plot_utility_histograms

    def spy(valued):
        seen.extend(name for name, _, _ in valued)
        return original(valued)

    monkeypatch.setattr(report, "_plot_utility_histograms", spy)
    pools = {
        "utilgen": _pool(3, utilities=[0.9, 0.8, 0.7]),
        "plain": _pool(3),  # all NaN
        "mlco-round-10": _pool(3, round=10, utilities=[0.5] * 3),
        "mlco-round-2": _pool(3, round=2, utilities=[0.4] * 3),
        "pool0": _pool(3, utilities=[0.1, math.nan, 0.3]),
    }
    text = report.write_report(tmp_path, {"accuracy": ACCURACY}, pools).read_text()
    assert seen == ["pool0", "mlco-round-2", "mlco-round-10", "utilgen"]  # numeric round order, plain skipped
    assert "_Not in the histograms (no finite utility): `plain`._" in text
    assert "| plain | 3 | 0 | — | — |" in text
    assert "| pool0 | 3 | 2 | 0.200 | 0.200 |" in text


def test_no_valued_pool_skips_the_histograms(tmp_path):
    text = report.write_report(tmp_path, {"accuracy": ACCURACY}, {"plain": _pool(3)}).read_text()
    assert "_Skipped utility histograms: no pool has a finite utility._" in text
    assert not (tmp_path / "plots" / "utility_histograms.png").exists()


def test_grayscale_pools_render_gray_and_rgb_pools_in_colour(full_run):
    def colour_spread(name: str) -> int:
        with Image.open(full_run / "plots" / name) as image:
            pixels = np.asarray(image.convert("RGB")).astype(int)
        return int((pixels.max(axis=2) - pixels.min(axis=2)).max())

    assert colour_spread("samples_plain.png") == 0  # C=1: every pixel gray, text and background included
    assert colour_spread("samples_utilgen.png") > 50  # C=3: random colours survive


def test_writing_twice_gives_identical_files(full_run):
    before = _snapshot(full_run)
    report.write_report(full_run, _full_metrics(), _full_pools())
    assert _snapshot(full_run) == before


def test_a_failing_plot_leaves_the_previous_report_intact(full_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    before = _snapshot(run_dir)

    def broken(*args, **kwargs):
        raise RuntimeError("plot failed")

    # the last plot rendered: every other plot is already in memory when it fails, and none may be written
    monkeypatch.setattr(report, "_plot_samples_side_by_side", broken)
    changed = _full_metrics()
    changed["comparisons"] = []
    with pytest.raises(RuntimeError, match="plot failed"):
        report.write_report(run_dir, changed, _full_pools())
    assert _snapshot(run_dir) == before  # same files, same bytes, no temp files

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="plot failed"):
        report.write_report(fresh, changed, _full_pools())
    assert not fresh.exists() or not any(fresh.rglob("*"))


def test_plots_of_an_earlier_report_are_removed(full_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(full_run, run_dir)
    (run_dir / "plots" / "mine.png").write_bytes(b"not the report's")
    report.write_report(run_dir, {"accuracy": ACCURACY}, {})
    assert {p.name for p in (run_dir / "plots").iterdir()} == {"accuracy.png", "mine.png"}


def test_accuracy_is_required(tmp_path):
    for metrics in ({}, {"accuracy": {}}, {"accuracy": [0.7]}):
        with pytest.raises(ValueError, match="accuracy"):
            report.write_report(tmp_path, metrics, {})
    assert not (tmp_path / "report.md").exists()


def test_import_loads_neither_matplotlib_nor_torch():
    code = "import sys, utilgen.report; print([m for m in ('matplotlib', 'torch') if m in sys.modules])"
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_full_report_says_what_the_pools_show_and_how_many_instances_moved(full_run):
    text = (full_run / "report.md").read_text()
    assert "## What the pools show (the judge)" in text
    assert "| plain | 9 | 40.0 | 95.0 |" in text
    assert "The prompt ascent moved 3 of 9 instances; their utility with the class prompt 0.200" in text
