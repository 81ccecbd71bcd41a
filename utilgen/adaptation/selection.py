"""Utility-based selection of a class-balanced pool (this project's extension, not in the paper).

UtilGen's TODV values are used by the paper only to steer the generator (MLCO pairs, ILPO
objective). Here they also choose which of m x n generated candidates per class are kept:

- ``mode="top"``: the ``per_class`` highest-utility candidates of each class;
- ``mode="band"``: drop the lowest-utility ``drop_fraction`` of each class's candidates
  (the likely off-class or mislabelled ones), then keep the first ``per_class`` survivors in
  candidate order, i.e. a utility-agnostic draw from the rest, which keeps the pool's
  diversity instead of concentrating it on the easiest samples;
- ``mode="first"``: the first ``per_class`` in candidate order (no selection; the baseline).

Ties are broken by candidate order (stable sort): the result is deterministic.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from utilgen.data import SyntheticPool

SELECTION_MODES = ("top", "band", "first")


def select_indices_per_class(
    labels: Tensor, utilities: Tensor, per_class: int, *, mode: str = "top", drop_fraction: float = 0.0
) -> Tensor:
    """(M,) int64 indices, ascending, of the kept candidates: ``per_class`` of every class present.

    labels (N,) int64; utilities (N,) float without NaN. Raises if a class has fewer than
    ``per_class`` candidates (after the band's drop, for ``mode="band"``).
    """
    if mode not in SELECTION_MODES:
        raise ValueError(f"mode must be one of {SELECTION_MODES}, got {mode!r}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if not 0.0 <= drop_fraction < 1.0:
        raise ValueError(f"drop_fraction must lie in [0, 1), got {drop_fraction}")
    labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
    utilities = torch.as_tensor(utilities).float().cpu()
    if labels.dim() != 1 or utilities.shape != labels.shape:
        raise ValueError(
            f"labels and utilities must be (N,) each, got {tuple(labels.shape)} and {tuple(utilities.shape)}"
        )
    if mode != "first" and bool(torch.isnan(utilities).any()):
        raise ValueError("utilities hold NaN: value every candidate before selecting")
    kept = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()  # candidate order
        if mode == "top":
            order = members[torch.sort(utilities[members], descending=True, stable=True).indices]
            chosen = order[:per_class]
        elif mode == "band":
            drop = math.floor(drop_fraction * len(members))
            ascending = members[torch.sort(utilities[members], stable=True).indices]
            survivors = torch.sort(ascending[drop:]).values  # back to candidate order
            chosen = survivors[:per_class]
        else:
            chosen = members[:per_class]
        if len(chosen) < per_class:
            raise ValueError(f"class {label}: {len(chosen)} candidates left, {per_class} wanted")
        kept.append(chosen)
    return torch.sort(torch.cat(kept)).values


def select_per_class(
    pool: SyntheticPool, per_class: int, *, mode: str = "top", drop_fraction: float = 0.0
) -> SyntheticPool:
    """The sub-pool of ``select_indices_per_class`` on a valued pool (``pool.utilities`` set)."""
    if pool.utilities is None:
        raise ValueError("the pool has no utilities: value it (Valuation.score) before selecting")
    keep = select_indices_per_class(pool.labels, pool.utilities, per_class, mode=mode, drop_fraction=drop_fraction)
    return pool.subset(keep)
