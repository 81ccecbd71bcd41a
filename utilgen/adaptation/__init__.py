"""Adaptation of the generator to the task (METHOD.md, stages 2 and 3; layer 4).

- ILPO (``ilpo``): per-instance prompt-embedding and initial-noise optimisation against the
  valuation's utility: ``optimise_prompts``, ``refine_noise``, ``optimise_instances``;
  ``ClipAlignment``: the optional CLIP class-text drift term (a local CLIP model).
"""

from utilgen.adaptation.clip_alignment import ClipAlignment
from utilgen.adaptation.ilpo import (
    DRIFTS,
    NOISE_STRATEGIES,
    AscentHistory,
    ILPOConfig,
    ILPOHistory,
    optimise_instances,
    optimise_prompts,
    refine_noise,
)

__all__ = [
    "DRIFTS",
    "NOISE_STRATEGIES",
    "AscentHistory",
    "ClipAlignment",
    "ILPOConfig",
    "ILPOHistory",
    "optimise_instances",
    "optimise_prompts",
    "refine_noise",
]
