"""Accelerated ops of utilgen, each with a PyTorch reference (docs/design.md, "Anatomy of an op").

- ``weighted_cross_entropy``: fused per-sample-weighted cross-entropy (TODV's
  weighted loss), optional per-sample directional derivatives.
- ``latent_update``: one fused Adam / SGD-momentum step over N noises and N
  prompt embeddings (ILPO), with shell projection and anchor bounds.
- ``logit_hvp``, ``hvp``, ``per_sample_directional_derivative``: meta-gradient
  products for TODV without a stored second-order graph.

``info()`` reports which backend each op would use here and why.
"""

from __future__ import annotations

from utilgen.ops._backend import BACKENDS, BackendUnavailable, use_backend
from utilgen.ops._info import info, info_text
from utilgen.ops.latent_update import (
    LatentUpdateSettings,
    LatentUpdateState,
    latent_update,
    latent_update_reference,
)
from utilgen.ops.logit_hvp import logit_hvp, logit_hvp_reference
from utilgen.ops.meta_grad import HVP_METHODS, PerSampleDirectional, hvp, per_sample_directional_derivative
from utilgen.ops.weighted_cross_entropy import (
    WeightedCrossEntropyOutput,
    weighted_cross_entropy,
    weighted_cross_entropy_reference,
)

__all__ = [
    "BACKENDS",
    "HVP_METHODS",
    "BackendUnavailable",
    "LatentUpdateSettings",
    "LatentUpdateState",
    "PerSampleDirectional",
    "WeightedCrossEntropyOutput",
    "hvp",
    "info",
    "info_text",
    "latent_update",
    "latent_update_reference",
    "logit_hvp",
    "logit_hvp_reference",
    "per_sample_directional_derivative",
    "use_backend",
    "weighted_cross_entropy",
    "weighted_cross_entropy_reference",
]
