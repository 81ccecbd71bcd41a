"""How deep ILPO's prompt gradient should reach: 1, 2 or 3 kept denoiser calls (``ilpo.grad_steps``).

Prompt ascent alone (no noise step) on the first ``--instances`` of a finished run's final (label, seed) list,
with the run's generator (tokens and MLCO rounds replayed) and the valuation ILPO climbs. For each depth:
the mean utility before and after the ascent, the judge's fine-class share of the images, and the seconds,
all measured in one process so the times are ratios on the same machine.

    python benchmarks/prompt_gradient_depth.py RUN_DIR --out benchmarks/results/ilpo-prompt-gradient-depth.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from utilgen import stage_outputs as outputs
from utilgen.adaptation import optimise_instances
from utilgen.config import config_from_dict
from utilgen.data import load_split_indices, resize_images, splits_from_indices
from utilgen.generator import build_generator
from utilgen.io import atomic_write_json
from utilgen.judge import load_judge
from utilgen.loop import instance_list
from utilgen.preflight import load_task_data
from utilgen.rundir import RunDirectory
from utilgen.valuation import Valuation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run directory (python -m utilgen.run --out ...)")
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--depths", default="1,2,3")
    parser.add_argument("--prompt-lr", type=float, default=None, help="ilpo.prompt_lr (default: the run's)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    directory = RunDirectory.open(args.run)
    cfg = config_from_dict(directory.read_config())
    real = splits_from_indices(load_task_data(cfg), load_split_indices(args.run / "splits.json"))
    generator = build_generator(cfg.generator, real.class_names, torch.device("cpu"))
    generator.set_class_tokens(outputs.load_tokens(directory, generator.device))
    for round_index in range(1, cfg.mlco.rounds + 1):
        outputs.replay_round(generator, cfg.mlco, round_index, directory, seed=cfg.run.seed)
    last = args.run / f"mlco/round-{cfg.mlco.rounds}/valuation"
    valuation = Valuation.load(last if cfg.mlco.refresh_valuation and last.exists() else args.run / "valuation")
    labels, seeds = instance_list(len(real.class_names), cfg.final_per_class(), cfg.run.seed, "final")
    step = max(1, len(labels) // args.instances)  # every class: a spread over the class-major list
    labels, seeds = labels[::step][: args.instances], seeds[::step][: args.instances]
    judge = load_judge()
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        config = dataclasses.replace(cfg.ilpo, noise_strategy="none", grad_steps=depth, repair_quantile=None)
        if args.prompt_lr is not None:
            config = dataclasses.replace(config, prompt_lr=args.prompt_lr)
        torch.manual_seed(0)
        start = time.perf_counter()
        pool, history = optimise_instances(
            generator, valuation, labels, seeds, config, sampler=cfg.generator, progress=False
        )
        seconds = time.perf_counter() - start
        images = resize_images(pool.images, real.train.images.shape[-1])
        summary = outputs.ilpo_summary(history, pool)
        rows.append(
            {
                "grad_steps": depth,
                "prompt_lr": config.prompt_lr,
                "seconds": round(seconds, 1),
                "utility_before": summary["utility_before"],
                "utility_after_prompt": summary["utility_after_prompt"],
                "prompt_moved": summary["prompt_moved"],
                "judged_fine": judge.verdicts(images, pool.labels)["fine"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    atomic_write_json(
        args.out,
        {
            "run": str(args.run),
            "instances": len(labels),
            "sampler_steps": cfg.generator.steps,
            "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
