"""``python -m utilgen.pretrain``: train the embedded generator on Fashion-MNIST.

Training data: the Debian package's *train* file (60k images) only. The default
task draws its few-shot, meta and test images from the *test* file, so the
generator has never seen an image of the task (disjoint by construction).

Loop: epsilon-prediction MSE at uniform timesteps, AdamW with a cosine decay,
10% of labels dropped to the null class (so one network gives the conditional
and the unconditional prediction classifier-free guidance needs), and an EMA of
the weights (what is saved: few-step training makes the raw weights noisy).

``--evaluate`` reports how recognisable the samples are: a small CNN probe
trained on real train images at the generator's size classifies balanced
samples (guidance 2, 20 DDIM steps); plus sampling throughput.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch: busy-waiting OpenMP threads cost 10-30x under contention (docs/design.md, "Machine facts")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m utilgen.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=800, help="optimiser steps (default 800)")
    parser.add_argument("--out", type=Path, required=True, help="directory for weights, config, checksum, report")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (cosine decay to 10%%)")
    parser.add_argument(
        "--class-dropout", type=float, default=0.1, help="fraction of labels replaced by the null class"
    )
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--labels",
        choices=("coarse", "fine"),
        default="coarse",
        help="coarse: the three groups tops/footwear/other (the default generator); fine: the ten classes "
        "(the in-domain preset's generator)",
    )
    parser.add_argument(
        "--hold-out-per-class",
        type=int,
        default=600,
        help="leave out the first N train-file images of each class: the validation set (default 600)",
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model and tiny data (smoke test)")
    parser.add_argument("--evaluate", action="store_true", help="measure recognisability and sampling speed")
    parser.add_argument(
        "--evaluate-only",
        action="store_true",
        help="no training: evaluate the verified weights already in --out (updates its report)",
    )
    parser.add_argument(
        "--weights-dtype",
        choices=("float16", "float32"),
        default="float16",
        help="storage precision of the saved weights (float16 halves the committed file; "
        "loading casts back to float32)",
    )
    parser.add_argument("--eval-samples", type=int, default=500)
    parser.add_argument("--probe-steps", type=int, default=1500, help="training steps of the real-data CNN probe")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _training_images(generator, limit: int | None, *, labels_kind: str, hold_out_per_class: int):
    """(images (N, C, S, S) in [-1, 1], labels (N,)) from the Debian *train* file, less the validation
    images, labelled with the fine classes or their coarse groups."""
    import numpy as np
    import torch

    from utilgen.data.fashion_mnist import COARSE_OF, load_debian, validation_indices

    images, labels = load_debian("train")
    keep = np.setdiff1d(np.arange(len(labels)), validation_indices(labels, hold_out_per_class))
    images, labels = images[keep], labels[keep]
    if labels_kind == "coarse":
        labels = COARSE_OF[labels]
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    pixels = torch.from_numpy(images).float().div_(255).unsqueeze(1)  # (N, 1, 28, 28)
    return generator.encode(pixels), torch.from_numpy(labels)


def train(
    generator,
    images,
    labels,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    class_dropout: float,
    ema_decay: float,
    seed: int,
    progress: bool,
):
    """Train ``generator`` in place; returns (EMA generator, per-step losses)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    unet, embedding = generator.denoiser, generator.class_embedding
    params = list(unet.parameters()) + list(embedding.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    )
    ema = copy.deepcopy(generator)
    ema_params = list(ema.denoiser.parameters()) + list(ema.class_embedding.parameters())
    alphas = generator.scheduler.alphas_cumprod.to(images.device)  # (T,)
    num_timesteps = alphas.shape[0]
    losses = []
    unet.train()
    bar = tqdm(range(steps), desc="pretrain", unit="step", disable=not progress)
    for step in bar:
        index = torch.randint(0, images.shape[0], (batch_size,))
        x0, y = images[index], labels[index].clone()  # (B, C, S, S), (B,)
        y[torch.rand(batch_size) < class_dropout] = generator.num_classes  # the null class
        t = torch.randint(0, num_timesteps, (batch_size,))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        prediction = unet(x_t, t, encoder_hidden_states=generator.conditioning(y)).sample
        loss = F.mse_loss(prediction, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        schedule.step()
        # EMA with warm-up: a short run must not average in its random start.
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    for buffer, source in zip(ema.denoiser.buffers(), unet.buffers(), strict=True):
        buffer.copy_(source)
    return ema.eval(), losses


def _probe_network(channels: int, num_classes: int):
    from torch import nn

    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def evaluate(
    generator,
    images,
    labels,
    *,
    samples: int,
    probe_steps: int,
    guidance: float,
    sampling_steps: int,
    seed: int,
    progress: bool,
) -> dict:
    """Recognisability of samples by a real-data CNN probe, and sampling throughput."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    torch.manual_seed(seed + 1)
    real = (images + 1) / 2  # (N, C, S, S) in [0, 1], the generator's size
    held_out = min(2000, real.shape[0] // 5)
    train_x, train_y = real[held_out:], labels[held_out:]
    probe = _probe_network(real.shape[1], generator.num_classes)
    probe(train_x[:2])  # materialise the lazy layer before building the optimiser
    optimiser = torch.optim.Adam(probe.parameters(), lr=1e-3)
    for _ in tqdm(range(probe_steps), desc="probe", unit="step", disable=not progress):
        index = torch.randint(0, train_x.shape[0], (128,))
        loss = F.cross_entropy(probe(train_x[index]), train_y[index])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    probe.eval()

    def accuracy(x, y) -> float:
        with torch.no_grad():
            return (probe(x).argmax(1) == y).float().mean().item()

    sample_labels = torch.arange(samples) % generator.num_classes  # balanced classes
    prompts = generator.class_prompt_embeds(sample_labels)
    noise = generator.initial_noise(range(samples))
    start = time.perf_counter()
    fake = generator.sample(
        prompts, noise, guidance_scale=guidance, steps=sampling_steps, batch_size=100, progress=progress
    )
    seconds = time.perf_counter() - start
    per_class = [
        accuracy(fake[sample_labels == k], sample_labels[sample_labels == k]) for k in range(generator.num_classes)
    ]
    return {
        "probe_accuracy_on_real_held_out": round(accuracy(real[:held_out], labels[:held_out]), 4),
        "probe_accuracy_on_samples": round(accuracy(fake, sample_labels), 4),
        "probe_steps": probe_steps,
        "probe_accuracy_per_class": [round(a, 3) for a in per_class],
        "samples": samples,
        "guidance_scale": guidance,
        "sampling_steps": sampling_steps,
        "sampling_images_per_s": round(samples / seconds, 2),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from utilgen.data.fashion_mnist import CLASS_NAMES, COARSE_NAMES
    from utilgen.generator.embedded import TINY_CONFIG, EmbeddedConfig, EmbeddedGenerator, load_weights, save_weights
    from utilgen.io import atomic_write_json

    torch.manual_seed(args.seed)
    names = COARSE_NAMES if args.labels == "coarse" else CLASS_NAMES
    config = dataclasses.replace(
        TINY_CONFIG if args.tiny else EmbeddedConfig(), num_classes=len(names), class_names=names
    )
    data = {"labels_kind": args.labels, "hold_out_per_class": args.hold_out_per_class}
    progress = not args.quiet
    report_path = args.out / "pretrain_report.json"
    if args.evaluate_only:
        ema = load_weights(args.out)
        images, labels = _training_images(ema, limit=512 if args.tiny else None, **data)
        report = json.loads(report_path.read_text()) if report_path.exists() else {}
    else:
        generator = EmbeddedGenerator(config)
        images, labels = _training_images(generator, limit=512 if args.tiny else None, **data)
        start = time.perf_counter()
        ema, losses = train(
            generator,
            images,
            labels,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            class_dropout=args.class_dropout,
            ema_decay=args.ema_decay,
            seed=args.seed,
            progress=progress,
        )
        train_seconds = time.perf_counter() - start
        save_weights(ema, args.out, dtype=getattr(torch, args.weights_dtype))
        ema = load_weights(args.out)  # evaluate exactly what was saved (storage precision included)
        report = {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "class_dropout": args.class_dropout,
            "ema_decay": args.ema_decay,
            "seed": args.seed,
            "config": "tiny" if args.tiny else "default",
            "weights_dtype": args.weights_dtype,
            "parameters": sum(p.numel() for p in ema.denoiser.parameters()) + ema.class_embedding.weight.numel(),
            "train_seconds": round(train_seconds, 1),
            "seconds_per_step": round(train_seconds / max(args.steps, 1), 3),
            "final_loss_mean_last_50": round(sum(losses[-50:]) / max(len(losses[-50:]), 1), 5),
            "labels": args.labels,
            "class_names": list(names),
            "hold_out_per_class": args.hold_out_per_class,
            "training_data": "Fashion-MNIST Debian train file less the first hold_out_per_class images of each "
            "class (the validation set); disjoint from the task's test-file images",
            "threads": torch.get_num_threads(),
        }
    if args.evaluate or args.evaluate_only:
        report["evaluation"] = evaluate(
            ema,
            images,
            labels,
            samples=args.eval_samples,
            probe_steps=args.probe_steps,
            guidance=args.guidance,
            sampling_steps=args.sampling_steps,
            seed=args.seed,
            progress=progress,
        )
    atomic_write_json(args.out / "pretrain_report.json", report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
