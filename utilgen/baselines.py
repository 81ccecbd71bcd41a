"""The baselines a reviewer asks for, built from the library's own parts (docs/method.md, "Baselines").

- **plain + filter**: a plain pool ``filter_oversample`` times larger than |D_g|, cut back to |D_g| by
  dropping, per class, the images a classifier trained on the real shots + meta set finds least
  consistent with their label (lowest p(y | x)). The cheap alternative to a learned utility.
- **DataDream-style** (Kim et al., 2024, the paper's main competitor): a LoRA adapter on the denoiser
  fitted with the ordinary diffusion (denoising) loss on the few real shots, under the learned class
  tokens; then plain generation. No utility anywhere.

Plain generation with the untrained tokens and real-only on the shots + meta set need no code of
their own: the loop builds them from a fresh generator and the splits. The ablation "utility = the
plain classifier's loss" is a setting of TODV (``valuation.utility = classifier-loss``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from utilgen.adaptation.lora import adapter_parameters, attach_adapters
from utilgen.data import LabelledImages, SyntheticPool, resize_images
from utilgen.generator import Generator
from utilgen.generator.textual_inversion import LossRiseGuard, denoising_loss

log = logging.getLogger(__name__)

# DataDream's loss-rise limit: the same guard and factor textual inversion and DPO use.
MAX_LOSS_RISE = 10.0


class DataDreamDivergedError(RuntimeError):
    """The DataDream-style adapter's denoising loss became non-finite or rose far above its start."""


# ------------------------------------------------------------------------------------ plain + filter


@torch.no_grad()
def label_consistency(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 1024):
    """(N,) p(label | image) under ``classifier`` (eval mode): how well each image shows its own class."""
    classifier.eval()
    device = next(classifier.parameters()).device
    out = []
    for start in range(0, images.shape[0], batch_size):
        logits = classifier(images[start : start + batch_size].to(device)).float()
        y = labels[start : start + batch_size].to(device)
        out.append(logits.softmax(1).gather(1, y.view(-1, 1)).squeeze(1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def most_consistent(pool: SyntheticPool, consistency: torch.Tensor, keep_per_class: int) -> torch.Tensor:
    """Indices, ascending, of the ``keep_per_class`` images of each class of ``pool`` with the highest
    ``consistency``. Ties keep the earlier image (a stable sort), so the cut depends on the scores alone."""
    if consistency.shape != (len(pool),):
        raise ValueError(f"need one consistency score per image ({len(pool)}), got {tuple(consistency.shape)}")
    kept = []
    for label, name in enumerate(pool.class_names):
        members = torch.nonzero(pool.labels == label).flatten()
        if members.numel() < keep_per_class:
            raise ValueError(f"class {name!r} has {members.numel()} images, fewer than the {keep_per_class} kept")
        order = torch.sort(consistency[members], descending=True, stable=True).indices
        kept.append(members[order[:keep_per_class]])
    return torch.sort(torch.cat(kept)).values


# ------------------------------------------------------------------------------------ DataDream-style


def fit_datadream_adapter(
    generator: Generator,
    train: LabelledImages,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    rank: int,
    alpha: float,
    target_modules: tuple[str, ...],
    seed: int,
    progress: bool = False,
) -> list[float]:
    """Attach a LoRA adapter to ``generator.denoiser`` and fit it with the denoising loss on ``train`` (the real
    shots) under the installed class tokens; the per-step losses. The generator keeps the adapter.

    Raises ``DataDreamDivergedError`` (naming ``baselines.datadream_lr``) when the loss is NaN/inf or its
    recent mean rises ``MAX_LOSS_RISE`` times above the start.
    """
    generator.freeze()
    device = generator.device
    with torch.no_grad():
        latents = generator.encode(resize_images(train.images, generator.image_size).to(device))
    labels = train.labels.to(device)
    tokens = generator.class_tokens.detach()
    params = attach_adapters(generator.denoiser, rank=rank, alpha=alpha, target_modules=target_modules, seed=seed)
    optimiser = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    num_timesteps = generator.scheduler.alphas_cumprod.shape[0]
    rise = LossRiseGuard(MAX_LOSS_RISE)
    losses = []
    for step in tqdm(range(1, steps + 1), desc="DataDream-style LoRA", unit="step", disable=not progress):
        index = torch.randint(0, latents.shape[0], (min(batch_size, latents.shape[0]),), generator=rng)
        timesteps = torch.randint(0, num_timesteps, (index.shape[0],), generator=rng).to(device)
        noise = torch.randn(latents[index].shape, generator=rng).to(device=device, dtype=latents.dtype)
        loss = denoising_loss(generator, tokens, latents[index], labels[index], timesteps, noise)
        value = float(loss.detach())
        if not torch.isfinite(loss.detach()) or rise.add(value):
            what = f"the loss is {value:g}" if not torch.isfinite(loss.detach()) else rise.describe()
            raise DataDreamDivergedError(
                f"the DataDream-style adapter diverged at step {step} ({what}); lower baselines.datadream_lr "
                f"(now {lr:g})"
            )
        losses.append(value)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    for parameter in adapter_parameters(generator.denoiser).values():
        parameter.requires_grad_(False)
    return losses


def consistency_summary(consistency: torch.Tensor, kept: torch.Tensor) -> dict:
    """How the filter cut: the mean p(y | x) of the kept and of the dropped images."""
    dropped = ~kept
    return {
        "images": int(consistency.numel()),
        "kept": int(kept.sum()),
        "mean_consistency_kept": float(consistency[kept].mean()) if kept.any() else None,
        "mean_consistency_dropped": float(consistency[dropped].mean()) if dropped.any() else None,
    }
