"""Final evaluation (docs/method.md, "Evaluation"): fresh classifiers on each training set, top-1 on the test split.

Every setting (real only; a synthetic pool alone; real joint with a pool) trains the same
recipe from the same seeds: ``EvaluationConfig`` (architecture, SGD steps, batch, lr, the
optional shift/flip augmentation). A setting's seeds differ only in the classifier's
initialisation and batch order, so the spread over seeds is the recipe's own noise, the
yardstick any gap between settings has to clear.

Results are checkpointed after every (setting, seed): a killed evaluation resumes at the
first classifier it had not finished, and the numbers are those of an uninterrupted run
(each training seeds its own generators and depends on nothing else).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utilgen.config import EvaluationConfig
from utilgen.data import LabelledImages, resize_images
from utilgen.io import atomic_write_json
from utilgen.models import build_classifier

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """A classifier's training loss became NaN or infinite."""


@dataclass(frozen=True)
class TrainingSet:
    """One evaluation setting: the images a classifier trains on, and how to describe them."""

    name: str  # e.g. "utilgen synthetic-only"
    data: LabelledImages
    train_set: str  # "real", "synthetic" or "joint"
    pool: str | None  # the synthetic pool's name, None for real only


def joint(real: LabelledImages, synthetic: LabelledImages) -> LabelledImages:
    """D_r ∪ D_g: one training set, sampled uniformly (the synthetic images resized to the real ones)."""
    images = resize_images(synthetic.images, real.images.shape[-1])
    labels = torch.cat([real.labels, synthetic.labels])
    return LabelledImages(torch.cat([real.images, images]), labels, real.class_names)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations of up to 1/16 of the side (reflection-padded) and horizontal flips, per image."""
    n, _, height, width = images.shape
    pad = max(1, height // 16)
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(height).view(1, height)).to(images.device)  # (N, H)
    cols = (dx.view(n, 1) + torch.arange(width).view(1, width)).to(images.device)  # (N, W)
    batch = torch.arange(n, device=images.device).view(n, 1, 1)
    shifted = padded.permute(0, 2, 3, 1)[batch, rows.view(n, height, 1), cols.view(n, 1, width)]  # (N, H, W, C)
    shifted = shifted.permute(0, 3, 1, 2)
    flip = (torch.rand(n, generator=generator) < 0.5).to(images.device).view(n, 1, 1, 1)
    return torch.where(flip, shifted.flip(-1), shifted)


def train_classifier(
    train: LabelledImages,
    config: EvaluationConfig,
    *,
    seed: int,
    device: torch.device,
    progress: bool = False,
    desc: str = "classifier",
) -> nn.Module:
    """A fresh ``config.classifier`` trained on ``train``: SGD (momentum 0.9, wd 5e-4), cosine lr, ``config.steps``."""
    torch.manual_seed(classifier_seed(seed, "init"))  # the initialisation
    model = build_classifier(
        config.classifier,
        num_classes=len(train.class_names),
        in_channels=train.images.shape[1],
        image_size=train.images.shape[-1],
    ).to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.steps)
    rng = torch.Generator().manual_seed(classifier_seed(seed, "batches"))  # batches and augmentation
    images, labels = train.images.to(device), train.labels.to(device)
    model.train()
    for step in tqdm(range(config.steps), desc=desc, unit="step", disable=not progress, leave=False):
        index = torch.randint(0, labels.shape[0], (min(config.batch_size, labels.shape[0]),), generator=rng)
        batch = images[index.to(device)]
        if config.augment:
            batch = augment(batch, rng)
        loss = F.cross_entropy(model(batch), labels[index.to(device)])
        if not torch.isfinite(loss.detach()):
            raise NonFiniteTrainingError(
                f"{desc}: the training loss is {loss.item()} at step {step}; lower evaluation.lr (now {config.lr})"
            )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
    return model.eval()


def classifier_seed(seed: int, purpose: str) -> int:
    """The evaluation classifiers' own seed stream. TODV seeds its classifier with the run seed itself, so
    seeding evaluation seed 0 the same way started that classifier from TODV's exact initial weights."""
    return int.from_bytes(hashlib.sha256(f"evaluation:{purpose}:{seed}".encode()).digest()[:7], "little")


@torch.no_grad()
def top1_accuracy(model: nn.Module, test: LabelledImages, device: torch.device, batch_size: int = 1024) -> float:
    correct = 0
    for start in range(0, len(test.labels), batch_size):
        images = test.images[start : start + batch_size].to(device)
        correct += int((model(images).argmax(1).cpu() == test.labels[start : start + batch_size]).sum())
    return correct / len(test.labels)


def summarise(accuracies: list[float]) -> dict:
    """Mean and sample standard deviation (0 for one seed) of per-seed accuracies."""
    return {
        "accuracies": accuracies,
        "mean": statistics.fmean(accuracies),
        "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
    }


def evaluate(
    settings: list[TrainingSet],
    test: LabelledImages,
    config: EvaluationConfig,
    *,
    device: torch.device,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_key: str = "",
    progress: bool = False,
) -> dict:
    """{setting name: {train_set, pool, train_size, accuracies (one per seed), mean, std}}, in ``settings`` order.

    ``checkpoint``: a JSON file of finished (setting, seed) accuracies, read first and
    rewritten (atomically) after every classifier. Its results count only under the same
    ``checkpoint_key`` (the run's stage key: the config and inputs they were computed from).
    """
    done: dict[str, float] = {}
    if checkpoint is not None and Path(checkpoint).exists():
        saved = json.loads(Path(checkpoint).read_text())
        if saved.get("key") == checkpoint_key:
            done = saved["done"]
    results = {}
    jobs = [(setting, seed) for setting in settings for seed in config.seeds]
    bar = tqdm(total=len(jobs), desc="evaluation", unit="classifier", disable=not progress)
    for setting, seed in jobs:
        job = f"{setting.name}|{seed}"
        if job not in done:
            model = train_classifier(setting.data, config, seed=seed, device=device, desc=setting.name)
            done[job] = top1_accuracy(model, test, device)
            log.info("%s, seed %d: test accuracy %.4f", setting.name, seed, done[job])
            if checkpoint is not None:
                atomic_write_json(checkpoint, {"key": checkpoint_key, "done": done})
        bar.update(1)
    bar.close()
    for setting in settings:
        accuracies = [done[f"{setting.name}|{seed}"] for seed in config.seeds]
        if not all(math.isfinite(a) for a in accuracies):
            raise NonFiniteTrainingError(f"{setting.name}: non-finite accuracy {accuracies}")
        results[setting.name] = {
            "train_set": setting.train_set,
            "pool": setting.pool,
            "train_size": len(setting.data.labels),
            **summarise(accuracies),
        }
    return results
