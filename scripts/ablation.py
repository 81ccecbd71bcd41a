"""The ILPO/MLCO ablation on the embedded default task (issue 5's evidence). Writes a JSON report.

    OMP_WAIT_POLICY=PASSIVE python scripts/ablation.py out.json [--per-class 30] [--mlco]

Valuation: TODV (``fit_valuation``) on 16 real shots/class + generated images, meta set 10
real/class, as scripts/ilpo_check.py. Then one pool of ``--per-class`` images per class for
each setting, all with the same labels and seeds: plain generation; +prompt (ILPO prompt
optimisation); +noise (re-denoise with the class prompt); prompt+noise; and, with
``--mlco``, +MLCO (one Diffusion-DPO round on utility pairs) and all three. For each pool:
the mean utility (``Valuation.score``) and the test accuracy of a fresh cnn-small trained
on that pool alone (synthetic-only), mean over ``--classifier-seeds``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import time

import torch

from utilgen.adaptation import (
    DPOConfig,
    ILPOConfig,
    evaluate_pairs,
    generate_candidates,
    optimise_prompts,
    pairs_from_pool,
    refine_noise,
    train_dpo_round,
)
from utilgen.config import EvaluationConfig
from utilgen.data import LabelledImages, load_embedded, make_splits
from utilgen.evaluate import top1_accuracy, train_classifier
from utilgen.generator import load_pretrained
from utilgen.io import atomic_write_json
from utilgen.valuation import BiLevelConfig, fit_valuation


def train_and_test(train: LabelledImages, test: LabelledImages, seed: int, steps: int) -> float:
    """Test accuracy of a fresh cnn-small trained on ``train`` alone: the run's evaluation recipe, no augmentation."""
    config = EvaluationConfig(classifier="cnn-small", seeds=(seed,), steps=steps, batch_size=64, lr=0.05, augment=False)
    model = train_classifier(train, config, seed=seed, device=torch.device("cpu"))
    return top1_accuracy(model, test, torch.device("cpu"))


def mlco_round(generator, valuation) -> dict:
    """One Diffusion-DPO round (defaults of DPOConfig) on 4 utility pairs per class from 16 candidates per class."""
    k = generator.num_classes
    candidates = generate_candidates(generator, valuation, range(k), 16, [3_000_000 + i for i in range(16 * k)])
    pairs = pairs_from_pool(candidates, pairs_per_class=4, min_gap=0.05)
    config = DPOConfig()
    before = evaluate_pairs(generator, pairs, beta=config.beta)
    train_dpo_round(generator, pairs, config)
    after = evaluate_pairs(generator, pairs, beta=config.beta)
    return {
        "pairs": len(pairs),
        "beta": config.beta,
        "lr": config.lr,
        "steps": config.steps,
        "implicit_accuracy_before": before.implicit_acc,
        "implicit_accuracy_after": after.implicit_acc,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output")
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--todv-steps", type=int, default=150)
    parser.add_argument("--classifier-steps", type=int, default=300)
    parser.add_argument("--classifier-seeds", type=int, default=3)
    parser.add_argument("--prompt-lr", type=float, default=0.05)
    parser.add_argument(
        "--mlco", action="store_true", help="also run one Diffusion-DPO round, then every setting again"
    )
    args = parser.parse_args()

    generator = load_pretrained()
    data = load_embedded(generator.image_size)
    splits = make_splits(data, shots_per_class=16, meta_per_class=10, test_per_class=None, seed=0)
    k = generator.num_classes
    pool_labels = torch.arange(k).repeat_interleave(30)
    pool_images = generator.sample(
        generator.class_prompt_embeds(pool_labels),
        generator.initial_noise([10_000 + i for i in range(len(pool_labels))]),
    )
    valuation = fit_valuation(
        splits.train,
        LabelledImages(pool_images, pool_labels, data.class_names),
        splits.meta,
        BiLevelConfig(steps=args.todv_steps, batch_size=64, meta_batch_size=50, progress=False),
    )

    labels = torch.arange(k).repeat_interleave(args.per_class)
    seeds = [70_000 + i for i in range(len(labels))]
    config = ILPOConfig(prompt_steps=8, prompt_lr=args.prompt_lr, batch_size=50, progress=False)
    redenoise = dataclasses.replace(config, noise_strategy="redenoise")

    def settings(gen, prefix):
        noise = gen.initial_noise(seeds)
        class_prompts = gen.class_prompt_embeds(labels)
        prompts = torch.cat(
            [
                optimise_prompts(gen, valuation, labels[i : i + 50], noise[i : i + 50], config)[0]
                for i in range(0, len(labels), 50)
            ]
        )
        return {
            f"{prefix}plain": (class_prompts, noise),
            f"{prefix}+prompt": (prompts, noise),
            f"{prefix}+noise": (
                class_prompts,
                refine_noise(gen, valuation, labels, noise, class_prompts, redenoise)[0],
            ),
            f"{prefix}+prompt+noise": (prompts, refine_noise(gen, valuation, labels, noise, prompts, redenoise)[0]),
        }

    report = {"args": vars(args), "torch_threads": torch.get_num_threads(), "settings": {}}
    for prefix in ("", "mlco") if args.mlco else ("",):
        start = time.perf_counter()
        if prefix == "mlco":  # tunes the generator in place: after the plain settings
            report["dpo"] = mlco_round(generator, valuation)
        gen = generator
        for name, (prompts, noise) in settings(gen, prefix).items():
            images = gen.sample(prompts, noise)
            pool = LabelledImages(images, labels, data.class_names)
            accuracies = [
                train_and_test(pool, splits.test, seed, args.classifier_steps) for seed in range(args.classifier_seeds)
            ]
            report["settings"][name] = {
                "mean_utility": round(float(valuation.score(images, labels).mean()), 4),
                "synthetic_only_test_accuracy": round(sum(accuracies) / len(accuracies), 4),
                "accuracies": [round(a, 4) for a in accuracies],
            }
            print(name, report["settings"][name], flush=True)
        report[f"seconds{('_' + prefix) if prefix else ''}"] = round(time.perf_counter() - start, 1)
    real = [
        train_and_test(splits.train, splits.test, seed, args.classifier_steps) for seed in range(args.classifier_seeds)
    ]
    report["real_only_test_accuracy"] = round(sum(real) / len(real), 4)
    atomic_write_json(args.output, report)


if __name__ == "__main__":
    main()
