"""ILPO on the embedded default task: mean utility of plain vs +prompt vs +noise vs both. Writes a JSON report.

    OMP_WAIT_POLICY=PASSIVE python scripts/ilpo_check.py out.json [--instances 120] [--todv-steps 150]

Valuation: TODV (``fit_valuation``) on 16 real shots/class + ``--pool-per-class`` generated
images/class (class prompts, guidance 2, DDIM 20), meta set 10 real/class. Then, on
``--instances`` new instances (class-balanced, seeds disjoint from the pool's), four
settings with the same seeds: plain generation; prompt optimisation only (noise "none");
noise refinement only (re-denoise with the class prompt); both (prompt, then re-denoise
with the optimised prompt), and optionally gradient noise refinement after the prompt.
Each setting's images are scored with ``Valuation.score``; the report has the means, the
fraction of instances improved over plain, the seconds per instance, and the learned
w(loss) curve (maximising utility pushes the loss toward where that curve is high).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import dataclasses
import time

import torch

from utilgen.adaptation import ILPOConfig, optimise_prompts, refine_noise
from utilgen.data import LabelledImages, load_embedded, make_splits
from utilgen.generator import load_pretrained
from utilgen.io import atomic_write_json
from utilgen.valuation import BiLevelConfig, fit_valuation


def generate(generator, labels: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    noise = generator.initial_noise(seeds)
    return generator.sample(generator.class_prompt_embeds(labels), noise, guidance_scale=2.0, steps=20, batch_size=100)


@torch.no_grad()
def accuracy(generator, valuation, labels, prompt_embeds, noises) -> float:
    """How often the valuation's own classifier recognises the generated images' classes."""
    images = generator.sample(prompt_embeds, noises, guidance_scale=2.0, steps=20, batch_size=100)
    return round(float((valuation.classifier(images).argmax(1) == labels).float().mean()), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON report path")
    parser.add_argument("--instances", type=int, default=120)
    parser.add_argument("--pool-per-class", type=int, default=30)
    parser.add_argument("--todv-steps", type=int, default=150)
    parser.add_argument("--prompt-steps", type=int, default=8)
    parser.add_argument("--prompt-lr", type=float, default=0.05)
    parser.add_argument("--drift-weight", type=float, default=1.0)
    parser.add_argument("--gradient-noise", action="store_true", help="also run prompt + gradient noise refinement")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    generator = load_pretrained()
    data = load_embedded(generator.image_size)
    splits = make_splits(data, shots_per_class=16, meta_per_class=10, test_per_class=None, seed=0)
    k = generator.num_classes
    pool_labels = torch.arange(k).repeat_interleave(args.pool_per_class)
    pool_images = generate(generator, pool_labels, [10_000 + i for i in range(len(pool_labels))])
    synthetic = LabelledImages(pool_images.clamp(0, 1), pool_labels, data.class_names)
    start = time.perf_counter()
    valuation = fit_valuation(
        splits.train,
        synthetic,
        splits.meta,
        BiLevelConfig(steps=args.todv_steps, batch_size=64, meta_batch_size=50, progress=False),
    )
    todv_seconds = time.perf_counter() - start
    losses, weights = valuation.curve()

    labels = torch.arange(args.instances) % k
    seeds = [50_000 + i for i in range(args.instances)]
    noise = generator.initial_noise(seeds)
    class_prompts = generator.class_prompt_embeds(labels)
    base = ILPOConfig(
        prompt_steps=args.prompt_steps,
        prompt_lr=args.prompt_lr,
        drift_weight=args.drift_weight,
        batch_size=40,
        progress=False,
    )
    results, prompts, seconds = {}, [], {}

    def score(prompt_embeds, noises):
        images = generator.sample(prompt_embeds, noises, guidance_scale=2.0, steps=20, batch_size=100)
        return valuation.score(images, labels)

    results["plain"] = score(class_prompts, noise)
    start = time.perf_counter()
    for i in range(0, args.instances, base.batch_size):
        p, _ = optimise_prompts(
            generator, valuation, labels[i : i + base.batch_size], noise[i : i + base.batch_size], base
        )
        prompts.append(p)
    prompts = torch.cat(prompts)
    seconds["prompt"] = (time.perf_counter() - start) / args.instances
    results["prompt"] = score(prompts, noise)

    redenoise = dataclasses.replace(base, noise_strategy="redenoise")
    start = time.perf_counter()
    noise_only, _ = refine_noise(generator, valuation, labels, noise, class_prompts, redenoise)
    seconds["noise"] = (time.perf_counter() - start) / args.instances
    results["noise"] = score(class_prompts, noise_only)
    both_noise, _ = refine_noise(generator, valuation, labels, noise, prompts, redenoise)
    results["both"] = score(prompts, both_noise)
    if args.gradient_noise:
        gradient = dataclasses.replace(base, noise_strategy="gradient", noise_steps=4, noise_lr=0.05)
        start = time.perf_counter()
        refined = [
            refine_noise(generator, valuation, labels[i : i + 40], noise[i : i + 40], prompts[i : i + 40], gradient)[0]
            for i in range(0, args.instances, 40)
        ]
        seconds["gradient_noise"] = (time.perf_counter() - start) / args.instances
        results["prompt+gradient_noise"] = score(prompts, torch.cat(refined))

    plain = results["plain"]
    report = {
        "machine": {"torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "args": vars(args),
        "todv_seconds": round(todv_seconds, 1),
        "curve": {"loss": [round(x, 3) for x in losses.tolist()], "weight": [round(x, 4) for x in weights.tolist()]},
        "mean_utility": {name: round(float(u.mean()), 4) for name, u in results.items()},
        "fraction_improved_over_plain": {
            name: round(float((u > plain).float().mean()), 3) for name, u in results.items() if name != "plain"
        },
        "mean_prompt_distance_to_class": round(float((prompts - class_prompts).flatten(1).norm(dim=1).mean()), 4),
        "class_prompt_norm": round(float(class_prompts.flatten(1).norm(dim=1).mean()), 4),
        "seconds_per_instance": {name: round(s, 3) for name, s in seconds.items()},
        "classifier_accuracy": {
            name: accuracy(generator, valuation, labels, *pair)
            for name, pair in (("plain", (class_prompts, noise)), ("both", (prompts, both_noise)))
        },
    }
    atomic_write_json(args.output, report)
    print(report)


if __name__ == "__main__":
    main()
