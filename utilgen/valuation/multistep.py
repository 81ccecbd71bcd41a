"""Multi-step look-ahead meta-gradient of TODV: dL_meta(theta_T)/dphi through T virtual steps (docs/method.md, TODV).

T virtual SGD steps on training batches (x_t, y_t), t = 0..T-1, of N_t samples each, then a meta batch of M:

    l_{t,i}     = CE(f(x_{t,i}; theta_t), y_{t,i})                      (N_t,) per-sample losses at theta_t
    w_{t,i}     = W_phi(features_{t,i})                                 (N_t,) features detached; masked rows 1,
                                                                        optionally scaled to batch mean 1
    theta_{t+1} = theta_t - a * grad_theta (1/N_t) sum_i w_{t,i} l_{t,i}     virtual step
    L_v         = (1/M) sum_j CE(f(x_j; theta_T), y_j)                  meta loss

Reverse mode over the steps (theta_{t+1} depends on phi through w_t and through theta_t):

    v_T = grad L_v(theta_T)
    for t = T-1 .. 0:
        dL_v/dphi += -(a/N_t) sum_i (dw_{t,i}/dphi) s_{t,i},   s_{t,i} = <grad_theta l_{t,i}(theta_t), v_{t+1}>
        v_t = v_{t+1} - a * H_t v_{t+1},   H_t = Hessian of (1/N_t) sum_i w_{t,i} l_{t,i} at theta_t, w held fixed

v_0 is never needed (theta_0 does not depend on phi), so T steps take T - 1
Hessian-vector products; T = 1 is the one-step identity of
``utilgen.valuation.strategies`` (``exact_meta_gradient`` there is its reference).
s_t is that identity's per-sample directional derivative along v_{t+1}; the
weights' sum over steps is one vector-Jacobian product of the weight network.

Memory: stored are the T parameter vectors theta_t, each step's logits z_t (N_t, K),
its RNG state and its weights' graph to phi (the weight network on (N_t, F)
features: N_t x hidden activations). No graph of the classifier outlives one
reverse step, so the peak does not grow with T (beyond T copies of theta);
``exact_unrolled_meta_gradient``, the reference, keeps all T steps' double-backward graphs.

Two choices per reverse step. The logit tangent u = J v_{t+1} (s_t = the fused row dot of u;
Gauss-Newton's product also uses u), ``tangent``:

- ``forward``: one ``torch.func.jvp`` pass, exact. On GroupNorm networks forward mode
  peaks above a training step (cnn-small, batch 128: 1.38x).
- ``finite_difference``: one shifted forward against the stored z_t, u ~ (z(theta_t + eps v) - z_t) / eps,
  as ``finite_difference_meta_gradient``. Logits are continuous where gradients are not
  (ReLU kinks), so the error stays O(eps): 2e-4 .. 1.5e-2 of dL_v/dphi in fp32 on cnn-small at T = 3.

The Hessian-vector product H_t v_{t+1}, ``hvp_method``:

- ``exact`` (default): ``utilgen.ops.hvp`` by double backward (the gradient's graph is alive: ~2.5x a step).
- ``forward_over_reverse``: ``utilgen.ops.hvp``'s ``torch.func.jvp`` over ``torch.func.grad`` (~4.2x here).
- ``finite_difference``: ``utilgen.ops.hvp``'s central difference of two gradients at theta_t +- eps v
  (~1.0x). Only for smooth networks: on ReLU networks the gradient jumps at kinks, and every unit of
  the ~10^6 in a batch that crosses one adds O(jump / eps). Relative HVP errors on cnn-small: 50 in
  fp64 at the default step (1e-9 at a 100x smaller one), 0.2-26 in fp32 at every step from 1e-4x to
  1x the default (a step that crosses no kink drowns in rounding); tanh/softplus: 1e-3 fp32, 1e-9 fp64.
- ``gauss_newton``: G_t v = J^T diag(w/N) H_CE u, u = J v: ``utilgen.ops.logit_hvp(z, u, w/N)`` in logit
  space, then one vector-Jacobian product J^T (~1.0x with the finite-difference tangent). It drops the
  network's own curvature (GroupNorm, products of layers): exact for a model linear in theta, an
  approximation otherwise.

Measured (benchmarks/bench_lookahead.py: cnn-small 16x16, batch and meta batch 128, a = 0.05, 2 shared
CPU cores; peak memory vs a plain training step; relative error of dL_v/dphi vs the fp32 exact unroll):

    T   exact unroll     exact HVP, forward tangent    Gauss-Newton, finite-difference tangent
    1   2.71x            1.38x, err 1.8e-3             1.01x, err 1.9e-2
    3   6.11x            2.55x, err 5.7e-3             1.03x, err 1.19
    5   9.51x            2.57x, err 7.1e-3             1.05x, err 0.10

The default is the accurate pair (exact HVPs, forward tangent): its error is fp32 rounding (3e-7 ..
2e-6 on two more seeds; this seed's hypergradient is a near cancellation; fp64: 1e-15), its memory is
flat in T, and the finite-difference HVP, the only method near 1x memory that is exact in the limit,
is wrong on ReLU classifiers. Gauss-Newton with the finite-difference tangent is the low-memory choice
(within 1.3x a step at every T); its error is mostly scale: at T = 3 over 3 seeds its norm is 1.1-2.2x
the exact one's, the cosine 0.991-0.999 and 98-100% of the coordinates keep their sign (dropping the
curvature altogether, v_t = v_{t+1}, gives errors of 0.9-6.6 and flips signs). The exact HVPs cost
time: 0.84x the exact unroll at T = 3 and 1.75x at T = 5 on CPU (benchmarks/results/cpu-2threads-lookahead.json).

``model_fn(params, inputs) -> logits (N, K)`` is functional; ``params`` and the classifier are never
modified (only the copies theta_t, t >= 1, are shifted in place and restored by the finite difference).
Randomness (dropout) is replayed: the RNG state before step t's forward is stored, and every later pass at
theta_t (the tangent, the Hessian-vector product's gradients, the shifted forward, the Gauss-Newton VJP)
draws the same masks. The forward phase draws exactly as the exact unroll does (one forward per step, then
the meta forward), so both see the same masks from the same seed and leave the global RNG in the same state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from utilgen.models import per_sample_features
from utilgen.ops import hvp, logit_hvp, weighted_cross_entropy
from utilgen.valuation.strategies import (
    MetaGradient,
    ModelFn,
    Params,
    _replayed_randomness,
    _rng_state,
    _weight_net_params,
    default_one_sided_eps,
    effective_weights,
)

HVP_METHODS = ("exact", "forward_over_reverse", "finite_difference", "gauss_newton")


@dataclass(frozen=True, eq=False)
class MultiStepLookahead:
    """A T-step look-ahead problem: classifier theta, weight network W_phi, T training batches and a meta batch.

    model_fn: (params, inputs (N, C, H, W)) -> logits (N, K), functional.
    params: name -> tensor, theta_0 (read only).
    weight_net: W_phi, features (N, F) -> weights (N,) in [0, 1]; its parameters get the gradient.
    features: the weight network's input columns ("loss", "entropy", "margin").
    batches: T >= 1 training batches (inputs (N_t, C, H, W), targets (N_t,) int64), in step order; the
        first is the one the trainer trains on next.
    meta_inputs, meta_targets: the meta batch, (M, C, H, W) and (M,) int64.
    inner_lr: a, every virtual step's learning rate.
    weight_masks: None, or one (N_t,) bool mask (or None) per batch; False rows get weight 1 and no
        meta-gradient (real samples when the trainer fixes their weights).
    normalize: use w_i N_t / sum_j w_j (batch mean 1) in every virtual step; the meta-gradient flows
        through the normalisation (see ``effective_weights``).
    """

    model_fn: ModelFn
    params: Params
    weight_net: nn.Module
    features: Sequence[str]
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
    meta_inputs: torch.Tensor
    meta_targets: torch.Tensor
    inner_lr: float
    weight_masks: Sequence[torch.Tensor | None] | None = None
    normalize: bool = False

    def __post_init__(self):
        if len(self.batches) == 0:
            raise ValueError("MultiStepLookahead needs at least one training batch (T >= 1), got none")
        for t, batch in enumerate(self.batches):
            if len(batch) != 2:
                raise ValueError(f"MultiStepLookahead: batches[{t}] must be an (inputs, targets) pair")
            _check_batch(f"batches[{t}]", *batch)
        _check_batch("the meta batch", self.meta_inputs, self.meta_targets)
        if self.weight_masks is None:
            return
        if len(self.weight_masks) != len(self.batches):
            raise ValueError(
                f"MultiStepLookahead: weight_masks has {len(self.weight_masks)} entries for {len(self.batches)} "
                "batches; give one mask (or None) per batch, or weight_masks=None"
            )
        for t, mask in enumerate(self.weight_masks):
            n = self.batches[t][1].shape[0]
            if mask is not None and (mask.dtype != torch.bool or mask.shape != (n,)):
                raise ValueError(
                    f"MultiStepLookahead: weight_masks[{t}] must be a ({n},) bool tensor or None, got "
                    f"{mask.dtype} of shape {tuple(mask.shape)}"
                )

    @property
    def steps(self) -> int:
        return len(self.batches)

    def weight_mask(self, t: int) -> torch.Tensor | None:
        return None if self.weight_masks is None else self.weight_masks[t]


def _check_batch(what: str, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    if targets.dim() != 1 or targets.shape[0] == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"MultiStepLookahead: {what} needs inputs (N, ...) and targets (N,) with N >= 1, got inputs "
            f"{tuple(inputs.shape)} and targets {tuple(targets.shape)}"
        )


# --------------------------------------------------------------------------- losses


def _cross_entropy(logits, targets, weights=None, reduction="mean", *, backend=None) -> torch.Tensor:
    """``weighted_cross_entropy``, except that fp64 logits stay fp64.

    The op (and its reference) computes in fp32; in fp64 the tests then check the
    recursion's algebra to ~1e-12 rather than fp32 rounding.
    """
    if logits.dtype != torch.float64:
        return weighted_cross_entropy(logits, targets, weights, reduction, backend=backend)
    per_sample = torch.logsumexp(logits, dim=1) - logits.gather(1, targets.unsqueeze(1)).squeeze(1)  # (N,)
    if weights is not None:
        per_sample = weights.to(logits.dtype) * per_sample
    return per_sample if reduction == "none" else per_sample.mean()


def _directional(logits, targets, tangent, *, backend=None) -> torch.Tensor:
    """s_i = <softmax(z_i) - onehot(y_i), u_i> (N,): the fused row dot, fp64 kept as fp64."""
    if logits.dtype != torch.float64:
        return weighted_cross_entropy(
            logits.contiguous(), targets, tangent=tangent.contiguous(), backend=backend
        ).directional
    residual = torch.softmax(logits, dim=1) - F.one_hot(targets, logits.shape[1]).to(logits.dtype)  # (N, K)
    return (residual * tangent).sum(dim=1)


def _step_weights(problem: MultiStepLookahead, t: int, per_sample_loss, logits, targets) -> torch.Tensor:
    """Effective w_t (N_t,) from W_phi(features), differentiable w.r.t. phi only (``strategies._weights``)."""
    features = per_sample_features(per_sample_loss, logits.detach(), targets, tuple(problem.features))  # (N, F)
    dtype = next((p.dtype for p in problem.weight_net.parameters()), features.dtype)
    return effective_weights(problem.weight_net(features.to(dtype)), problem.weight_mask(t), problem.normalize)


def _phi_grads(problem: MultiStepLookahead, outputs, grad_outputs=None) -> dict[str, torch.Tensor]:
    names, phi = _weight_net_params(problem)
    grads = torch.autograd.grad(outputs, phi, grad_outputs=grad_outputs, allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g for name, p, g in zip(names, phi, grads, strict=True)}


# --------------------------------------------------------------------------- forward phase


class _Step(NamedTuple):
    params: dict[str, torch.Tensor]  # theta_t, detached leaves
    rng: tuple  # RNG state before the step's forward
    logits: torch.Tensor  # (N_t, K) z_t, detached
    per_sample_loss: torch.Tensor  # (N_t,) l_t, detached
    weights: torch.Tensor  # (N_t,) effective w_t, graph to phi


def _unroll_first_order(problem: MultiStepLookahead, backend: str | None) -> tuple[list[_Step], dict, dict]:
    """The T virtual steps without second-order graphs: (the steps' records, theta_T, the first step's gradient).

    The first step's gradient is what the trainer's lagged real step takes (``MetaGradient.training_gradient``).
    """
    theta = {name: t.detach() for name, t in problem.params.items()}
    steps, first_gradient = [], None
    for t, (inputs, targets) in enumerate(problem.batches):
        rng = _rng_state()
        leaves = {name: p.detach().requires_grad_(True) for name, p in theta.items()}
        logits = problem.model_fn(leaves, inputs)  # (N, K)
        with torch.no_grad():
            per_sample_loss = _cross_entropy(logits, targets, reduction="none", backend=backend)  # (N,)
        weights = _step_weights(problem, t, per_sample_loss, logits, targets)  # (N,), graph to phi
        loss = _cross_entropy(logits, targets, weights.detach(), backend=backend)
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        steps.append(_Step(theta, rng, logits.detach(), per_sample_loss.detach(), weights))
        if first_gradient is None:
            first_gradient = {name: None if g is None else g.detach() for name, g in zip(theta, grads, strict=True)}
        del leaves, logits, loss
        with torch.no_grad():
            theta = {
                name: p if g is None else p - problem.inner_lr * g
                for (name, p), g in zip(theta.items(), grads, strict=True)
            }
    return steps, theta, first_gradient


def _meta_loss_and_direction(problem: MultiStepLookahead, theta, backend) -> tuple[torch.Tensor, dict]:
    """L_v(theta_T) and v_T = grad L_v(theta_T), first order only."""
    leaves = {name: t.detach().requires_grad_(True) for name, t in theta.items()}
    meta_logits = problem.model_fn(leaves, problem.meta_inputs)  # (M, K)
    meta_loss = _cross_entropy(meta_logits, problem.meta_targets, backend=backend)
    grads = torch.autograd.grad(meta_loss, list(leaves.values()), allow_unused=True)
    direction = {
        name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(theta.items(), grads, strict=True)
    }
    return meta_loss.detach(), direction


# --------------------------------------------------------------------------- one reverse step


def _forward_tangent(problem, step: _Step, inputs, direction) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (N, K), u = J v (N, K)) at theta_t by one forward-mode pass, the step's dropout replayed."""
    primals = {name: p.detach() for name, p in step.params.items()}
    tangents = {name: direction[name].to(p.dtype) for name, p in primals.items()}
    with _replayed_randomness(step.rng):
        logits, tangent = torch.func.jvp(lambda p: problem.model_fn(p, inputs), (primals,), (tangents,))
    return logits.detach(), tangent.detach()


def _finite_difference_tangent(problem, step: _Step, inputs, direction) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t (N, K), u ~ (z(theta_t + eps v) - z_t) / eps): one shifted forward, as ``finite_difference_meta_gradient``.

    Logits are continuous where the gradient is not (ReLU kinks), so a one-sided logit difference
    stays accurate on ReLU networks (error O(eps)); a difference of gradients does not.
    """
    eps = default_one_sided_eps(direction)
    if eps == 0.0:
        return step.logits, torch.zeros_like(step.logits)
    shifted = {name: p + eps * direction[name] for name, p in step.params.items()}
    with torch.no_grad(), _replayed_randomness(step.rng):
        shifted_logits = problem.model_fn(shifted, inputs)  # (N, K)
    return step.logits, (shifted_logits - step.logits) / eps


TANGENTS = {"forward": _forward_tangent, "finite_difference": _finite_difference_tangent}


def _weighted_loss_fn(problem, step: _Step, inputs, targets, backend):
    """params -> (1/N) sum_i w_i l_i(params) with w_t fixed and the step's dropout replayed."""
    weights = step.weights.detach()

    def loss_fn(params):
        with _replayed_randomness(step.rng):
            logits = problem.model_fn(params, inputs)  # (N, K)
        return _cross_entropy(logits, targets, weights, backend=backend)

    return loss_fn


def _gauss_newton_product(problem, step: _Step, inputs, logits, logit_tangent, backend) -> dict:
    """J^T diag(w/N) H_CE u with u = J v: ``logit_hvp`` in logit space, one VJP of the classifier."""
    n = logits.shape[0]
    cotangent = logit_hvp(logits.contiguous(), logit_tangent.contiguous(), step.weights.detach() / n, backend=backend)
    leaves = {name: p.detach().requires_grad_(True) for name, p in step.params.items()}
    with _replayed_randomness(step.rng):
        replayed = problem.model_fn(leaves, inputs)  # (N, K)
    grads = torch.autograd.grad(
        replayed, list(leaves.values()), grad_outputs=cotangent.to(replayed.dtype), allow_unused=True
    )
    return {name: torch.zeros_like(p) if g is None else g for (name, p), g in zip(leaves.items(), grads, strict=True)}


def _reverse_step(problem, t: int, step: _Step, direction: dict, hvp_method: str, tangent: str, backend) -> tuple:
    """(s_t (N_t,), H_t v or None at t = 0) for v = ``direction`` = v_{t+1}."""
    inputs, targets = problem.batches[t]
    logits, logit_tangent = TANGENTS[tangent](problem, step, inputs, direction)  # (N, K) each
    directional = _directional(logits, targets, logit_tangent, backend=backend)  # (N,)
    if t == 0:
        return directional, None
    if hvp_method == "gauss_newton":
        return directional, _gauss_newton_product(problem, step, inputs, logits, logit_tangent, backend)
    # Double backward and forward-over-reverse differentiate the loss twice: the reference kernel.
    loss_backend = backend if hvp_method == "finite_difference" else "reference"
    loss_fn = _weighted_loss_fn(problem, step, inputs, targets, loss_backend)
    # step.params (t >= 1) are this function's own leaves: the finite difference may shift them in place.
    return directional, hvp(loss_fn, step.params, direction, method=hvp_method)


# --------------------------------------------------------------------------- strategies


def unrolled_hvp_meta_gradient(
    problem: MultiStepLookahead,
    *,
    hvp_method: str = "exact",
    tangent: str = "forward",
    backend: str | None = None,
) -> MetaGradient:
    """dL_v(theta_T)/dphi by the reverse recursion with T - 1 Hessian-vector products, no stored graphs.

    hvp_method: one of ``HVP_METHODS`` (see the module docstring for what each costs and how exact it is).
    tangent: how the logit tangent u = J v_{t+1} (for s_t, and Gauss-Newton's product) is taken:
        ``forward`` (one forward-mode pass, exact) or ``finite_difference`` (one shifted forward, a
        one-sided difference; no forward-mode AD and less memory on GroupNorm networks).
    backend: ``weighted_cross_entropy`` / ``logit_hvp``'s backend (None: the default choice; double
        backward and forward-over-reverse always differentiate the reference).
    Returns ``MetaGradient``; ``per_sample_loss``, ``weights`` and ``training_gradient`` are the first batch's.
    """
    if hvp_method not in HVP_METHODS:
        raise ValueError(f"unknown hvp_method {hvp_method!r}; choose one of {list(HVP_METHODS)}")
    if tangent not in TANGENTS:
        raise ValueError(f"unknown tangent {tangent!r}; choose one of {list(TANGENTS)}")
    steps, theta, first_gradient = _unroll_first_order(problem, backend)
    meta_loss, direction = _meta_loss_and_direction(problem, theta, backend)
    del theta
    lr = problem.inner_lr
    cotangents = [None] * problem.steps
    for t in reversed(range(problem.steps)):
        directional, product = _reverse_step(problem, t, steps[t], direction, hvp_method, tangent, backend)
        weights = steps[t].weights
        cotangents[t] = (-(lr / weights.shape[0]) * directional).to(weights.dtype)  # (N_t,)
        if product is not None:
            direction = {name: v - lr * product[name] for name, v in direction.items()}  # v_t
        steps[t] = steps[t]._replace(params=None, logits=None)  # theta_t is not needed again
    phi_grads = _phi_grads(problem, [step.weights for step in steps], cotangents)
    return MetaGradient(
        phi_grads, meta_loss, steps[0].per_sample_loss, steps[0].weights.detach(), training_gradient=first_gradient
    )


def exact_unrolled_meta_gradient(problem: MultiStepLookahead) -> MetaGradient:
    """The reference: T virtual steps kept differentiable (create_graph), one backward of L_v (reference kernel).

    Memory grows with T: every step's double-backward graph is alive until the backward.
    """
    theta = {name: t.detach().requires_grad_(True) for name, t in problem.params.items()}
    first = None
    for t, (inputs, targets) in enumerate(problem.batches):
        logits = problem.model_fn(theta, inputs)  # (N, K)
        with torch.no_grad():
            per_sample_loss = _cross_entropy(logits, targets, reduction="none", backend="reference")  # (N,)
        weights = _step_weights(problem, t, per_sample_loss, logits, targets)  # (N,)
        loss = _cross_entropy(logits, targets, weights, backend="reference")
        grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True, allow_unused=True)
        theta = {
            name: p if g is None else p - problem.inner_lr * g
            for (name, p), g in zip(theta.items(), grads, strict=True)
        }
        if first is None:
            first = (per_sample_loss.detach(), weights.detach())
    meta_logits = problem.model_fn(theta, problem.meta_inputs)  # (M, K)
    meta_loss = _cross_entropy(meta_logits, problem.meta_targets, backend="reference")
    return MetaGradient(_phi_grads(problem, meta_loss), meta_loss.detach(), *first)
