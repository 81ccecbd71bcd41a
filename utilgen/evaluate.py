"""Final evaluation (docs/method.md, "Evaluation"): fresh classifiers on each training set, top-1 on the test split.

Every setting (real only; a synthetic pool alone; real joint with a pool) trains the same
recipe from the same seeds: ``EvaluationConfig`` (architecture, SGD steps, batch, lr, the
optional shift/flip augmentation). A setting's seeds differ only in the classifier's
initialisation and batch order, so the spread over seeds is the recipe's own noise, the
yardstick any gap between settings has to clear.

Batched (``evaluation.batched``, the default for the CNN family) trains the stage's classifiers
together, drawing from the same streams: each one's initialisation, batches, augmentation and
dropout masks are those ``train_classifier`` draws for it (``train_classifiers``), so it
follows its sequential run up to float rounding. On CPU the classifiers train concurrently,
one per torch thread, each on one thread of its own; elsewhere (CUDA) they train as stacked
models (``utilgen.models.stacked``: grouped convolutions, each classifier in its own channel
slot), one forward and backward pass per step for a whole group (``training_plan`` says why
each). ``evaluation.batched = false`` trains them one after another: the reference.

Results are checkpointed after every trained group (one classifier, except stacked): a killed
evaluation resumes with the groups it had not finished, and the numbers are those of an
uninterrupted run (the groups and their threads depend only on the settings, seeds and device,
and each classifier seeds its own generators and depends on nothing else).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from utilgen.config import EvaluationConfig
from utilgen.data import LabelledImages, resize_images
from utilgen.io import atomic_write_json
from utilgen.models import build_classifier
from utilgen.models.stacked import STACKABLE, StackedSmallCNN

log = logging.getLogger(__name__)

# A stacked group (CUDA) holds at most MAX_STACK classifiers and STACK_PIXELS batch pixels (G x batch x H x W):
# the first stage's saved activations are then about 2.5 GB for cnn-small and 5 GB for cnn-medium.
MAX_STACK = 16
STACK_PIXELS = 2**21


class NonFiniteTrainingError(RuntimeError):
    """A classifier's training loss became NaN or infinite."""


class TrainingStopped(RuntimeError):
    """Training gave up at a step boundary because a concurrent group failed or the run was interrupted."""


_GLOBAL_RNG = threading.Lock()  # seeding the global RNG and building a classifier from it is one step


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
    model = _build(config, train).to(device)
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


def _build(config: EvaluationConfig, train: LabelledImages) -> nn.Module:
    return build_classifier(
        config.classifier,
        num_classes=len(train.class_names),
        in_channels=train.images.shape[1],
        image_size=train.images.shape[-1],
    )


def train_classifiers(
    jobs: list[tuple[LabelledImages, int]],
    config: EvaluationConfig,
    *,
    device: torch.device,
    names: list[str] | None = None,
    progress: bool = False,
    stop: threading.Event | None = None,
) -> list[nn.Module]:
    """``train_classifier(train, config, seed=seed)`` for every (train, seed) of ``jobs``, trained together as one
    ``StackedSmallCNN`` (``config.classifier`` of the CNN family; the training sets share image shape, classes
    and batch size ``min(config.batch_size, len(train))``). ``names``: each job's name in error messages;
    ``stop``: set, training stops (``TrainingStopped``) at the next step.

    Each member draws what ``train_classifier`` draws for it: its initialisation from the global RNG seeded
    with ``classifier_seed(seed, "init")``; batches and augmentation from its "batches" generator; dropout
    masks from its ``_DropoutStream``. The loss is the sum of the members' mean losses, so each member's
    gradient is its own, and SGD with momentum and weight decay is elementwise: each member follows its
    sequential run up to float rounding. On CPU nothing past the initialisation touches the global RNG, so
    groups may train in concurrent threads.
    """
    names = names or [f"classifier {index}" for index in range(len(jobs))]
    sizes = {min(config.batch_size, len(train.labels)) for train, _ in jobs}
    shapes = {(tuple(train.images.shape[1:]), len(train.class_names)) for train, _ in jobs}
    if len(sizes) != 1 or len(shapes) != 1:
        raise ValueError(f"stacked classifiers need one batch size, image shape and class count; got {sizes}, {shapes}")
    members, dropout_streams = [], []
    for train, seed in jobs:
        with _GLOBAL_RNG:
            torch.manual_seed(classifier_seed(seed, "init"))
            members.append(_build(config, train))
            dropout_streams.append(_DropoutStream(device))
    stack = StackedSmallCNN(members).to(device)
    optimiser = torch.optim.SGD(stack.parameters(), lr=config.lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, config.steps)
    batch_streams = [torch.Generator().manual_seed(classifier_seed(seed, "batches")) for _, seed in jobs]
    data = [(train.images.to(device), train.labels.to(device)) for train, _ in jobs]
    n, g = sizes.pop(), len(jobs)
    feature_width = stack.parameter(stack.head_names[0]).shape[-1]
    for step in tqdm(range(config.steps), desc=names[0], unit="step", disable=not progress, leave=False):
        if stop is not None and stop.is_set():
            raise TrainingStopped(f"{names[0]}: stopped at step {step}")
        batches, targets = [], []
        for (images, labels), rng in zip(data, batch_streams, strict=True):
            index = torch.randint(0, labels.shape[0], (n,), generator=rng).to(device)
            batches.append(augment(images[index], rng) if config.augment else images[index])
            targets.append(labels[index])
        masks = None  # at::dropout draws nothing for p = 0
        if stack.dropout > 0:
            masks = torch.stack([stream.mask((n, feature_width), stack.dropout) for stream in dropout_streams])
        logits = stack(torch.stack(batches), masks)  # (G, n, K)
        losses = F.cross_entropy(logits.flatten(0, 1), torch.cat(targets), reduction="none").view(g, n).mean(1)
        finite = torch.isfinite(losses.detach())
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0])
            raise NonFiniteTrainingError(
                f"{names[bad]}: the training loss is {losses[bad].item()} at step {step}; "
                f"lower evaluation.lr (now {config.lr})"
            )
        optimiser.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimiser.step()
        schedule.step()
    for index, member in enumerate(members):
        member.load_state_dict(stack.member_state_dict(index))
    return [member.to(device).eval() for member in members]


class _DropoutStream:
    """Where nn.Dropout draws a classifier's masks in ``train_classifier``, replayed for one stacked member.
    Made right after the member's initialisation, so it starts where the sequential run's dropout starts.

    CPU (and devices other than CUDA): a generator started at the global RNG's state; ``mask`` draws as
    at::dropout does there (bernoulli(1 - p) / (1 - p)), bit for bit. CUDA: the CUDA generator's state,
    swapped in around the same fused dropout kernel the sequential run calls (not thread-safe: CUDA groups
    train in one thread).
    """

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            self.state = torch.cuda.get_rng_state(device)
        else:
            self.generator = torch.Generator().set_state(torch.get_rng_state())

    def mask(self, shape: tuple[int, ...], p: float) -> torch.Tensor:
        """The next training mask: 0 or 1 / (1 - p), of ``shape``, on the device."""
        if self.device.type != "cuda":
            return torch.empty(shape).bernoulli_(1 - p, generator=self.generator).div_(1 - p).to(self.device)
        outside = torch.cuda.get_rng_state(self.device)
        torch.cuda.set_rng_state(self.state, self.device)
        mask = F.dropout(torch.ones(shape, device=self.device), p, training=True)
        self.state = torch.cuda.get_rng_state(self.device)
        torch.cuda.set_rng_state(outside, self.device)
        return mask


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
    known: dict[str, float] | None = None,
    progress: bool = False,
) -> dict:
    """{setting name: {train_set, pool, train_size, accuracies (one per seed), mean, std}}, in ``settings`` order.

    ``checkpoint``: a JSON file of finished (setting, seed) accuracies, read first and
    rewritten (atomically) after every trained group. Its results count only under the same
    ``checkpoint_key`` (the run's stage key: the config and inputs they were computed from).
    ``known``: accuracies already measured for some jobs, keyed like ``job_digests``' keys
    (a classifier with the same digest trained earlier); those jobs are not trained again.
    """
    done: dict[str, float] = dict(known or {})
    if checkpoint is not None and Path(checkpoint).exists():
        saved = json.loads(Path(checkpoint).read_text())
        if saved.get("key") == checkpoint_key:
            done.update(saved["done"])
    jobs = [(setting, seed) for setting in settings for seed in config.seeds]
    plan = training_plan(jobs, config, device)
    todo = [[job for job in group if _job_key(job) not in done] for group in plan.groups]
    finished = len(jobs) - sum(map(len, todo))
    bar = tqdm(total=len(jobs), initial=finished, desc="evaluation", unit="classifier", disable=not progress)

    def record(group: list[Job], accuracies: list[float]) -> None:
        for (setting, seed), accuracy in zip(group, accuracies, strict=True):
            done[_job_key((setting, seed))] = accuracy
            log.info("%s, seed %d: test accuracy %.4f", setting.name, seed, accuracy)
        if checkpoint is not None:
            atomic_write_json(checkpoint, {"key": checkpoint_key, "done": done})
        bar.update(len(group))

    _run_groups([group for group in todo if group], plan, test, config, device, record)
    bar.close()
    results = {}
    for setting in settings:
        accuracies = [done[_job_key((setting, seed))] for seed in config.seeds]
        if not all(math.isfinite(a) for a in accuracies):
            raise NonFiniteTrainingError(f"{setting.name}: non-finite accuracy {accuracies}")
        results[setting.name] = {
            "train_set": setting.train_set,
            "pool": setting.pool,
            "train_size": len(setting.data.labels),
            **summarise(accuracies),
        }
    return results


Job = tuple[TrainingSet, int]  # (setting, classifier seed)


def _job_key(job: Job) -> str:
    return f"{job[0].name}|{job[1]}"


def job_digests(
    settings: list[TrainingSet], test: LabelledImages, config: EvaluationConfig, device: torch.device
) -> dict[str, str]:
    """{job key: digest} for every (setting, seed) job: a SHA-256 of what its accuracy depends on.

    That is the training images and labels, the test split, the recipe (every ``EvaluationConfig``
    field except the list of seeds and the ablation switch, which only choose the jobs), the seed and
    the device (its kind, and the GPU's name), the torch version, the thread count and
    ``TRAINING_CODE_VERSION``. Two jobs with the same digest train the same classifier on the same
    data, so an evaluation that adds settings to a finished one (a run extended with the baselines or
    the ablation) can take the earlier accuracies instead of training and reading the test split
    again. The setting's name is not part of it: equal data is the same job whatever it is called.

    On a CPU a reused accuracy is the one a fresh evaluation computes (each classifier trains alone on
    one thread). On CUDA, where classifiers of one shape train stacked, the stacks of an extended
    evaluation differ from a fresh one's, and the two agree to float rounding."""
    recipe = {k: v for k, v in asdict(config).items() if k not in ("seeds", "ablation")}
    machine = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "code": TRAINING_CODE_VERSION,
    }
    common = hashlib.sha256(json.dumps({"recipe": recipe, **machine}, sort_keys=True).encode())
    for tensor in (test.images, test.labels):
        _hash_tensor(common, tensor)
    digests = {}
    for setting in settings:
        data = common.copy()
        for tensor in (setting.data.images, setting.data.labels):
            _hash_tensor(data, tensor)
        for seed in config.seeds:
            job = data.copy()
            job.update(f"seed:{seed}".encode())
            digests[_job_key((setting, seed))] = job.hexdigest()
    return digests


# Bump when the training code changes what a classifier learns (model, optimiser, augmentation, batching):
# accuracies kept in a run's evaluated.json under the old version are then not reused.
TRAINING_CODE_VERSION = 1


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(memoryview(tensor.view(torch.uint8).numpy()))


@dataclass(frozen=True)
class TrainingPlan:
    """How the stage's classifiers train: ``groups`` (each one stacked model, or one ``train_classifier`` when
    not ``stacked``) on ``lanes`` concurrent threads of one torch thread each (1: in the caller's thread)."""

    groups: list[list[Job]]
    stacked: bool
    lanes: int


def training_plan(jobs: list[Job], config: EvaluationConfig, device: torch.device) -> TrainingPlan:
    """Sequential (``evaluation.batched`` false, or not the CNN family): one job a group, one after another.
    Batched on CPU: one job a group, on one lane per torch thread. Batched elsewhere: the jobs that share batch
    size, image shape and classes stacked (``MAX_STACK`` and ``STACK_PIXELS`` at most a group), one group after
    another. The groups depend only on ``jobs``, ``config`` and the device, so a resumed evaluation trains its
    unfinished groups exactly as the uninterrupted one did.

    Why lanes on CPU, not stacks (2-core Xeon, cnn-small, 16x16x1, batch 64, per classifier-step): on one
    thread a classifier alone takes 26 ms, its convolutions at 110-120 GFLOP/s (a 1-thread GEMM peaks at
    160), and stacked it costs more (30 ms by 3, 37 by 15: grouped convolutions are slower per group and 15
    members' activations leave the L2). Two threads on one classifier reach only 20-21 ms: a step is ~100
    small parallel regions, and under OMP_WAIT_POLICY=PASSIVE each wakes the second thread. One classifier per
    core: 14-16 ms (benchmarks/bench_evaluate.py).
    """
    reason = batching_unavailable(config)
    if reason:
        if config.batched:
            log.info("evaluation.batched: %s; training the classifiers one after another", reason)
        return TrainingPlan([[job] for job in jobs], stacked=False, lanes=1)
    if device.type == "cpu":
        return TrainingPlan([[job] for job in jobs], stacked=True, lanes=max(1, torch.get_num_threads()))
    by_shape: dict[tuple, list[list[Job]]] = {}
    groups: list[list[Job]] = []
    for setting, seed in jobs:
        data = setting.data
        batch, (_, height, width) = min(config.batch_size, len(data.labels)), data.images.shape[1:]
        chunks = by_shape.setdefault((batch, tuple(data.images.shape[1:]), len(data.class_names)), [])
        if not chunks or len(chunks[-1]) == min(MAX_STACK, max(1, STACK_PIXELS // (batch * height * width))):
            chunks.append([])
            groups.append(chunks[-1])
        chunks[-1].append((setting, seed))
    return TrainingPlan(groups, stacked=True, lanes=1)


def batching_unavailable(config: EvaluationConfig) -> str:
    """Why ``config``'s classifiers cannot train batched ('' when they can)."""
    if not config.batched:
        return "off"
    if config.classifier not in STACKABLE:
        return f"{config.classifier} has BatchNorm (batch statistics and running buffers are not stacked)"
    return ""


def _group_accuracies(
    group: list[Job],
    test: LabelledImages,
    config: EvaluationConfig,
    device: torch.device,
    stacked: bool,
    stop: threading.Event | None = None,
) -> list[float]:
    """Train ``group`` and read each classifier's test accuracy."""
    if stacked:
        names = [f"{setting.name} (seed {seed})" for setting, seed in group]
        jobs = [(setting.data, seed) for setting, seed in group]
        models = train_classifiers(jobs, config, device=device, names=names, stop=stop)
    else:
        models = [train_classifier(s.data, config, seed=seed, device=device, desc=s.name) for s, seed in group]
    return [top1_accuracy(model, test, device) for model in models]


def _run_groups(
    groups: list[list[Job]],
    plan: TrainingPlan,
    test: LabelledImages,
    config: EvaluationConfig,
    device: torch.device,
    record: Callable[[list[Job], list[float]], None],
) -> None:
    """Train ``groups`` as ``plan`` says, calling ``record(group, accuracies)`` (in this thread) as each finishes.
    The first error (or an interrupt) stops the other lanes at their next step and is raised. With lanes, every
    group trains on one torch thread however few remain, so a resumed stage computes what the whole one did."""
    if plan.lanes == 1 or not groups:
        for group in groups:
            record(group, _group_accuracies(group, test, config, device, plan.stacked))
        return
    stop, threads = threading.Event(), torch.get_num_threads()
    pool = ThreadPoolExecutor(min(plan.lanes, len(groups)), initializer=torch.set_num_threads, initargs=(1,))
    try:
        futures = {
            pool.submit(_group_accuracies, group, test, config, device, plan.stacked, stop): group for group in groups
        }
        for future in as_completed(futures):
            record(futures[future], future.result())
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)
