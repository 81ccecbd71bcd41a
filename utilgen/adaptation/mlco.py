"""MLCO: Diffusion-DPO on the denoiser's LoRA adapter from within-class winner/loser pairs (docs/method.md, "MLCO").

One training step on B pairs (x_w, x_l) of class c, each pair with its own
timestep t and noise eps, shared by winner and loser:

    x_t   = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps                          (both images, same t and eps)
    err   = mean over (C, H, W) of (eps - eps_theta(x_t, t, c))^2     conditional, no guidance
    d_w   = err_w(model) - err_w(reference),  d_l likewise             reference = adapter switched off
    L     = mean over pairs of -log sigmoid(-beta * (d_w - d_l))

Beta convention: the paper's beta * T * w(lambda_t) is one constant here
(``MLCOConfig.beta``), as in its released code. That code and diffusers'
``train_diffusion_dpo.py`` write the exponent as -0.5 * beta_dpo * (...), so our
beta = beta_dpo / 2: the default 2500 is their 5000 (the paper's SD 1.5 value).
The scale also depends on the reduction: errors are means over pixels, so a
larger latent does not change the useful beta.

Health, per step (``DPOHistory``): the loss, the implicit preference accuracy
(fraction of pairs with d_w < d_l, ties counting one half (diffusers counts them 0), so an
untrained adapter reads 0.5), the mean d_w and d_l (the model's MSE minus the
reference's on winners and on losers) and the gradient norm before clipping.

Divergence guards stop the round, put the adapter back at the last weights that
passed every check and raise a ``DPODivergedError`` (carrying the step and the
history so far; the message names mlco.lr and mlco.beta):
- ``DPONonFiniteError``: a NaN/inf loss or gradient norm. The weights go back to
  the start of the previous step (the update taken there is what broke it).
- ``DPOLossRiseError``: the mean of the last 5 losses is over ``MAX_DPO_LOSS_RISE``
  times that of the first 5 (``LossRiseGuard``); back to the previous step's start likewise.
- ``DPOAdapterRunawayError``: after an update the adapter changes some layer by more
  than ``MAX_ADAPTER_CHANGE`` times that layer's own weights (``lora.adapter_changes``);
  back to the weights before that update. A finite runaway lr gets here long before
  anything overflows, while its images are already ruined.
The caller decides whether the run goes on with those adapters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from utilgen.adaptation.lora import (
    adapter_parameters,
    adapters_disabled,
    attach_adapters,
    has_adapters,
    largest_adapter_change,
    reanchor,
)
from utilgen.adaptation.pairs import Pairs
from utilgen.config import MLCOConfig
from utilgen.generator import Generator
from utilgen.generator.textual_inversion import LossRiseGuard

log = logging.getLogger(__name__)

# The adapter's runaway limit: the largest ||scaling B A||_F / ||W||_F over the adapted layers after an update.
# Measured (largest over every step of a round, seed 0): the committed embedded generator with the default
# Config().mlco (lr 5e-5, 50 steps, rank 8, 20 pairs of its real images) reaches 0.0027 (0.0029 in a re-anchored
# second round, 0.011 over 200 steps); 10x, 100x and 1000x that lr reach 0.025, 0.24 and 12 (the last at step 43,
# its loss up 19x); lr 1e-2 for 200 steps 2.8. On the test fixture (tiny random UNet) the tests' own rounds reach
# 0.028 (lr 1e-3, 60 steps) and 0.15 (lr 1e-2, 15 steps), the default config 0.0027. lr 1 crosses 10 at its
# second update on both. An adapter that adds ten times a layer's own weights has replaced the layer rather than
# fine-tuned it; the limit is ~3700x what a default round uses and 3.6x the hottest run that still trained.
MAX_ADAPTER_CHANGE = 10.0

# The loss's runaway limit (LossRiseGuard: mean of the last 5 losses over the mean of the first 5). DPO starts at
# log 2 (adapter = reference), so 10x is a mean loss of ~6.9: the model prefers the pairs' losers by a wide margin,
# the opposite of what it is trained for. Measured peaks: 1.00 for the default config on the embedded generator
# (50 and 200 steps), 1.02 and 1.59 at 10x and 100x its lr, 19 at 1000x; on the test fixture 1.0-1.5 in the tests'
# rounds, 7.7 (fixture) and 9.1 (embedded) for lr 1e-2 over 200 steps, a hot run left running.
MAX_DPO_LOSS_RISE = 10.0


@dataclass
class DPOHistory:
    """Per step: loss, implicit accuracy, mean d_w and d_l (model minus reference MSE), grad norm before clipping."""

    loss: list[float] = field(default_factory=list)
    implicit_acc: list[float] = field(default_factory=list)
    mse_gap_winners: list[float] = field(default_factory=list)
    mse_gap_losers: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)


@dataclass
class DPORoundResult:
    round_index: int
    pairs: int
    steps_done: int
    reanchored: bool  # the adapter was merged into the base weights before this round
    history: DPOHistory


class DPODivergedError(RuntimeError):
    """A DPO round stopped on a divergence guard; the adapter holds the last good weights, ``result`` the history.

    ``step`` is the 0-based step that failed its check; the message names mlco.lr and mlco.beta.
    """

    def __init__(self, message: str, *, step: int, result: DPORoundResult):
        super().__init__(message)
        self.step, self.result = step, result


class DPONonFiniteError(DPODivergedError):
    """The loss or the gradient norm was NaN/inf."""


class DPOLossRiseError(DPODivergedError):
    """The loss rose far above its start (``MAX_DPO_LOSS_RISE``)."""


class DPOAdapterRunawayError(DPODivergedError):
    """An update made the adapter change a layer by more than ``MAX_ADAPTER_CHANGE`` times its own weights.

    ``module`` names that layer and ``change`` is its ratio.
    """

    def __init__(self, message: str, *, step: int, result: DPORoundResult, module: str, change: float):
        super().__init__(message, step=step, result=result)
        self.module, self.change = module, change


# --------------------------------------------------------------------------- the loss


def dpo_loss(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor, beta: float) -> Tensor:
    """Diffusion-DPO loss () from per-pair denoising errors (P,) each: mean of -log sigmoid(-beta (d_w - d_l))."""
    d_w, d_l = model_err_w - ref_err_w, model_err_l - ref_err_l
    return -F.logsigmoid(-beta * (d_w - d_l)).mean()


def implicit_accuracy(model_err_w: Tensor, model_err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor) -> Tensor:
    """Fraction () of pairs the model prefers more than the reference does: d_w < d_l; a tie counts 1/2."""
    margin = (model_err_l - ref_err_l) - (model_err_w - ref_err_w)  # (P,) > 0: winner favoured
    return ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()


def noised(generator: Generator, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """x_t (N, C, H, W) = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps for latents x0 (N, C, H, W), timesteps t (N,)."""
    alphas = generator.scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)
    ab = alphas[t].view(-1, *([1] * (x0.dim() - 1)))
    return (ab.sqrt() * x0.float() + (1 - ab).sqrt() * eps.float()).to(x0.dtype)


def pair_errors(
    generator: Generator, x0_w: Tensor, x0_l: Tensor, prompts: Tensor, t: Tensor, eps: Tensor
) -> tuple[Tensor, Tensor]:
    """Conditional epsilon-MSE per pair (B,), (B,) of winners and losers under one t (B,) and eps (B, C, H, W).

    Winners and losers go through the denoiser as one batch of 2B.
    """
    x_t = torch.cat([noised(generator, x0_w, t, eps), noised(generator, x0_l, t, eps)])  # (2B, C, H, W)
    pred = generator.predict_noise(x_t, torch.cat([t, t]), torch.cat([prompts, prompts]), guidance_scale=1.0)
    err = (pred.float() - torch.cat([eps, eps]).float()).pow(2).mean(dim=tuple(range(1, pred.dim())))  # (2B,)
    return err.chunk(2)


# --------------------------------------------------------------------------- one round


def dpo_gradients(
    generator: Generator,
    params: dict[str, torch.nn.Parameter],
    x0_w: Tensor,
    x0_l: Tensor,
    prompts: Tensor,
    t: Tensor,
    eps: Tensor,
    *,
    beta: float,
    max_grad_norm: float,
) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """The DPO loss on one batch, backpropagated into the adapter ``params`` and clipped (no optimizer step).

    x0_w, x0_l: (B, C, H, W) latents; prompts (B, L, D); t (B,); eps (B, C, H, W).
    Returns (loss, grad norm before clipping, detached errors (B,) each: model_w, model_l, ref_w, ref_l).
    The reference pass runs without autograd: it costs one forward of 2B, no activations kept.
    """
    with torch.no_grad(), adapters_disabled(generator.denoiser):
        ref_w, ref_l = pair_errors(generator, x0_w, x0_l, prompts, t, eps)
    model_w, model_l = pair_errors(generator, x0_w, x0_l, prompts, t, eps)
    loss = dpo_loss(model_w, model_l, ref_w, ref_l, beta)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
    return loss.detach(), grad_norm, (model_w.detach(), model_l.detach(), ref_w, ref_l)


@dataclass
class _PairTensors:
    """The pairs as denoiser inputs on the generator's device: latents (P, C, H, W), prompts (P, L, D)."""

    x0_w: Tensor
    x0_l: Tensor
    prompts: Tensor

    @classmethod
    def of(cls, generator: Generator, pairs: Pairs) -> _PairTensors:
        with torch.no_grad():
            return cls(
                generator.encode(pairs.winner_images),
                generator.encode(pairs.loser_images),
                generator.class_prompt_embeds(pairs.labels),
            )

    def draw(self, index: Tensor, rng: torch.Generator, num_timesteps: int) -> tuple[Tensor, ...]:
        """The pairs at ``index`` (B,) with a fresh timestep (B,) and noise (B, C, H, W) per pair (CPU RNG)."""
        b = index.shape[0]
        t = torch.randint(0, num_timesteps, (b,), generator=rng)
        eps = torch.randn((b, *self.x0_w.shape[1:]), generator=rng)
        device, dtype = self.x0_w.device, self.x0_w.dtype
        index = index.to(device)
        return self.x0_w[index], self.x0_l[index], self.prompts[index], t.to(device), eps.to(device, dtype)


def _snapshot(params: dict[str, torch.nn.Parameter]) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in params.items()}


def _restore(params: dict[str, torch.nn.Parameter], saved: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(saved[name])


def _loss_failure(loss: float, grad_norm: float, rise: LossRiseGuard) -> tuple[type[DPODivergedError], str] | None:
    """The error class and what went wrong, if this step's loss or gradient fails a guard."""
    if not math.isfinite(loss):
        return DPONonFiniteError, f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return DPONonFiniteError, f"the gradient norm is {grad_norm}"
    if rise.add(loss):
        return DPOLossRiseError, rise.describe()
    return None


def _stop_message(round_index: int, step: int, what: str, restored_to: str, config: MLCOConfig) -> str:
    return (
        f"MLCO DPO round {round_index} diverged at step {step}: {what}, with mlco.lr={config.lr:g} and "
        f"mlco.beta={config.beta:g}; the adapter is back at its weights from {restored_to} (the last that passed "
        "every check). Lower mlco.lr (or mlco.beta)"
    )


def prepare_round(generator: Generator, config: MLCOConfig, round_index: int, *, seed: int = 0) -> bool:
    """Attach the adapter on the first use; re-anchor it at later rounds when ``config.reanchor``. True if merged."""
    denoiser = generator.denoiser
    if not has_adapters(denoiser):
        attach_adapters(
            denoiser,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            target_modules=config.target_modules,
            seed=seed,
        )
        return False
    if config.reanchor and round_index > 0:
        reanchor(denoiser, seed=seed + round_index)
        return True
    return False


def train_dpo_round(
    generator: Generator,
    pairs: Pairs,
    config: MLCOConfig = MLCOConfig(),
    *,
    round_index: int = 0,
    seed: int = 0,
    progress: bool = False,
) -> DPORoundResult:
    """``config.steps`` Diffusion-DPO steps of the denoiser's LoRA adapter on ``pairs``; the base weights stay fixed.

    Attaches the adapter when the denoiser has none; re-anchors it first when
    ``round_index > 0`` and ``config.reanchor``. Pairs are drawn without
    replacement within an epoch; every draw (pairs, timesteps, noise) comes
    from ``seed`` and ``round_index``. Raises a ``DPODivergedError`` (module
    docstring) when a divergence guard trips.
    """
    if len(pairs) == 0:
        raise ValueError("no pairs to train on: every class was a near-tie (lower min_gap) or had < 2 candidates")
    reanchored = prepare_round(generator, config, round_index, seed=seed)
    params = adapter_parameters(generator.denoiser)
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    data = _PairTensors.of(generator, pairs)
    num_timesteps = generator.scheduler.alphas_cumprod.shape[0]
    rng = torch.Generator().manual_seed(seed * 1_000_003 + round_index)
    batch = min(config.batch_pairs, len(pairs))
    order, position = torch.randperm(len(pairs), generator=rng), 0
    history = DPOHistory()
    result = DPORoundResult(round_index, len(pairs), 0, reanchored, history)
    last_good = _snapshot(params)  # the newest weights that passed every check
    loss_rise = LossRiseGuard(MAX_DPO_LOSS_RISE)

    for step in tqdm(range(config.steps), desc=f"MLCO DPO round {round_index}", disable=not progress):
        if position + batch > len(pairs):
            order, position = torch.randperm(len(pairs), generator=rng), 0
        x0_w, x0_l, prompts, t, eps = data.draw(order[position : position + batch], rng, num_timesteps)
        position += batch
        optimizer.zero_grad(set_to_none=True)
        loss, grad_norm, (model_w, model_l, ref_w, ref_l) = dpo_gradients(
            generator, params, x0_w, x0_l, prompts, t, eps, beta=config.beta, max_grad_norm=config.max_grad_norm
        )
        loss_value, grad_value = float(loss), float(grad_norm)
        failure = _loss_failure(loss_value, grad_value, loss_rise)
        if failure is not None:  # these weights failed: back to the previous step's, whose update led here
            _restore(params, last_good)
            result.steps_done = step
            error, what = failure
            start = f"the start of step {step - 1}" if step > 0 else "the start of the round"
            raise error(_stop_message(round_index, step, what, start, config), step=step, result=result)
        last_good = _snapshot(params)
        optimizer.step()
        module, change = largest_adapter_change(generator.denoiser)
        if not change <= MAX_ADAPTER_CHANGE:  # also true for NaN
            _restore(params, last_good)
            result.steps_done = step
            what = (
                f"the update changed {module} by {change:.3g}x its own weights "
                f"(limit {MAX_ADAPTER_CHANGE:g}x: no longer fine-tuning)"
            )
            raise DPOAdapterRunawayError(
                _stop_message(round_index, step, what, f"the start of step {step}", config),
                step=step,
                result=result,
                module=module,
                change=change,
            )
        history.loss.append(loss_value)
        history.grad_norm.append(grad_value)
        history.implicit_acc.append(float(implicit_accuracy(model_w, model_l, ref_w, ref_l)))
        history.mse_gap_winners.append(float((model_w - ref_w).mean()))
        history.mse_gap_losers.append(float((model_l - ref_l).mean()))
        result.steps_done = step + 1
        if step % config.log_every == 0 or step == config.steps - 1:
            log.info(
                "MLCO round %d step %d: loss %.4f implicit_acc %.3f mse_gap w %.2e l %.2e grad %.3g adapter %.2e",
                round_index,
                step,
                loss_value,
                history.implicit_acc[-1],
                history.mse_gap_winners[-1],
                history.mse_gap_losers[-1],
                grad_value,
                change,
            )
    return result


# --------------------------------------------------------------------------- measuring preference


@dataclass(frozen=True)
class PairEvaluation:
    loss: float
    implicit_acc: float
    mse_gap_winners: float  # mean d_w
    mse_gap_losers: float  # mean d_l


@torch.no_grad()
def evaluate_pairs(
    generator: Generator, pairs: Pairs, *, beta: float, draws: int = 4, seed: int = 12345, batch_pairs: int = 64
) -> PairEvaluation:
    """DPO loss and implicit accuracy of the current adapter on ``pairs`` over ``draws`` fixed (t, eps) per pair.

    The draws depend only on ``seed``, so evaluations before and after training
    compare the same noisy inputs. Without an adapter the model is the reference (accuracy 0.5).
    """
    data = _PairTensors.of(generator, pairs)
    num_timesteps = generator.scheduler.alphas_cumprod.shape[0]
    rng = torch.Generator().manual_seed(seed)
    errors: list[Sequence[Tensor]] = []
    adapted = has_adapters(generator.denoiser)
    for _ in range(draws):
        for start in range(0, len(pairs), batch_pairs):
            x0_w, x0_l, prompts, t, eps = data.draw(
                torch.arange(start, min(start + batch_pairs, len(pairs))), rng, num_timesteps
            )
            model = pair_errors(generator, x0_w, x0_l, prompts, t, eps)
            if adapted:
                with adapters_disabled(generator.denoiser):
                    ref = pair_errors(generator, x0_w, x0_l, prompts, t, eps)
            else:
                ref = model
            errors.append((*model, *ref))
    model_w, model_l, ref_w, ref_l = (torch.cat(parts) for parts in zip(*errors, strict=True))
    return PairEvaluation(
        loss=float(dpo_loss(model_w, model_l, ref_w, ref_l, beta)),
        implicit_acc=float(implicit_accuracy(model_w, model_l, ref_w, ref_l)),
        mse_gap_winners=float((model_w - ref_w).mean()),
        mse_gap_losers=float((model_l - ref_l).mean()),
    )
