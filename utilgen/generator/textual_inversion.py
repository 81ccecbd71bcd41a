"""Textual inversion: learn per-class tokens from a few real images, the generator frozen.

Only the class tokens train (embedded: each class's (L, D) prompt; Stable
Diffusion: the word vector of its placeholder token ``<class-k>``). The loss is
the denoiser's epsilon-prediction MSE on the real images, noised at uniform
timesteps, conditioned on the class's prompt under the tokens being learned.

Divergence guards (each raises ``TokensDivergedError`` naming ``tokens.lr``): a NaN/inf loss, a loss
risen far above its start (``LossRiseGuard``, shared with MLCO's DPO), and class tokens far larger than
they started (a finite runaway lr saturates the images while the loss stays finite).
"""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utilgen.generator.base import Generator

# The tokens' runaway limit: the largest class token's norm over the mean initial class-token norm. Measured on
# the committed embedded generator (embedded data, 16 shots per class, batch 32, seed 0): 1.05 after the
# default 200 steps at lr 5e-3, 1.36 at 10x that lr (5e-2); tokens.lr=1e9 drove the tokens to about 4e9 (a
# ratio near 1e8) while the loss stayed finite. 100x leaves ~100 times the measured drift for longer or hotter
# legitimate runs and still stops a runaway lr at its first step.
MAX_TOKEN_NORM_GROWTH = 100.0

# The loss's runaway limit: the mean loss of the last LOSS_RISE_WINDOW steps over that of the first ones. The
# denoising MSE depends strongly on the batch's timesteps, so the ratio is noisy even when training is fine:
# on the committed embedded generator (16 shots per class, batch 32, 200 steps) it peaked at 2.18 at the
# default lr 5e-3 (1.86 and 1.85 with seeds 1 and 2) and at 2.16, 2.12 and 1.57 at 10x, 100x and 1000x that
# lr. 10x is ~4.5 times the noisiest of these, and a start of ~0.04 risen tenfold is ~0.4: a good part of
# the way to the ~1 of a denoiser that has stopped predicting the noise at all.
MAX_LOSS_RISE = 10.0
LOSS_RISE_WINDOW = 5  # steps averaged at each end: one batch of hard timesteps moves a 5-step mean little


class TokensDivergedError(RuntimeError):
    """Textual inversion ran away: a NaN/inf loss, a loss far above its start, or class tokens far larger than they
    started.

    The message names ``tokens.lr``; ``step`` is the 1-based step at which it was caught.
    """

    def __init__(self, message: str, *, step: int):
        super().__init__(message)
        self.step = step


class LossRiseGuard:
    """Watches a training loss for a rise far above where it started (textual inversion and MLCO's DPO).

    ``add`` each step's loss; it answers True once the mean of the last ``window`` losses exceeds ``factor``
    times the mean of the first ``window``. The windows overlap until ``2 * window`` losses are in, so a jump
    right after the start needs to be larger to count. A loss that blows up at once (already high within the
    first window) sets a high start and is not seen here: the norm guards catch those runs.
    """

    def __init__(self, factor: float, window: int = LOSS_RISE_WINDOW):
        if not (factor > 0 and window >= 1):
            raise ValueError(f"need factor > 0 and window >= 1, got {factor} and {window}")
        self.factor, self.window = factor, window
        self._first: list[float] = []
        self._recent: deque[float] = deque(maxlen=window)

    def add(self, loss: float) -> bool:
        """Record one step's (finite) loss; True when the recent mean is over ``factor`` times the start's."""
        if len(self._first) < self.window:
            self._first.append(loss)
        self._recent.append(loss)
        return len(self._first) == self.window and self.recent_mean > self.factor * self.start_mean

    @property
    def start_mean(self) -> float:
        return sum(self._first) / len(self._first)

    @property
    def recent_mean(self) -> float:
        return sum(self._recent) / len(self._recent)

    def describe(self) -> str:
        return (
            f"the mean loss of the last {len(self._recent)} steps, {self.recent_mean:.4g}, is over {self.factor:g}x "
            f"that of the first {len(self._first)}, {self.start_mean:.4g}"
        )


def denoising_loss(
    generator: Generator,
    tokens: torch.Tensor,
    latents: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean epsilon MSE of clean latents (N, C, H, W) noised to ``timesteps`` (N,) with ``noise``, under ``tokens``."""
    alphas = generator.scheduler.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps]
    a = alphas.view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    prompts = generator.prompt_embeds_from_tokens(tokens, labels)  # (N, L, D)
    output = generator.denoiser(noisy, timesteps, encoder_hidden_states=prompts.to(latents.dtype)).sample
    if generator.scheduler.config.prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    else:
        target = noise
    return F.mse_loss(output, target)


def learn_class_tokens(
    generator: Generator,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 5e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Learned class tokens (shape of ``generator.class_tokens``), starting from the installed ones.

    images (N, C, H, W) in [0, 1] with labels (N,); classes without images keep
    their tokens. The generator is frozen and not modified (install the result
    with ``generator.set_class_tokens``; save it with safetensors).
    Raises ``ValueError`` for an lr torch cannot use, and ``TokensDivergedError`` (naming ``tokens.lr``) at
    the first step whose loss is NaN/inf, whose loss has risen ``MAX_LOSS_RISE`` times above the start
    (``LossRiseGuard``), or after which a class token's norm exceeds ``MAX_TOKEN_NORM_GROWTH`` times the
    initial tokens' mean norm.
    """
    _check_lr(lr)
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need matching non-empty images and labels, got {images.shape[0]} and {labels.shape[0]}")
    generator.freeze()
    device = generator.device
    with torch.no_grad():
        latents = generator.encode(images.to(device))  # (N, C, H, W), encoded once
    labels = labels.to(device=device, dtype=torch.long)
    tokens = generator.class_tokens.detach().clone().float().requires_grad_(True)
    optimiser = torch.optim.AdamW([tokens], lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    num_timesteps = generator.scheduler.alphas_cumprod.shape[0]
    token_limit = MAX_TOKEN_NORM_GROWTH * _class_token_scale(tokens)
    loss_rise = LossRiseGuard(MAX_LOSS_RISE)
    for step in tqdm(range(1, steps + 1), desc="textual inversion", unit="step", disable=not progress):
        index = torch.randint(0, latents.shape[0], (min(batch_size, latents.shape[0]),), generator=rng)
        timesteps = torch.randint(0, num_timesteps, (index.shape[0],), generator=rng).to(device)
        noise = torch.randn(latents[index].shape, generator=rng).to(device=device, dtype=latents.dtype)
        loss = denoising_loss(generator, tokens.to(generator.dtype), latents[index], labels[index], timesteps, noise)
        _check_loss(loss, loss_rise, step, lr)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        _check_tokens(tokens, token_limit, step, lr)
    return tokens.detach()


def _check_lr(lr: float) -> None:
    # torch's AdamW cannot even take lr=1e300 (float32 overflow, a raw RuntimeError at the first step)
    if not (math.isfinite(lr) and 0 < lr <= torch.finfo(torch.float32).max):
        raise ValueError(f"tokens.lr must be > 0 and finite (float32), got {lr}")


def _class_token_scale(tokens: torch.Tensor) -> float:
    """The mean norm of the initial class tokens (K, ...): the yardstick of the runaway guard.

    The mean over classes, not each class's own norm, so a class whose token starts at zero is not flagged at
    its first step; the floor keeps the limit above zero if every token starts there.
    """
    return max(float(tokens.detach().flatten(1).norm(dim=1).mean()), 1e-3)


def _check_loss(loss: torch.Tensor, rise: LossRiseGuard, step: int, lr: float) -> None:
    # One host sync per step: small beside the denoiser's forward and backward, and a NaN/inf caught here
    # names the step instead of surfacing as NaN tokens after the last one.
    value = float(loss.detach())
    if not math.isfinite(value):
        raise TokensDivergedError(
            f"textual inversion diverged: the loss is {value:g} at step {step} with tokens.lr={lr:g}; lower tokens.lr",
            step=step,
        )
    if rise.add(value):
        raise TokensDivergedError(
            f"textual inversion diverged: at step {step} {rise.describe()}, with tokens.lr={lr:g}; lower tokens.lr",
            step=step,
        )


def _check_tokens(tokens: torch.Tensor, limit: float, step: int, lr: float) -> None:
    # A finite but runaway lr (1e9) saturates every image while the loss stays finite, so the norm is checked too.
    largest = float(tokens.detach().flatten(1).norm(dim=1).max())
    if not largest <= limit:  # also true for NaN/inf
        raise TokensDivergedError(
            f"textual inversion diverged: a class token's norm reached {largest:.3g} at step {step}, over "
            f"{MAX_TOKEN_NORM_GROWTH:g}x the initial tokens' ({limit / MAX_TOKEN_NORM_GROWTH:.3g}), "
            f"with tokens.lr={lr:g}; lower tokens.lr",
            step=step,
        )
