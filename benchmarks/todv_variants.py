"""How TODV's meta-gradient variants value a pool: flipped-label AUROC and fit time per variant.

The task of ``tests/test_valuation_fit.py``: the embedded data's few-shot splits and a pool of 500 other
real images with 30% of the labels flipped to a wrong class. For each pipeline seed and each variant, one
``fit_valuation`` at the default ``ValuationConfig`` (only the variant's settings changed); the
utility should rank clean above flipped (AUROC 1.0; 0.5 is chance). All variants run in one process, so
the times are ratios on one machine.

    python benchmarks/todv_variants.py --seeds 0,1,2,3,4 --out benchmarks/results/todv-variants.json
    python benchmarks/todv_variants.py --variants unrolled-3-gn,unrolled-3-exact --out ...
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from utilgen.config import ValuationConfig
from utilgen.io import atomic_write_json
from utilgen.valuation import auroc, fit_valuation

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_valuation_fit import noisy_task  # the task the valuation tests use

VARIANTS = {  # name -> ValuationConfig overrides
    "directional": {"strategy": "directional"},
    "finite-difference": {"strategy": "finite_difference"},
    "finite-difference-reuse": {"strategy": "finite_difference", "real_step": "reuse_forward"},
    "finite-difference-lagged": {"strategy": "finite_difference", "real_step": "lagged"},
    "unrolled-3-exact": {"strategy": "unrolled_hvp", "lookahead_steps": 3},
    "unrolled-3-gn": {
        "strategy": "unrolled_hvp",
        "lookahead_steps": 3,
        "lookahead_hvp": "gauss_newton",
        "lookahead_tangent": "finite_difference",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--variants", default=",".join(list(VARIANTS)[:4]), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        splits, pool, flipped = noisy_task(seed=seed)
        for name in names:
            config = dataclasses.replace(ValuationConfig(), **VARIANTS[name])
            start = time.perf_counter()
            valuation = fit_valuation(splits.train, pool, splits.meta, config, seed=seed, progress=False)
            seconds = time.perf_counter() - start
            utilities = valuation.score(pool.images, pool.labels)
            rows.append(
                {
                    "seed": seed,
                    "variant": name,
                    "settings": VARIANTS[name],
                    "auroc_clean_vs_flipped": auroc(utilities[~flipped], utilities[flipped]),
                    "seconds": seconds,
                }
            )
            print(rows[-1], flush=True)
    summary = {}
    for name in names:
        mine = [r for r in rows if r["variant"] == name]
        summary[name] = {
            "auroc_mean": statistics.fmean(r["auroc_clean_vs_flipped"] for r in mine),
            "auroc_min": min(r["auroc_clean_vs_flipped"] for r in mine),
            "seconds_median": statistics.median(r["seconds"] for r in mine),
        }
    machine = {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    atomic_write_json(
        args.out,
        {"machine": machine, "config": dataclasses.asdict(ValuationConfig()), "rows": rows, "summary": summary},
    )
    for name, values in summary.items():
        print(
            f"{name:40s} AUROC {values['auroc_mean']:.3f} (min {values['auroc_min']:.3f}), "
            f"{values['seconds_median']:.1f} s"
        )


if __name__ == "__main__":
    main()
