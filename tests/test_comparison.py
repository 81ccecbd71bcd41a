"""Paired comparisons over seeds (utilgen.comparison): the numbers the report and the CLI state."""

from __future__ import annotations

import math
import statistics

import pytest

from utilgen.comparison import comparison_line, comparisons, paired_difference, t_quantile_95


def test_t_quantiles_match_the_table_and_stay_conservative_between_rows():
    assert t_quantile_95(1) == pytest.approx(12.706)
    assert t_quantile_95(4) == pytest.approx(2.776)
    assert t_quantile_95(13) == pytest.approx(2.179)  # between the rows for 12 and 15: the wider 12
    assert t_quantile_95(1000) == pytest.approx(1.980)  # beyond the table: its last (widest) row
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_95(0)


def test_paired_difference_mean_interval_and_reading():
    plain = [0.60, 0.62, 0.58, 0.61, 0.59]
    utilgen = [0.61, 0.61, 0.60, 0.60, 0.61]  # differences +1, -1, +2, -1, +2 points
    result = paired_difference(utilgen, plain)
    differences = [1.0, -1.0, 2.0, -1.0, 2.0]
    assert result["per_seed_points"] == pytest.approx(differences)
    assert result["difference_points"] == pytest.approx(0.6)
    half = 2.776 * statistics.stdev(differences) / math.sqrt(5)
    assert result["ci95_points"] == pytest.approx([0.6 - half, 0.6 + half])
    assert result["reading"] == "within noise"
    assert paired_difference([0.5, 0.52, 0.51], [0.6, 0.61, 0.6])["reading"] == "lower"


def test_one_seed_has_no_interval_and_unpaired_seeds_are_refused():
    single = paired_difference([0.7], [0.6])
    assert single["ci95_points"] is None
    assert single["reading"] == "one seed: no interval"
    assert comparison_line({"a": "u", "b": "p", **single}) == "u vs p: +10.0 points (1 seed): one seed: no interval"
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.7, 0.6], [0.6])


def test_comparisons_cover_the_evaluated_settings_only():
    accuracy = {
        "real-only": {"accuracies": [0.5, 0.5]},
        "plain synthetic-only": {"accuracies": [0.4, 0.42]},
        "utilgen synthetic-only": {"accuracies": [0.45, 0.43]},
        "+prompt synthetic-only": {"accuracies": [0.41, 0.44]},
    }
    found = [(c["a"], c["b"]) for c in comparisons(accuracy)]
    assert found == [
        ("utilgen synthetic-only", "plain synthetic-only"),
        ("+prompt synthetic-only", "plain synthetic-only"),
    ]
