"""MLCO candidates and preference pairs: K samples per class, valued, then winner/loser pairs within a class.

Pairing rule (docs/method.md, "MLCO"): sort one class's candidates by
utility; the i-th highest is paired with the i-th lowest, i = 0, 1, ..., up to
``pairs_per_class`` pairs, each image used once. The gap of these pairs only
shrinks with i, so the first pair closer than ``min_gap`` ends the class: a
near-tie carries no preference, only noise, into the DPO loss.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from utilgen.data import SyntheticPool
from utilgen.generator import Generator

CANDIDATE_STAGE = "mlco-candidates"


@dataclass(frozen=True)
class Pairs:
    """P winner/loser pairs, each within one class.

    winners, losers: (P,) int64 indices into the candidate set the pairs came from
    labels: (P,) int64, the class both images share (their conditioning)
    winner_images, loser_images: (P, C, H, W) float32 in [0, 1]
    winner_utilities, loser_utilities: (P,) float32
    winner_seeds, loser_seeds: (P,) int64 (provenance)
    """

    winners: Tensor
    losers: Tensor
    labels: Tensor
    winner_images: Tensor
    loser_images: Tensor
    winner_utilities: Tensor
    loser_utilities: Tensor
    winner_seeds: Tensor
    loser_seeds: Tensor

    def __len__(self) -> int:
        return self.winners.shape[0]

    @property
    def gaps(self) -> Tensor:
        """(P,) utility of the winner minus that of the loser (> 0)."""
        return self.winner_utilities - self.loser_utilities

    def counts_per_class(self, num_classes: int) -> list[int]:
        return torch.bincount(self.labels, minlength=num_classes).tolist()


def build_pairs(
    images: Tensor, labels: Tensor, utilities: Tensor, seeds: Tensor, *, pairs_per_class: int = 4, min_gap: float = 0.05
) -> Pairs:
    """Winner/loser pairs per class from N valued candidates (see the module docstring for the rule).

    images (N, C, H, W) in [0, 1]; labels (N,) int64; utilities (N,) float (no NaN); seeds (N,) int64.
    Ties in utility are broken by candidate order (stable sort), so the result is deterministic.
    """
    n = images.shape[0]
    if labels.shape != (n,) or utilities.shape != (n,) or seeds.shape != (n,):
        raise ValueError(
            f"labels, utilities and seeds must have shape ({n},), got "
            f"{tuple(labels.shape)}, {tuple(utilities.shape)}, {tuple(seeds.shape)}"
        )
    if pairs_per_class < 1:
        raise ValueError(f"pairs_per_class must be >= 1, got {pairs_per_class}")
    if not (min_gap >= 0 and math.isfinite(min_gap)):
        raise ValueError(f"min_gap must be a finite number >= 0, got {min_gap}")
    if bool(torch.isnan(utilities).any()):
        raise ValueError("utilities hold NaN: value every candidate (Valuation.score) before pairing")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("candidate images hold NaN/inf")
    utilities = utilities.float()
    winners, losers = [], []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()  # (n_k,) in candidate order
        order = members[torch.sort(utilities[members], descending=True, stable=True).indices]  # high -> low
        for i in range(min(pairs_per_class, len(order) // 2)):
            best, worst = order[i], order[len(order) - 1 - i]
            if float(utilities[best] - utilities[worst]) < min_gap:
                break  # later pairs are closer still
            winners.append(int(best))
            losers.append(int(worst))
    w = torch.tensor(winners, dtype=torch.int64)
    lo = torch.tensor(losers, dtype=torch.int64)
    return Pairs(
        winners=w,
        losers=lo,
        labels=labels[w].clone(),
        winner_images=images[w].float(),
        loser_images=images[lo].float(),
        winner_utilities=utilities[w],
        loser_utilities=utilities[lo],
        winner_seeds=seeds[w].clone(),
        loser_seeds=seeds[lo].clone(),
    )


def pairs_from_pool(pool: SyntheticPool, *, pairs_per_class: int = 4, min_gap: float = 0.05) -> Pairs:
    """``build_pairs`` on a valued pool (indices refer to the pool's order)."""
    return build_pairs(
        pool.images, pool.labels, pool.utilities, pool.seeds, pairs_per_class=pairs_per_class, min_gap=min_gap
    )


def generate_candidates(
    generator: Generator,
    valuation,
    classes: Sequence[int],
    per_class: int,
    seeds: Sequence[int],
    *,
    class_names: Sequence[str] | None = None,
    round: int = 0,
    guidance_scale: float = 2.0,
    steps: int = 20,
    batch_size: int = 64,
    progress: bool = False,
) -> SyntheticPool:
    """``per_class`` samples of each class in ``classes``, valued: a pool with stage "mlco-candidates".

    ``seeds``: one per candidate (len(classes) * per_class), class-major: the
    first ``per_class`` seeds are the first class's. ``valuation``: anything
    with ``score(images, labels) -> (N,)`` (a ``Valuation``). Class names come
    from ``class_names``, else ``valuation.class_names``, else "0".."K-1".
    """
    classes = [int(k) for k in classes]
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if len(seeds) != len(classes) * per_class:
        raise ValueError(
            f"need one seed per candidate: {len(classes)} classes x {per_class} = "
            f"{len(classes) * per_class}, got {len(seeds)}"
        )
    labels = torch.tensor(classes, dtype=torch.int64).repeat_interleave(per_class)  # (N,)
    prompts = generator.class_prompt_embeds(labels)  # (N, L, D)
    noise = generator.initial_noise(seeds)  # (N, C, H, W)
    images = generator.sample(
        prompts, noise, guidance_scale=guidance_scale, steps=steps, batch_size=batch_size, progress=progress
    )
    utilities = valuation.score(images, labels)  # (N,)
    names = class_names or getattr(valuation, "class_names", None) or [str(k) for k in range(generator.num_classes)]
    pool = SyntheticPool.create(
        images,
        labels,
        names,
        torch.tensor([int(s) for s in seeds], dtype=torch.int64),
        round=round,
        stage=CANDIDATE_STAGE,
        prompt_embeds=prompts.detach().cpu(),
        noises=noise.detach().cpu(),
    )
    return pool.with_utilities(utilities.float().cpu())
