"""The judge: a fine-label Fashion-MNIST classifier that says what each synthetic image shows (diagnostics only).

UtilGen never reads the judge: it is how a reader sees what a pool holds, per class, as the share of
images in the right fine class (a sneaker drawn for "sneaker") and in the right coarse group (footwear of
some kind). It is trained on the Debian *train* file less the validation set (the first 600 images of each
class), so it has seen neither the validation images nor the task's test-file images. The committed
weights (``utilgen/models/weights/judge.*``) are reproduced by ``python -m utilgen.judge --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utilgen.config import EvaluationConfig
from utilgen.data.fashion_mnist import CLASS_NAMES, COARSE_OF, load_debian, validation_indices
from utilgen.data.images import LabelledImages, resize_uint8, uint8_to_tensor
from utilgen.io import atomic_write_bytes, atomic_write_json, atomic_write_text, file_sha256, safetensors_bytes
from utilgen.models.classifier import build_classifier
from utilgen.valuation.probe import auroc

log = logging.getLogger(__name__)

JUDGE_DIR = Path(__file__).parent / "models" / "weights"
WEIGHTS, CONFIG, CHECKSUM = "judge.safetensors", "judge.json", "judge.safetensors.sha256"
# The recipe: the evaluation classifiers' (one recipe everywhere), five times longer and at batch 128, on
# 54k images (cnn-medium for 3000 steps had not finished after 13 minutes on the 2-core VM).
RECIPE = EvaluationConfig(classifier="cnn-small", steps=2000, batch_size=128, lr=0.05, augment=True)


class Judge:
    """A trained fine-label classifier at ``image_size``; ``verdicts(images, labels)`` per image."""

    def __init__(self, model: torch.nn.Module, image_size: int):
        self.model, self.image_size = model.eval(), image_size

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Fine-class predictions (N,) for images (N, 1, H, W) in [0, 1] (resized to the judge's size)."""
        from utilgen.data.images import resize_images

        images = resize_images(images, self.image_size)
        device = next(self.model.parameters()).device
        return torch.cat(
            [
                self.model(images[i : i + batch_size].to(device)).argmax(1).cpu()
                for i in range(0, len(images), batch_size)
            ]
        )

    def verdicts(self, images: torch.Tensor, labels: torch.Tensor, utilities: torch.Tensor | None = None) -> dict:
        """Share of images in their fine class and in their coarse group, overall and per class (JSON-ready).

        With the pool's ``utilities`` (all finite): ``utility_auroc``, how well the utility separates the
        images the judge finds in their fine class from those it finds in another (0.5: not at all).
        """
        predicted = self.predict(images)
        fine = predicted == labels
        coarse_of = torch.from_numpy(COARSE_OF)
        coarse = coarse_of[predicted] == coarse_of[labels]
        per_class = {
            CLASS_NAMES[k]: {"fine": _share(fine[labels == k]), "coarse": _share(coarse[labels == k])}
            for k in range(len(CLASS_NAMES))
            if bool((labels == k).any())
        }
        verdict = {"fine": _share(fine), "coarse": _share(coarse), "per_class": per_class, "images": len(labels)}
        if utilities is not None and bool(torch.isfinite(utilities).all()):
            verdict["utility_auroc"] = auroc(utilities[fine], utilities[~fine])
        return verdict


def judge_pools(pools: dict, class_names: tuple[str, ...]) -> dict | None:
    """{pool name: verdicts} when the task's classes are Fashion-MNIST's, in its order; else None."""
    if tuple(class_names) != CLASS_NAMES:
        return None
    try:
        judge = load_judge()
    except (OSError, ValueError) as error:  # diagnostics only: a broken install must not cost the run its report
        log.warning("the judge is unavailable (%s); the report leaves out what the pools show", error)
        return None
    return {name: judge.verdicts(pool.images, pool.labels, pool.utilities) for name, pool in pools.items()}


def _share(flags: torch.Tensor) -> float:
    return round(float(flags.float().mean()), 4) if flags.numel() else float("nan")


def training_data(image_size: int) -> LabelledImages:
    """The Debian train file less the validation set, fine labels (needs ``dataset-fashion-mnist``)."""
    images, labels = load_debian("train")
    keep = np.setdiff1d(np.arange(len(labels)), validation_indices(labels))
    return LabelledImages(
        uint8_to_tensor(resize_uint8(images[keep], image_size)), torch.from_numpy(labels[keep]), CLASS_NAMES
    )


def train_judge(image_size: int = 16, *, seed: int = 0, progress: bool = False) -> Judge:
    from utilgen.evaluate import train_classifier

    model = train_classifier(
        training_data(image_size), RECIPE, seed=seed, device=torch.device("cpu"), progress=progress, desc="judge"
    )
    return Judge(model, image_size)


def save_judge(judge: Judge, directory: Path, report: dict) -> None:
    weights = atomic_write_bytes(directory / WEIGHTS, safetensors_bytes(judge.model.state_dict()))
    atomic_write_json(directory / CONFIG, {"classifier": RECIPE.classifier, "image_size": judge.image_size, **report})
    atomic_write_text(directory / CHECKSUM, f"{file_sha256(weights)}  {WEIGHTS}\n")


def load_judge(directory: Path = JUDGE_DIR) -> Judge:
    """The committed judge, its checksum verified (a damaged file says so instead of judging wrongly)."""
    from safetensors.torch import load_file

    weights = directory / WEIGHTS
    if not (directory / CHECKSUM).exists():
        raise FileNotFoundError(f"the judge's weights are missing from {directory}: reinstall utilgen")
    expected = (directory / CHECKSUM).read_text().split()[0]
    if file_sha256(weights) != expected:
        raise ValueError(f"{weights} fails its checksum: restore it from git or retrain with python -m utilgen.judge")
    config = json.loads((directory / CONFIG).read_text())
    model = build_classifier(
        config["classifier"], num_classes=len(CLASS_NAMES), in_channels=1, image_size=config["image_size"]
    )
    model.load_state_dict(load_file(weights))
    return Judge(model, config["image_size"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utilgen.judge", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=JUDGE_DIR, help="where the weights go (default: the package's)")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    from utilgen.data.fashion_mnist import load_validation

    start = time.perf_counter()
    judge = train_judge(args.image_size, seed=args.seed, progress=not args.quiet)
    seconds = time.perf_counter() - start
    validation = load_validation(args.image_size)  # how well it sees real images it never trained on
    report = {
        "seed": args.seed,
        "steps": RECIPE.steps,
        "train_seconds": round(seconds, 1),
        "threads": torch.get_num_threads(),
        "on_validation_set": judge.verdicts(validation.images, validation.labels),
        "training_data": "Fashion-MNIST Debian train file less the validation set (first 600 per class)",
    }
    save_judge(judge, args.out, report)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
