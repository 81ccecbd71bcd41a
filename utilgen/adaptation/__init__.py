"""Generator adaptation (docs/method.md, "MLCO" and "ILPO").

Layer 4: imports config, generator, valuation, models, data, ops, io.

MLCO (model level):
- ``generate_candidates`` -> a valued ``SyntheticPool`` (stage "mlco-candidates");
  ``build_pairs`` / ``pairs_from_pool`` -> ``Pairs`` (highest vs lowest utility within a class).
- ``train_dpo_round(generator, pairs, MLCOConfig(...))``: Diffusion-DPO on the denoiser's LoRA adapter,
  the reference being the same UNet with the adapter off; ``dpo_loss``, ``implicit_accuracy``,
  ``evaluate_pairs``; ``DPODivergedError`` (a divergence guard stopped the round) and its kinds
  ``DPONonFiniteError``, ``DPOLossRiseError``, ``DPOAdapterRunawayError``.
- ``lora``: ``attach_adapters``, ``adapters_disabled``, ``reanchor``, ``save_adapters`` / ``load_adapters``,
  ``adapter_changes`` / ``largest_adapter_change`` (the adapter's size relative to the weights it adapts).

ILPO (instance level):
- per-instance prompt-embedding and initial-noise optimisation against the valuation's
  utility: ``optimise_prompts``, ``refine_noise``, ``optimise_instances``;
  ``ClipAlignment``: the optional CLIP class-text drift term (a local CLIP model).

Selection (this project's extension): ``select_per_class`` keeps ``per_class`` candidates of
each class by utility ("top", or a "band" that drops only the lowest-utility fraction).
"""

from utilgen.adaptation.clip_alignment import ClipAlignment
from utilgen.adaptation.ilpo import (
    AscentHistory,
    ILPOHistory,
    optimise_instances,
    optimise_prompts,
    refine_noise,
)
from utilgen.adaptation.lora import (
    ADAPTER_NAME,
    adapter_changes,
    adapter_parameters,
    adapters_disabled,
    attach_adapters,
    has_adapters,
    largest_adapter_change,
    load_adapters,
    reanchor,
    save_adapters,
)
from utilgen.adaptation.mlco import (
    MAX_ADAPTER_CHANGE,
    MAX_DPO_LOSS_RISE,
    DPOAdapterRunawayError,
    DPODivergedError,
    DPOHistory,
    DPOLossRiseError,
    DPONonFiniteError,
    DPORoundResult,
    PairEvaluation,
    dpo_loss,
    evaluate_pairs,
    implicit_accuracy,
    train_dpo_round,
)
from utilgen.adaptation.pairs import CANDIDATE_STAGE, Pairs, build_pairs, generate_candidates, pairs_from_pool
from utilgen.adaptation.selection import SELECTION_MODES, select_indices_per_class, select_per_class
from utilgen.config import DRIFTS, NOISE_STRATEGIES

__all__ = [
    "ADAPTER_NAME",
    "CANDIDATE_STAGE",
    "DRIFTS",
    "MAX_ADAPTER_CHANGE",
    "MAX_DPO_LOSS_RISE",
    "NOISE_STRATEGIES",
    "SELECTION_MODES",
    "AscentHistory",
    "ClipAlignment",
    "DPOAdapterRunawayError",
    "DPODivergedError",
    "DPOHistory",
    "DPOLossRiseError",
    "DPONonFiniteError",
    "DPORoundResult",
    "ILPOHistory",
    "PairEvaluation",
    "Pairs",
    "adapter_changes",
    "adapter_parameters",
    "adapters_disabled",
    "attach_adapters",
    "build_pairs",
    "dpo_loss",
    "evaluate_pairs",
    "generate_candidates",
    "has_adapters",
    "implicit_accuracy",
    "largest_adapter_change",
    "load_adapters",
    "optimise_instances",
    "optimise_prompts",
    "pairs_from_pool",
    "reanchor",
    "refine_noise",
    "save_adapters",
    "select_indices_per_class",
    "select_per_class",
    "train_dpo_round",
]
