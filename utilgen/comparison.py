"""Paired comparisons of evaluated settings (standard library only: the report imports it without torch).

A comparison pairs two evaluated settings seed by seed: the classifier of seed s starts from the
same initialisation and draws from the same random stream in both, so the per-seed difference
removes much of the classifier's own seed-to-seed spread. Reported: the mean difference in accuracy points, the
per-seed differences and a 95% Student-t confidence interval over seeds (none with one
seed). An interval that contains 0 reads "within noise"; the report says so, not a win.
"""

from __future__ import annotations

import math
import statistics

# (a, b): "a minus b". Ablation pools are compared with plain generation when they were evaluated.
COMPARISONS = (
    ("utilgen synthetic-only", "plain synthetic-only"),
    ("utilgen joint", "plain joint"),
    ("utilgen joint", "real-only"),
    # The baselines (baselines.enabled): UtilGen against each, and the joint pool against real only given
    # the meta labels UtilGen reads.
    ("utilgen synthetic-only", "plain + filter synthetic-only"),
    ("utilgen synthetic-only", "datadream-style synthetic-only"),
    ("utilgen synthetic-only", "plain untrained-tokens synthetic-only"),
    ("utilgen joint", "real-only train+meta"),
)
ABLATION_SETTINGS = (
    "+mlco synthetic-only",
    "+prompt synthetic-only",
    "+noise synthetic-only",
    "+mlco+prompt synthetic-only",
)
# Re-denoising a noise samples it at a high guidance, which alone can help: the matched control is plain
# generation at that guidance (the ablation's "plain high-guidance" pool).
HIGH_GUIDANCE = "plain high-guidance synthetic-only"
CONTROLS = (("+noise synthetic-only", HIGH_GUIDANCE), ("utilgen synthetic-only", HIGH_GUIDANCE))

# Two-sided 95% quantiles of Student's t by degrees of freedom; between entries and beyond the last the
# smaller df is used (a slightly wider, conservative interval).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T95.update({12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980})


def t_quantile_95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with ``df`` >= 1 degrees of freedom (conservative between rows)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T95[max(d for d in _T95 if d <= df)]


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Per-seed accuracies of two settings (fractions, same seed order) -> their difference in points."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired comparison needs the same seeds on both sides, got {len(a)} and {len(b)}")
    differences = [100 * (x - y) for x, y in zip(a, b, strict=True)]
    mean = statistics.fmean(differences)
    interval = None
    if len(differences) > 1:
        half = t_quantile_95(len(differences) - 1) * statistics.stdev(differences) / math.sqrt(len(differences))
        interval = [mean - half, mean + half]
    if interval is None:
        reading = "one seed: no interval"
    elif interval[0] > 0:
        reading = "higher"
    elif interval[1] < 0:
        reading = "lower"
    else:
        reading = "within noise"
    return {
        "seeds": len(differences),
        "difference_points": mean,
        "per_seed_points": differences,
        "ci95_points": interval,
        "reading": reading,
    }


def comparisons(accuracy: dict) -> list[dict]:
    """Every comparison of ``COMPARISONS`` (and the ablation pools vs plain) whose two settings were evaluated."""
    ablation = (*ABLATION_SETTINGS, HIGH_GUIDANCE)
    pairs = [*COMPARISONS, *((name, "plain synthetic-only") for name in ablation), *CONTROLS]
    found = []
    for a, b in pairs:
        if a in accuracy and b in accuracy:
            found.append({"a": a, "b": b, **paired_difference(accuracy[a]["accuracies"], accuracy[b]["accuracies"])})
    return found


def comparison_line(comparison: dict) -> str:
    """One comparison as a sentence: "utilgen joint vs real-only: +1.2 points (95% CI -0.3 to +2.7; 3 seeds): ..."."""
    interval = comparison["ci95_points"]
    spread = f"95% CI {interval[0]:+.1f} to {interval[1]:+.1f}; " if interval else ""
    seeds = comparison["seeds"]
    return (
        f"{comparison['a']} vs {comparison['b']}: {comparison['difference_points']:+.1f} points "
        f"({spread}{seeds} seed{'s' if seeds != 1 else ''}): {comparison['reading']}"
    )
