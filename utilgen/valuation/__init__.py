"""TODV: task-oriented data valuation (docs/method.md, "TODV"; layer 3: imports config, ops, models, data, io).

- ``fit_valuation(real_train, synthetic, meta, ValuationConfig(...))`` -> ``Valuation``: the
  bi-level Meta-Weight-Net training of a classifier and the weight network W_phi.
- ``Valuation.score(images, labels)`` -> utilities in [0, 1]; ``curve()`` -> the learned w(loss);
  ``save`` / ``Valuation.load`` (safetensors + JSON).
- ``mislabel_auroc(valuation, images, labels)``: how well the utility ranks real images under their true
  label above the same images mislabelled (0.5 chance, below it inverted); ``auroc`` the statistic.
- ``META_GRADIENTS``: the one-step look-ahead meta-gradient strategies (exact, directional, finite_difference);
  ``STRATEGIES`` adds "unrolled_hvp", T steps ahead (``unrolled_hvp_meta_gradient``, Hessian-vector products).
"""

from utilgen.valuation.multistep import MultiStepLookahead, exact_unrolled_meta_gradient, unrolled_hvp_meta_gradient
from utilgen.valuation.probe import auroc, mislabel_auroc
from utilgen.valuation.strategies import META_GRADIENTS, Lookahead, MetaGradient, meta_gradient
from utilgen.valuation.trainer import (
    STRATEGIES,
    FitHistory,
    NonFiniteLossError,
    fit_valuation,
    meta_iteration,
    meta_update,
    weighted_step,
)
from utilgen.valuation.valuation import Valuation

__all__ = [
    "META_GRADIENTS",
    "STRATEGIES",
    "FitHistory",
    "Lookahead",
    "MetaGradient",
    "MultiStepLookahead",
    "NonFiniteLossError",
    "Valuation",
    "auroc",
    "exact_unrolled_meta_gradient",
    "fit_valuation",
    "meta_gradient",
    "meta_iteration",
    "meta_update",
    "mislabel_auroc",
    "unrolled_hvp_meta_gradient",
    "weighted_step",
]
