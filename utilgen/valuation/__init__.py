"""TODV: task-oriented data valuation (METHOD.md, stage 1; layer 3: imports ops, models, data, io).

- ``fit_valuation(real_train, synthetic, meta, BiLevelConfig(...))`` -> ``Valuation``: the
  bi-level Meta-Weight-Net training of a classifier and the weight network W_phi.
- ``Valuation.score(images, labels)`` -> utilities in [0, 1]; ``curve()`` -> the learned w(loss);
  ``save`` / ``Valuation.load`` (safetensors + JSON).
- ``META_GRADIENTS``: the look-ahead meta-gradient strategies (exact, directional, finite_difference).
"""

from utilgen.valuation.strategies import META_GRADIENTS, Lookahead, MetaGradient, meta_gradient
from utilgen.valuation.trainer import (
    BiLevelConfig,
    FitHistory,
    NonFiniteLossError,
    fit_valuation,
    meta_update,
    weighted_step,
)
from utilgen.valuation.valuation import Valuation

__all__ = [
    "META_GRADIENTS",
    "BiLevelConfig",
    "FitHistory",
    "Lookahead",
    "MetaGradient",
    "NonFiniteLossError",
    "Valuation",
    "fit_valuation",
    "meta_gradient",
    "meta_update",
    "weighted_step",
]
