"""Method-quality tuning on the default embedded task, evaluated on a VALIDATION set (never the test split).

    OMP_WAIT_POLICY=PASSIVE python scripts/tune_default.py out.json --settings plain,utilgen [--joint]
    OMP_WAIT_POLICY=PASSIVE python scripts/tune_default.py out.json --diagnose

Task (the project's default): ``load_embedded(16)``, ``make_splits(shots_per_class=16,
meta_per_class=10, test_per_class=None, seed=0)``; D_r = 160 real images, synthetic pool =
5 x |D_r| = 800 images (80/class). The test split is not read by this script unless
``--final-test`` is given (for the one chosen configuration, reported separately).

Validation set: a fixed balanced subset (``--val-per-class`` per class, the first of each class
in file order) of the Fashion-MNIST *train* file installed by Debian (``load_debian_images``):
real images outside the task. Every number used to choose a setting is measured on it.

Evaluation recipe (one recipe, fixed up front, identical for every pool: real-only, plain,
UtilGen; not tuned): a fresh cnn-small, SGD (lr 0.05, momentum 0.9, weight decay 5e-4), cosine
schedule, ``--classifier-steps`` steps of batch 64, light augmentation (random shift of up to
1 pixel with zero padding, horizontal flip with p = 0.5); top-1 accuracy on the validation set;
mean and spread over ``--classifier-seeds`` classifier seeds.

A setting (``SETTINGS``) names: whether class tokens are learned (textual inversion, 16 shots
per class), the TODV configuration, MLCO rounds (candidates/pairs per class, min_gap, DPOConfig),
the final generation (plain, or ILPO with an ILPOConfig), an oversampling factor m (m x 80
candidates per class) and how the 80 per class are kept (``select_per_class``: "top" utility,
or a "band" that drops only the lowest-utility fraction). Plain and UtilGen use the same
sampler steps and guidance for the final images (``--sampler-steps``, ``--guidance``).
Stage results shared by settings (tokens, first pool, TODV) are computed once per process;
their times are reported with every setting that uses them.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from utilgen.adaptation import (
    DPOConfig,
    ILPOConfig,
    evaluate_pairs,
    generate_candidates,
    optimise_instances,
    pairs_from_pool,
    select_indices_per_class,
    train_dpo_round,
)
from utilgen.data import LabelledImages, load_embedded, make_splits
from utilgen.data.fashion_mnist import load_debian_images
from utilgen.generator import learn_class_tokens, load_pretrained
from utilgen.io import atomic_write_json
from utilgen.models import build_classifier
from utilgen.valuation import BiLevelConfig, fit_valuation

PER_CLASS = 80  # 5 x 16 real shots
FIRST_POOL_SEED = 10_000
MLCO_SEED = 3_000_000
FINAL_SEED = 70_000


# ------------------------------------------------------------------------------------------ evaluation


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random shift of up to 1 pixel (zero padding) and horizontal flip (p = 0.5), per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=generator)
    dy = torch.randint(0, 3, (n,), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, images.shape[1], h, w + 2)
    shifted = padded.gather(2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, images.shape[1], h, w)
    shifted = shifted.gather(3, cols)
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), shifted.flip(3), shifted)


def train_and_evaluate(
    train: LabelledImages, evaluation: LabelledImages | list[LabelledImages], seed: int, steps: int
) -> float | list[float]:
    """Top-1 accuracy on ``evaluation`` (or on each of a list) of a fresh cnn-small trained on ``train`` (the fixed recipe)."""
    torch.manual_seed(seed)
    model = build_classifier(
        "cnn-small",
        num_classes=len(train.class_names),
        in_channels=train.images.shape[1],
        image_size=train.images.shape[-1],
    )
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    rng = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, len(train.labels), (64,), generator=rng)
        loss = F.cross_entropy(model(augment(train.images[batch], rng)), train.labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
    model.eval()
    results = []
    for part in evaluation if isinstance(evaluation, list) else [evaluation]:
        with torch.no_grad():
            correct = sum(
                int((model(part.images[i : i + 1000]).argmax(1) == part.labels[i : i + 1000]).sum())
                for i in range(0, len(part), 1000)
            )
        results.append(correct / len(part))
    return results if isinstance(evaluation, list) else results[0]


def summarise(accuracies: list[float]) -> dict:
    return {
        "mean": round(statistics.mean(accuracies), 4),
        "spread": round(max(accuracies) - min(accuracies), 4),
        "std": round(statistics.pstdev(accuracies), 4),
        "per_seed": [round(a, 4) for a in accuracies],
    }


def validation_subset(per_class: int, image_size: int) -> LabelledImages:
    """The first ``per_class`` images of each class, in file order, of the Debian Fashion-MNIST train file."""
    full = load_debian_images("train", image_size)
    keep = torch.cat([torch.nonzero(full.labels == k).flatten()[:per_class] for k in range(full.num_classes)])
    return full.subset(keep)


# ------------------------------------------------------------------------------------------ settings

TODV_DEFAULT = {"steps": 150, "batch_size": 64, "meta_batch_size": 50, "progress": False}

SETTINGS: dict[str, dict] = {
    # plain generation: class prompts (pretrained), per-image seeds, guidance --guidance, no UtilGen
    "plain": {"plain": True},
    "plain-tokens": {"plain": True, "tokens": True},
    # UtilGen without MLCO: ILPO re-denoise only (no prompt steps), no selection
    "noise": {"tokens": True, "ilpo": {"prompt_steps": 0, "noise_strategy": "redenoise"}},
    # ILPO prompt (2 Adam steps through the 10-step sampler, last call differentiated) + re-denoise
    "ilpo": {"tokens": True, "ilpo": {"prompt_steps": 2, "prompt_lr": 0.05, "noise_strategy": "redenoise"}},
    # repair mode: only the instances below the 25% utility quantile of D_g0 ascend (4 steps), then re-denoise
    "repair": {
        "tokens": True,
        "ilpo": {"prompt_steps": 4, "prompt_lr": 0.05, "noise_strategy": "redenoise", "repair_quantile": 0.25},
    },
    # the brief's utility-selection lever: 3 x candidates per class, keep the top 80 by utility
    "plain-top3": {"tokens": True, "oversample": 3, "select": "top"},
    # MLCO: one weak Diffusion-DPO round, then ILPO re-denoise
    "mlco-noise": {
        "tokens": True,
        "mlco": {"rounds": 1, "candidates": 8, "pairs": 2, "min_gap": 0.05, "dpo": {"steps": 50, "lr": 5e-5}},
        "ilpo": {"prompt_steps": 0, "noise_strategy": "redenoise"},
    },
    # the full default UtilGen of METHOD.md at this budget: MLCO (DPOConfig defaults, 2 rounds) + ILPO prompt + noise
    "full-default": {
        "tokens": True,
        "mlco": {"rounds": 2, "candidates": 16, "pairs": 4, "min_gap": 0.05},
        "ilpo": {"prompt_steps": 2, "prompt_lr": 0.05, "noise_strategy": "redenoise"},
    },
}


def resolve(name: str) -> dict:
    """A setting by name; "key=value;..." suffixes after a base name ("base:key=value;...") override fields."""
    base, _, overrides = name.partition(":")
    setting = json.loads(json.dumps(SETTINGS[base]))
    for item in filter(None, overrides.split(";")):
        key, _, value = item.partition("=")
        setting[key] = json.loads(value)
    return setting


# ------------------------------------------------------------------------------------------ the pipeline


class Cache:
    """Stage results shared by settings within one process, with the seconds they took."""

    def __init__(self):
        self.store: dict[str, tuple[object, float]] = {}

    def get(self, key: str, build):
        if key not in self.store:
            start = time.perf_counter()
            value = build()
            self.store[key] = (value, time.perf_counter() - start)
        return self.store[key]


def run_setting(name: str, setting: dict, splits, args, cache: Cache) -> tuple[LabelledImages, dict]:
    """The final 80/class pool of one setting and a report of its stages and times."""
    report: dict = {"setting": setting, "seconds": {}}
    generator = load_pretrained()
    k = generator.num_classes
    steps, guidance = args.sampler_steps, args.guidance
    if setting.get("tokens"):
        tokens, seconds = cache.get(
            "tokens", lambda: learn_class_tokens(generator, splits.train.images, splits.train.labels, steps=200, seed=0)
        )
        generator.set_class_tokens(tokens)
        report["seconds"]["tokens"] = round(seconds, 1)
    tok = "tok" if setting.get("tokens") else "pre"
    m = setting.get("oversample", 1)
    labels = torch.arange(k).repeat_interleave(PER_CLASS * m)
    seeds = torch.tensor([FINAL_SEED + i for i in range(len(labels))])
    if setting.get("plain"):
        start = time.perf_counter()
        images = generator.sample(
            generator.class_prompt_embeds(labels),
            generator.initial_noise(seeds.tolist()),
            guidance_scale=guidance,
            steps=steps,
        )
        report["seconds"]["generation"] = round(time.perf_counter() - start, 1)
        report["seconds"]["total"] = round(sum(report["seconds"].values()), 1)
        return LabelledImages(images, labels, splits.train.class_names), report

    first_per_class = setting.get("first_per_class", 30)

    def first_pool():
        first_labels = torch.arange(k).repeat_interleave(first_per_class)
        noise = generator.initial_noise([FIRST_POOL_SEED + i for i in range(len(first_labels))])
        images = generator.sample(
            generator.class_prompt_embeds(first_labels), noise, guidance_scale=guidance, steps=steps
        )
        return LabelledImages(images, first_labels, splits.train.class_names)

    pool0, seconds = cache.get(f"pool0-{tok}-{first_per_class}", first_pool)
    report["seconds"]["first_pool"] = round(seconds, 1)
    todv = {**TODV_DEFAULT, **setting.get("todv", {})}
    if "features" in todv:
        todv["features"] = tuple(todv["features"])
    valuation, seconds = cache.get(
        f"todv-{tok}-{first_per_class}-{sorted(todv.items())}",
        lambda: fit_valuation(splits.train, pool0, splits.meta, BiLevelConfig(**todv)),
    )
    report["seconds"]["todv"] = round(seconds, 1)
    if valuation.features == ("loss",):
        grid, weights = valuation.curve(torch.linspace(0, 6, 13))
        report["curve"] = {"loss": [round(float(x), 2) for x in grid], "weight": [round(float(w), 3) for w in weights]}

    mlco = setting.get("mlco")
    if mlco:
        start = time.perf_counter()
        config = DPOConfig(**mlco.get("dpo", {}))
        report["mlco"] = []
        for r in range(mlco.get("rounds", 1)):
            n = mlco.get("candidates", 16)
            candidates = generate_candidates(
                generator,
                valuation,
                range(k),
                n,
                [MLCO_SEED + 100_000 * r + i for i in range(n * k)],
                guidance_scale=guidance,
                steps=steps,
            )
            pairs = pairs_from_pool(candidates, pairs_per_class=mlco.get("pairs", 4), min_gap=mlco.get("min_gap", 0.05))
            train_dpo_round(generator, pairs, config, round_index=r)
            after = evaluate_pairs(generator, pairs, beta=config.beta)
            report["mlco"].append(
                {
                    "pairs": len(pairs),
                    "implicit_accuracy_after": round(after.implicit_acc, 3),
                    "candidate_mean_utility": round(float(candidates.utilities.mean()), 4),
                }
            )
        report["seconds"]["mlco"] = round(time.perf_counter() - start, 1)

    start = time.perf_counter()
    ilpo = setting.get("ilpo")
    if ilpo is None:  # plain sampling with the (tuned) generator, then valued
        images = generator.sample(
            generator.class_prompt_embeds(labels),
            generator.initial_noise(seeds.tolist()),
            guidance_scale=guidance,
            steps=steps,
        )
        utilities = valuation.score(images, labels)
    else:
        ilpo = dict(ilpo)
        if "repair_quantile" in ilpo:  # repair mode: the threshold is a quantile of D_g0's utilities
            threshold = float(torch.quantile(valuation.score(pool0.images, pool0.labels), ilpo.pop("repair_quantile")))
            ilpo["ascend_below"] = threshold
            report["ascend_below"] = round(threshold, 4)
        config = ILPOConfig(
            **{"steps": steps, "guidance_scale": guidance, "batch_size": 100, "progress": False, **ilpo}
        )
        pool, history = optimise_instances(generator, valuation, labels, seeds, config)
        images, utilities = pool.images, pool.utilities
        before = torch.cat([h.utility_before for h in history.prompt])
        report["ilpo"] = {"utility_class_prompt_proxy": round(float(before.mean()), 4)}
    report["seconds"]["final_generation"] = round(time.perf_counter() - start, 1)
    report["mean_utility_all_candidates"] = round(float(utilities.mean()), 4)
    keep = select_indices_per_class(
        labels, utilities, PER_CLASS, mode=setting.get("select", "top"), drop_fraction=setting.get("drop_fraction", 0.0)
    )
    report["mean_utility_kept"] = round(float(utilities[keep].mean()), 4)
    report["seconds"]["total"] = round(sum(report["seconds"].values()), 1)
    return LabelledImages(images[keep], labels[keep], splits.train.class_names), report


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--settings", default="plain")
    parser.add_argument("--joint", action="store_true", help="also evaluate D_r + pool (joint) and real-only")
    parser.add_argument("--sampler-steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--classifier-steps", type=int, default=400)
    parser.add_argument("--classifier-seeds", type=int, default=3)
    parser.add_argument("--val-per-class", type=int, default=300)
    parser.add_argument("--final-test", action="store_true", help="ALSO report the test split (final config only)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    data = load_embedded(16)
    splits = make_splits(data, shots_per_class=16, meta_per_class=10, test_per_class=None, seed=0)
    validation = validation_subset(args.val_per_class, 16)
    report = {
        "args": vars(args),
        "torch_threads": torch.get_num_threads(),
        "validation_size": len(validation),
        "settings": {},
    }
    if os.path.exists(args.output):
        with open(args.output) as handle:
            previous = json.load(handle)
        report["settings"] = previous.get("settings", {})
        for key in ("real_only",):
            if key in previous:
                report[key] = previous[key]
    seeds = range(args.classifier_seeds)

    def evaluate(train: LabelledImages) -> dict:
        """{"validation": summary} (and "test": summary with --final-test; the same classifiers)."""
        parts = [validation, splits.test] if args.final_test else [validation]
        accuracies = [train_and_evaluate(train, parts, seed, args.classifier_steps) for seed in seeds]
        out = {"validation": summarise([a[0] for a in accuracies])}
        if args.final_test:
            out["test"] = summarise([a[1] for a in accuracies])
        return out

    if args.joint and "real_only" not in report:
        report["real_only"] = evaluate(splits.train)
        print("real-only", report["real_only"], flush=True)
    cache = Cache()
    for name in args.settings.split(","):
        pool, entry = run_setting(name, resolve(name), splits, args, cache)
        start = time.perf_counter()
        entry["synthetic_only"] = evaluate(pool)
        if args.joint:
            entry["joint"] = evaluate(splits.train.concat(pool))
        entry["seconds"]["evaluation"] = round(time.perf_counter() - start, 1)
        report["settings"][name] = entry
        print(name, json.dumps({k: v for k, v in entry.items() if k != "setting"}), flush=True)
        atomic_write_json(args.output, report)
    atomic_write_json(args.output, report)


if __name__ == "__main__":
    main()
