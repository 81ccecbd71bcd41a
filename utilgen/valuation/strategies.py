"""Meta-gradient strategies of TODV: d L_meta(theta') / d phi for one look-ahead step (docs/method.md, "TODV").

One look-ahead on a training batch (x, y) of N samples and a meta batch of M:

    l_i   = CE(f(x_i; theta), y_i)                   (N,)  per-sample losses at theta
    w_i   = W_phi(features_i)                        (N,)  features detached (loss, ...)
    theta' = theta - a * grad_theta (1/N) sum_i w_i l_i       virtual SGD step
    L_v   = (1/M) sum_j CE(f(x_j; theta'), y_j)             meta loss

and every strategy returns dL_v/dphi:

- ``exact``: the virtual step kept differentiable (create_graph), one backward
  of L_v through it: double backward, the reference the others are tested against.
- ``directional`` (default): the identity
  dL_v/dphi = -(a/N) sum_i (dw_i/dphi) s_i,  s_i = <grad_theta l_i(theta), g>,
  g = grad L_v(theta'): s by one forward-mode pass at theta
  (``utilgen.ops.per_sample_directional_derivative``: the logit tangent u = J g
  and the fused row dot <softmax(z_i) - onehot(y_i), u_i>), then one
  vector-Jacobian product of the weight network. No second-order graph.
- ``finite_difference``: the same identity with the logit tangent from one extra
  forward, u ~ (f(x; theta + eps g) - f(x; theta)) / eps (one-sided; the logits
  at theta come from the virtual step's forward). Truncation error O(eps) in u;
  see ``default_one_sided_eps`` for the step and the tests for the bound.

``model_fn(params, inputs) -> logits (N, K)`` is functional
(``torch.func.functional_call``); strategies never modify ``params`` or the
classifier. Randomness (dropout) is replayed: the second pass at theta (the
JVP or the shifted forward) draws the same masks as the virtual step's
forward, so each strategy differentiates one and the same function.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from utilgen.models import per_sample_features
from utilgen.ops import per_sample_directional_derivative, weighted_cross_entropy

Params = Mapping[str, torch.Tensor]
ModelFn = Callable[[Params, torch.Tensor], torch.Tensor]


REAL_STEP_KEEPS = ("nothing", "forward", "gradient")


@dataclass(frozen=True, eq=False)
class Lookahead:
    """One look-ahead problem: classifier theta, weight network W_phi, a training and a meta batch.

    model_fn: (params, inputs (N, C, H, W)) -> logits (N, K), functional.
    params: name -> tensor, theta (read only).
    weight_net: W_phi, features (N, F) -> weights (N,) in [0, 1]; its parameters get the gradient.
    features: the weight network's input columns ("loss", "entropy", "margin").
    inputs, targets: the training batch, (N, C, H, W) and (N,) int64.
    meta_inputs, meta_targets: the meta batch, (M, C, H, W) and (M,) int64.
    inner_lr: a, the virtual step's learning rate.
    weight_mask: (N,) bool or None; False rows get weight 1 and no meta-gradient
        (real samples when the trainer fixes their weights).
    normalize: use w_i N / sum_j w_j (batch mean 1) in the virtual step, as
        Meta-Weight-Net's released code does; the meta-gradient then flows
        through the normalisation too (see ``effective_weights``).
    keep: what the result carries for the trainer's real step (``REAL_STEP_KEEPS``):
        "nothing"; "forward": the training batch's forward graph at theta
        (``MetaGradient.training_forward``), so that the real step can take its
        backward under the updated weights without a second forward (that graph
        stays alive through the meta forward and backward: memory); "gradient":
        the virtual step's gradient (``MetaGradient.training_gradient``), detached.
    """

    model_fn: ModelFn
    params: Params
    weight_net: nn.Module
    features: Sequence[str]
    inputs: torch.Tensor
    targets: torch.Tensor
    meta_inputs: torch.Tensor
    meta_targets: torch.Tensor
    inner_lr: float
    weight_mask: torch.Tensor | None = None
    normalize: bool = False
    keep: str = "nothing"

    def __post_init__(self) -> None:
        if self.keep not in REAL_STEP_KEEPS:
            raise ValueError(f"Lookahead.keep must be one of {REAL_STEP_KEEPS}, got {self.keep!r}")


class TrainingForward(NamedTuple):
    """The training batch's forward at theta, kept for the real step (``Lookahead.keep == "forward"``)."""

    leaves: dict[str, torch.Tensor]  # name -> a leaf holding theta (requires grad); the graph starts here
    logits: torch.Tensor  # (N, K) f(x; theta) with its graph to ``leaves``


class MetaGradient(NamedTuple):
    phi_grads: dict[str, torch.Tensor]  # name -> dL_v/dphi, keyed like weight_net.named_parameters()
    meta_loss: torch.Tensor  # () L_v(theta'), detached
    per_sample_loss: torch.Tensor  # (N,) l_i(theta), detached
    weights: torch.Tensor  # (N,) effective w_i of the virtual step (normalised if asked), detached
    training_forward: TrainingForward | None = None  # only with Lookahead.keep == "forward"
    # name -> grad_theta (1/N) sum_i w_i l_i(theta), the virtual step's gradient (None where the loss does not
    # reach the parameter); only with keep == "gradient"
    training_gradient: dict[str, torch.Tensor | None] | None = None


# --------------------------------------------------------------------------- shared pieces


@contextlib.contextmanager
def _replayed_randomness(state: tuple):
    """Run the block with the RNG state ``state`` (from ``_rng_state``), then restore the current one."""
    cpu_state, cuda_states = state
    devices = list(range(len(cuda_states)))
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(cpu_state)
        for device, cuda_state in zip(devices, cuda_states, strict=True):
            torch.cuda.set_rng_state(cuda_state, device)
        yield


def _rng_state() -> tuple:
    cuda_states = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
    return torch.get_rng_state(), cuda_states


def effective_weights(raw: torch.Tensor, weight_mask: torch.Tensor | None, normalize: bool) -> torch.Tensor:
    """(N,) weights the loss uses: masked rows 1, then optionally scaled to batch mean 1.

    Why normalise: with raw weights the look-ahead's first-order gain is to
    scale every weight up (a larger effective step lowers L_v early in
    training); at smoke scale that learned an increasing w(loss) and ranked
    30% flipped labels above clean ones (AUROC 0.09). Normalising leaves only
    the relative weights to learn.
    """
    weights = raw if weight_mask is None else torch.where(weight_mask, raw, torch.ones_like(raw))
    if normalize:
        weights = weights * (weights.shape[0] / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny))
    return weights


def _weights(problem: Lookahead, per_sample_loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Effective w (N,) from W_phi(features), differentiable w.r.t. phi only."""
    features = per_sample_features(per_sample_loss, logits.detach(), problem.targets, tuple(problem.features))  # (N, F)
    return effective_weights(problem.weight_net(features), problem.weight_mask, problem.normalize)  # (N,)


def _weight_net_params(problem: Lookahead) -> tuple[list[str], list[torch.Tensor]]:
    named = [(name, p) for name, p in problem.weight_net.named_parameters() if p.requires_grad]
    return [name for name, _ in named], [p for _, p in named]


def _meta_loss_and_direction(problem: Lookahead, virtual: Params, backend: str | None) -> tuple[torch.Tensor, dict]:
    """L_v(theta') and g = grad L_v(theta'), first order only."""
    leaves = {name: t.detach().requires_grad_(True) for name, t in virtual.items()}
    meta_logits = problem.model_fn(leaves, problem.meta_inputs)  # (M, K)
    meta_loss = weighted_cross_entropy(meta_logits, problem.meta_targets, backend=backend)
    grads = torch.autograd.grad(meta_loss, list(leaves.values()), allow_unused=True)
    direction = {
        name: torch.zeros_like(t) if g is None else g for (name, t), g in zip(leaves.items(), grads, strict=True)
    }
    return meta_loss.detach(), direction


def _virtual_step(problem: Lookahead, backend: str | None):
    """First-order virtual step: (theta', l (N,), z (N, K) detached, w (N,) with phi graph, rng state, kept).

    ``kept``: the (training_forward, training_gradient) pair of ``MetaGradient``, as ``problem.keep`` asks.
    """
    rng = _rng_state()
    leaves = {name: t.detach().requires_grad_(True) for name, t in problem.params.items()}
    logits = problem.model_fn(leaves, problem.inputs)  # (N, K)
    with torch.no_grad():
        per_sample_loss = weighted_cross_entropy(logits, problem.targets, reduction="none", backend=backend)  # (N,)
    weights = _weights(problem, per_sample_loss, logits)  # (N,), graph to phi
    loss = weighted_cross_entropy(logits, problem.targets, weights.detach(), backend=backend)
    keep_forward = problem.keep == "forward"
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True, retain_graph=keep_forward)
    virtual = {
        name: problem.params[name].detach() - problem.inner_lr * g if g is not None else problem.params[name].detach()
        for name, g in zip(leaves, grads, strict=True)
    }
    return virtual, per_sample_loss, logits.detach(), weights, rng, _kept(problem, leaves, logits, grads)


def _kept(problem: Lookahead, leaves: dict, logits: torch.Tensor, grads) -> tuple:
    """(training_forward, training_gradient) for ``MetaGradient``, as ``problem.keep`` asks."""
    if problem.keep == "forward":
        return TrainingForward(leaves, logits), None
    if problem.keep == "gradient":
        # None where the loss does not reach a parameter: the optimizer then leaves it alone, as after backward()
        return None, {name: None if g is None else g.detach() for name, g in zip(leaves, grads, strict=True)}
    return None, None


def _phi_grads_from_directional(problem: Lookahead, weights: torch.Tensor, directional: torch.Tensor) -> dict:
    """dL_v/dphi = -(a/N) sum_i (dw_i/dphi) s_i: one VJP of the weight network."""
    names, phi = _weight_net_params(problem)
    n = problem.targets.shape[0]
    grads = torch.autograd.grad(
        weights, phi, grad_outputs=(-(problem.inner_lr / n) * directional).to(weights.dtype), allow_unused=True
    )
    return {name: torch.zeros_like(p) if g is None else g for name, p, g in zip(names, phi, grads, strict=True)}


# --------------------------------------------------------------------------- strategies


def exact_meta_gradient(problem: Lookahead) -> MetaGradient:
    """The reference: unrolled virtual step with create_graph, double backward (reference loss kernel)."""
    leaves = {name: t.detach().requires_grad_(True) for name, t in problem.params.items()}
    logits = problem.model_fn(leaves, problem.inputs)  # (N, K)
    with torch.no_grad():
        per_sample_loss = weighted_cross_entropy(logits, problem.targets, reduction="none", backend="reference")
    weights = _weights(problem, per_sample_loss, logits)  # (N,)
    loss = weighted_cross_entropy(logits, problem.targets, weights, backend="reference")
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    virtual = {
        name: leaves[name] if g is None else leaves[name] - problem.inner_lr * g
        for name, g in zip(leaves, grads, strict=True)
    }
    meta_logits = problem.model_fn(virtual, problem.meta_inputs)  # (M, K)
    meta_loss = weighted_cross_entropy(meta_logits, problem.meta_targets, backend="reference")
    names, phi = _weight_net_params(problem)
    phi_grads = torch.autograd.grad(meta_loss, phi, allow_unused=True, retain_graph=problem.keep == "forward")
    return MetaGradient(
        {name: torch.zeros_like(p) if g is None else g for name, p, g in zip(names, phi, phi_grads, strict=True)},
        meta_loss.detach(),
        per_sample_loss,
        weights.detach(),
        *_kept(problem, leaves, logits, grads),
    )


def directional_meta_gradient(problem: Lookahead, *, backend: str | None = None) -> MetaGradient:
    """The identity with s_i from one forward-mode pass at theta (no second-order graph)."""
    virtual, per_sample_loss, _, weights, rng, kept = _virtual_step(problem, backend)
    meta_loss, direction = _meta_loss_and_direction(problem, virtual, backend)
    del virtual
    with _replayed_randomness(rng):
        out = per_sample_directional_derivative(
            problem.model_fn, problem.params, problem.inputs, problem.targets, direction, backend=backend
        )
    return MetaGradient(
        _phi_grads_from_directional(problem, weights, out.directional),
        meta_loss,
        per_sample_loss,
        weights.detach(),
        *kept,
    )


def default_one_sided_eps(direction: Params) -> float:
    """One-sided step: ``eps = 0.3 sqrt(u) / ||g||``, a shift eps * g of norm 0.3 sqrt(u) (fp32: 1.0e-4).

    A fixed shift norm, not one relative to ||theta||: ReLU networks lose
    accuracy to kink crossings faster than to rounding. Measured (fp32, relative
    error of dL_v/dphi vs exact, 2 seeds, shift norms 1e-1 .. 3e-7): the error
    falls with the shift down to ~1e-4 and rises below it from rounding: at
    1e-4, 7e-5 / 2.7e-4 (8x8 tanh CNN), 4.2e-3 / 2.7e-4 (cnn-small, 16x16,
    N=64), 3.2e-2 / 1.3e-2 (resnet18, BatchNorm, N=8); a shift of 6e-3 (the
    sqrt(u)(1 + ||theta||) rule) gave 0.35 on cnn-small.
    """
    dtype = next(iter(direction.values())).dtype
    g_norm = math.sqrt(sum(float(torch.linalg.vector_norm(t.detach())) ** 2 for t in direction.values()))
    if g_norm == 0.0:
        return 0.0
    return 0.3 * math.sqrt(torch.finfo(dtype).eps) / g_norm


def finite_difference_meta_gradient(
    problem: Lookahead, *, eps: float | None = None, backend: str | None = None
) -> MetaGradient:
    """The identity with the logit tangent from one extra forward at theta + eps g (one-sided).

    u = (z(theta + eps g) - z(theta)) / eps approximates J g; s_i = <softmax(z_i) -
    onehot(y_i), u_i> (the fused row dot). Differencing logits rather than losses
    leaves only the network's own curvature in the error, not the cross-entropy's.
    """
    virtual, per_sample_loss, logits, weights, rng, kept = _virtual_step(problem, backend)
    meta_loss, direction = _meta_loss_and_direction(problem, virtual, backend)
    del virtual
    step = default_one_sided_eps(direction) if eps is None else float(eps)
    if step == 0.0:
        directional = torch.zeros_like(per_sample_loss)
    else:
        shifted = {name: t.detach() + step * direction[name] for name, t in problem.params.items()}
        with torch.no_grad(), _replayed_randomness(rng):
            shifted_logits = problem.model_fn(shifted, problem.inputs)  # (N, K)
        tangent = (shifted_logits.float() - logits.float()) / step  # (N, K)
        directional = weighted_cross_entropy(logits, problem.targets, tangent=tangent, backend=backend).directional
    return MetaGradient(
        _phi_grads_from_directional(problem, weights, directional),
        meta_loss,
        per_sample_loss,
        weights.detach(),
        *kept,
    )


META_GRADIENTS: dict[str, Callable[[Lookahead], MetaGradient]] = {
    "exact": exact_meta_gradient,
    "directional": directional_meta_gradient,
    "finite_difference": finite_difference_meta_gradient,
}


def meta_gradient(problem: Lookahead, strategy: str = "directional") -> MetaGradient:
    """dL_v(theta')/dphi by the named strategy (a key of ``META_GRADIENTS``)."""
    try:
        compute = META_GRADIENTS[strategy]
    except KeyError:
        raise ValueError(
            f"unknown meta-gradient strategy {strategy!r}; choose one of {sorted(META_GRADIENTS)}"
        ) from None
    return compute(problem)
