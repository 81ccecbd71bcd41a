"""``metrics.json``: what a run reports, assembled from its run directory (layer 5).

Besides the experiment, the accuracies and each stage's record, it holds the paired
comparisons of ``utilgen.comparison`` (UtilGen vs plain generation and vs real only).
"""

from __future__ import annotations

import hashlib
import json
import platform

import torch

from utilgen.comparison import comparisons
from utilgen.config import Config
from utilgen.data import Splits
from utilgen.data.splits import image_digests
from utilgen.rundir import RunDirectory
from utilgen.stage_outputs import count_test_reads


def collect_metrics(
    cfg: Config, directory: RunDirectory, real: Splits, results: dict, device: torch.device, judged: dict | None
) -> dict:
    """The content of ``metrics.json``: the experiment, accuracies, comparisons, each stage's record, the
    judge's verdicts on each pool (Fashion-MNIST tasks; None otherwise), the machine."""
    path = directory.path
    valuation = json.loads((path / "valuation/history.json").read_text())
    rounds = [json.loads((path / f"mlco/round-{r}/round.json").read_text()) for r in range(1, cfg.mlco.rounds + 1)]
    return {
        "experiment": {
            "preset": cfg.preset,
            "data": cfg.data.source,
            "generator": cfg.generator.kind,
            **({"embedded_weights": cfg.generator.embedded_weights} if cfg.generator.kind == "embedded" else {}),
            "classes": len(real.class_names),
            "shots_per_class": cfg.data.shots_per_class,
            "meta_per_class": cfg.data.meta_per_class,
            "test_images": len(real.test.labels),
            # The test split's identity and how often it was read (one read per classifier scored on it):
            # a result is comparable with another only on the same split, and tuning never reads it.
            "test_split_sha256": hashlib.sha256("".join(image_digests(real.test)).encode()).hexdigest(),
            "test_reads": count_test_reads(directory, results),
            "synthetic_per_class": cfg.final_per_class(),
            "mlco_rounds": cfg.mlco.rounds,
            "classifier": cfg.evaluation.classifier,
            "seeds": list(cfg.evaluation.seeds),
            "sampler_steps": cfg.generator.steps,
            "guidance_scale": cfg.generator.guidance_scale,
        },
        "accuracy": results,
        "comparisons": comparisons(results),
        "valuation": {k: valuation[k] for k in ("curve", "meta_loss", "mean_weight_real", "mean_weight_synthetic")},
        "mlco": rounds,
        "ilpo": json.loads((path / "ilpo.json").read_text()),
        "judge": judged,
        "timings": directory.seconds(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
