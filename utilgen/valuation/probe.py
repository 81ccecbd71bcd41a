"""Does a valuation rank correctly labelled real images above mislabelled ones? (layer 3)

A utility meant to find the generated images that teach the wrong class must score an image under its
true label above the same image under a wrong one. ``mislabel_auroc`` measures that on held-out real
images the method already owns (the meta set), every wrong label once; 0.5 is chance and below 0.5 is an
inverted utility. MLCO uses it to decide whether a refreshed valuation replaces the one in use: no judge,
no test image, only the task's own labels.
"""

from __future__ import annotations

import torch

from utilgen.valuation.valuation import Valuation


def mislabel_auroc(valuation: Valuation, images: torch.Tensor, labels: torch.Tensor) -> float | None:
    """AUROC of utility(image, true label) against utility(image, wrong label) over all K - 1 wrong labels
    of each of the images (N, C, H, W) labelled (N,) int64; None for an empty set."""
    k = len(valuation.class_names)
    n = labels.shape[0]
    shift = torch.arange(1, k).repeat_interleave(n)  # every wrong label of every image, once
    wrong = (labels.repeat(k - 1) + shift) % k
    true_utility = valuation.score(images, labels)
    wrong_utility = valuation.score(images.repeat(k - 1, 1, 1, 1), wrong)
    return auroc(true_utility, wrong_utility)


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """P(a positive scores above a negative), ties counting half (the Mann-Whitney U statistic over its
    maximum); None when either side is empty."""
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    scores = torch.cat([positive, negative]).double()
    order = torch.argsort(scores, stable=True)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.float64)
    for value in torch.unique(scores):  # ties share their mean rank
        tied = scores == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    n_pos, n_neg = positive.numel(), negative.numel()
    u = float(ranks[:n_pos].sum()) - n_pos * (n_pos + 1) / 2
    return round(u / (n_pos * n_neg), 4)
