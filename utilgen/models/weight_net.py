"""The weight network W_phi of TODV: a sample's per-sample features -> a weight in [0, 1].

Default (Meta-Weight-Net; docs/method.md, "TODV"): the detached per-sample loss
through Linear(1, 100) -> ReLU -> Linear(100, 1) -> Sigmoid. Beyond the paper,
and off by default, the input can add the predictive entropy and the logit
margin, which separate "hard but correct" from "confidently mislabelled"
samples that share a loss value.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

FEATURES = ("loss", "entropy", "margin")


def _check_features(features: Sequence[str]) -> tuple[str, ...]:
    features = tuple(features)
    unknown = [f for f in features if f not in FEATURES]
    if not features or unknown:
        raise ValueError(f"weight-network features must be a non-empty subset of {FEATURES}, got {features}")
    if len(set(features)) != len(features):
        raise ValueError(f"weight-network features repeat: {features}")
    return features


class WeightNet(nn.Module):
    """features (N, F) -> weights (N,) in [0, 1]; F = len(features)."""

    def __init__(self, hidden: int = 100, features: Sequence[str] = ("loss",)):
        super().__init__()
        if hidden < 1:
            raise ValueError(f"hidden width must be >= 1, got {hidden}")
        self.features = _check_features(features)
        self.net = nn.Sequential(nn.Linear(len(self.features), hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != len(self.features):
            raise ValueError(
                f"WeightNet expects features of shape (N, {len(self.features)}) for {self.features}, "
                f"got {tuple(features.shape)}"
            )
        return torch.sigmoid(self.net(features)).squeeze(1)  # (N,)


class LossUtility(nn.Module):
    """W_phi's place without meta-learning: utility = exp(-loss) = p(y | x) of the classifier (the ablation
    "utility = the plain classifier's loss"; ``valuation.utility = classifier-loss``).

    The weight net's interface (``features``; features (N, 1) -> (N,) in [0, 1]) so that MLCO and ILPO
    climb it unchanged, gradient included. Its one parameter, a temperature fixed at 1, is not trained; it
    also tells where the module lives.
    """

    features = ("loss",)

    def __init__(self) -> None:
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.exp(-features[:, 0] / self.temperature)  # (N,)


def per_sample_features(
    losses: torch.Tensor,
    logits: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    features: Sequence[str] = ("loss",),
    *,
    detach: bool = True,
) -> torch.Tensor:
    """(N, F) detached inputs of the weight network, columns in the order of ``features``.

    ``detach=False`` keeps the graph to the losses and logits: ILPO differentiates
    the utility W_phi(features) through them back to the image. TODV keeps the
    default, where the features are constant inputs (Meta-Weight-Net).

    losses (N,) per-sample cross-entropy; logits (N, K) and targets (N,) are
    needed for "entropy" (of softmax(logits)) and "margin" (z_y minus the
    largest other logit: negative when the sample is misclassified).
    """
    features = _check_features(features)
    columns = []
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        for name in features:
            if name == "loss":
                columns.append(losses.float())
                continue
            if logits is None or (name == "margin" and targets is None):
                raise ValueError(f"the {name!r} feature needs logits{' and targets' if name == 'margin' else ''}")
            z = logits.float()  # (N, K)
            if name == "entropy":
                log_p = torch.log_softmax(z, dim=1)
                columns.append(-(log_p.exp() * log_p).sum(dim=1))
            else:
                target_logit = z.gather(1, targets.unsqueeze(1)).squeeze(1)
                others = z.scatter(1, targets.unsqueeze(1), float("-inf"))
                columns.append(target_logit - others.max(dim=1).values)
    stacked = torch.stack(columns, dim=1)  # (N, F)
    return stacked.detach() if detach else stacked
