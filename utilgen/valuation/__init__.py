"""TODV: task-oriented data valuation (docs/method.md, "TODV"; layer 3: imports config, ops, models, data, io).

- ``fit_valuation(real_train, synthetic, meta, ValuationConfig(...))`` -> ``Valuation``: the
  bi-level Meta-Weight-Net training of a classifier and the weight network W_phi.
- ``Valuation.score(images, labels)`` -> utilities in [0, 1]; ``curve()`` -> the learned w(loss);
  ``save`` / ``Valuation.load`` (safetensors + JSON).
- ``mislabel_auroc(valuation, images, labels)``: how well the utility ranks real images under their true
  label above the same images mislabelled (0.5 chance, below it inverted); ``auroc`` the statistic.
- ``META_GRADIENTS``: the look-ahead meta-gradient strategies (exact, directional, finite_difference).
"""

from utilgen.valuation.probe import auroc, mislabel_auroc
from utilgen.valuation.strategies import META_GRADIENTS, Lookahead, MetaGradient, meta_gradient
from utilgen.valuation.trainer import (
    FitHistory,
    NonFiniteLossError,
    fit_valuation,
    meta_update,
    weighted_step,
)
from utilgen.valuation.valuation import Valuation

__all__ = [
    "META_GRADIENTS",
    "FitHistory",
    "Lookahead",
    "MetaGradient",
    "NonFiniteLossError",
    "Valuation",
    "auroc",
    "fit_valuation",
    "meta_gradient",
    "meta_update",
    "mislabel_auroc",
    "weighted_step",
]
