"""The result of TODV: a classifier f_theta and a weight network W_phi that score new images.

utility(x, y) = W_phi(features(f_theta(x), y)), in [0, 1]; the features are
computed with the classifier in eval mode (no dropout, BatchNorm running
statistics), so a score depends on the image alone, not on its batch.

Saved as a directory: ``valuation.safetensors`` (classifier.* and weight_net.*
tensors) and ``valuation.json`` (how to rebuild both), each written
atomically; the JSON is written last and marks a complete save.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from torch import nn

from utilgen.data.images import resize_images
from utilgen.io import atomic_write_bytes, atomic_write_json, safetensors_bytes
from utilgen.models import LossUtility, WeightNet, build_classifier, per_sample_features

FORMAT = "utilgen.valuation/1"
WEIGHTS_NAME = "valuation.safetensors"
CONFIG_NAME = "valuation.json"


@dataclass(eq=False)
class Valuation:
    """classifier: logits (N, K) for images (N, C, H, W); weight_net: features (N, F) -> (N,) in [0, 1].

    ``classifier_name`` names a ``utilgen.models.build_classifier`` architecture;
    a custom classifier (None) scores but cannot be saved.
    """

    classifier: nn.Module
    weight_net: WeightNet | LossUtility
    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]  # (C, H, W)
    classifier_name: str | None = "cnn-small"
    history: Any = None  # the trainer's FitHistory (not saved)

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        self.image_shape = tuple(self.image_shape)  # type: ignore[assignment]
        self.classifier.eval()
        self.weight_net.eval()

    @property
    def features(self) -> tuple[str, ...]:
        return self.weight_net.features

    @property
    def device(self) -> torch.device:
        return next(self.weight_net.parameters()).device

    @torch.no_grad()
    def score(self, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
        """(N,) float32 utilities in [0, 1] of images (N, C, H, W) in [0, 1] labelled (N,) int64; on CPU.

        Images of another size (a generator rendering at 512 px for a 224 px task) are resized
        first, antialiased bilinear, the way the task's data was.
        """
        if images.dim() == 4 and images.shape[1] == self.image_shape[0] and self.image_shape[1] == self.image_shape[2]:
            images = resize_images(images, self.image_shape[1])
        self._check_inputs(images, labels)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.class_names)):
            raise ValueError(f"labels must lie in [0, {len(self.class_names)})")
        out = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size].to(self.device, torch.float32)
            y = labels[start : start + batch_size].to(self.device)
            logits = self.classifier(x)  # (n, K)
            losses = F.cross_entropy(logits.float(), y, reduction="none")  # (n,)
            out.append(self.weight_net(per_sample_features(losses, logits, y, self.features)).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    def _check_inputs(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(
                f"images must have shape (N, {', '.join(map(str, self.image_shape))}), got {tuple(images.shape)}"
            )
        if labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
            )

    def utility(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N,) utilities in [0, 1] with a graph to ``images`` (N, C, H, W) in [0, 1]: ILPO's objective.

        The same function as ``score`` (eval-mode classifier), but the features
        are not detached, so the gradient flows through the per-sample loss
        (and entropy/margin) into the image. Gradients are meant to be taken
        with ``torch.autograd.grad`` with respect to the images; the classifier
        and weight network are not trained here. One batch, on ``self.device``.
        """
        self._check_inputs(images, labels)
        x, y = images.to(self.device, torch.float32), labels.to(self.device)
        logits = self.classifier(x)  # (N, K)
        losses = F.cross_entropy(logits.float(), y, reduction="none")  # (N,)
        return self.weight_net(per_sample_features(losses, logits, y, self.features, detach=False))  # (N,)

    @torch.no_grad()
    def curve(self, losses_grid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned w(loss) on a grid: (losses (G,), weights (G,)).

        Only defined for the loss-only weight network (the Meta-Weight-Net
        default): with entropy or margin features a loss does not determine a
        weight, and this raises. Default grid: 41 points on [0, 3 ln K]
        (ln K is the loss of a uniform prediction).
        """
        if self.features != ("loss",):
            raise ValueError(f"curve() needs the loss-only weight network; this one reads {self.features}")
        if losses_grid is None:
            losses_grid = torch.linspace(0.0, 3.0 * math.log(len(self.class_names)), 41)
        grid = losses_grid.detach().float().reshape(-1)
        weights = self.weight_net(grid.to(self.device).unsqueeze(1)).float().cpu()
        return grid, weights

    # ----------------------------------------------------------------- persistence

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``valuation.safetensors`` then ``valuation.json`` (atomically each) into ``directory``."""
        if self.classifier_name is None:
            raise ValueError("a Valuation with a custom classifier (classifier_name=None) cannot be rebuilt on load")
        directory = Path(directory)
        tensors = {f"classifier.{k}": v for k, v in self.classifier.state_dict().items()}
        tensors |= {f"weight_net.{k}": v for k, v in self.weight_net.state_dict().items()}
        atomic_write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors))
        if isinstance(self.weight_net, LossUtility):
            weight_net = {"kind": "classifier-loss"}
        else:
            weight_net = {"kind": "meta-learned", "hidden": self.weight_net.net[0].out_features}
            weight_net["features"] = list(self.features)
        atomic_write_json(
            directory / CONFIG_NAME,
            {
                "format": FORMAT,
                "classifier": self.classifier_name,
                "class_names": list(self.class_names),
                "image_shape": list(self.image_shape),
                "weight_net": weight_net,
            },
        )
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, *, device: str | torch.device = "cpu") -> Valuation:
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.exists() or not weights_path.exists():
            raise FileNotFoundError(f"{directory} is not a saved valuation: needs {CONFIG_NAME} and {WEIGHTS_NAME}")
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path}: format {config.get('format')!r}, expected {FORMAT!r}")
        channels, size, _ = config["image_shape"]
        classifier = build_classifier(
            config["classifier"], num_classes=len(config["class_names"]), in_channels=channels, image_size=size
        )
        saved = config["weight_net"]
        if saved.get("kind") == "classifier-loss":
            weight_net = LossUtility()
        else:  # "meta-learned"; valuations saved before the kind was recorded are all meta-learned
            weight_net = WeightNet(hidden=saved["hidden"], features=tuple(saved["features"]))
        tensors = load_safetensors(weights_path.read_bytes())
        for prefix, module in (("classifier.", classifier), ("weight_net.", weight_net)):
            state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
            module.load_state_dict(state, strict=True)
        return cls(
            classifier.to(device),
            weight_net.to(device),
            tuple(config["class_names"]),
            tuple(config["image_shape"]),
            config["classifier"],
        )
