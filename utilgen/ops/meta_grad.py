"""Meta-gradient products for TODV without a stored second-order graph (docs/method.md, "TODV").

Two strategies, each tested against exact double backward:

- ``hvp(loss_fn, params, v, method=...)``: Hessian-vector product of a scalar
  loss w.r.t. a dict of parameters, exactly (double backward), by
  forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), or by a
  central finite difference whose peak memory is about one gradient's.
- ``per_sample_directional_derivative(model_fn, params, inputs, targets, g)``:
  s_i = <grad_theta l_i(theta), g> for the per-sample cross-entropy losses, by
  one forward-mode pass (the logit tangent u = J g) and the fused row dot
  s_i = <softmax(z_i) - onehot(y_i), u_i> of ``weighted_cross_entropy``.

With the second, the one-step look-ahead meta-gradient of Meta-Weight-Net is

    dL_v(theta')/dphi = -(a/N) sum_i (dw_i/dphi) s_i,   g = grad L_v(theta'),

i.e. one vector-Jacobian product of the weight network with -(a/N) s: no
graph through the virtual step (tests/test_meta_grad.py checks the identity
against the unrolled double backward).

``params`` dicts map names to tensors as ``torch.func.functional_call`` takes
them; ``loss_fn(params)`` / ``model_fn(params, inputs)`` must compute from the
tensors of the dict they receive.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from utilgen.ops.weighted_cross_entropy import weighted_cross_entropy

HVP_METHODS = ("exact", "forward_over_reverse", "finite_difference")

Params = Mapping[str, torch.Tensor]

# Elements per slice when the finite difference shifts parameters in place: the
# temporaries of a shift (and of planning the exact restore) stay this small
# instead of one whole parameter tensor.
_SHIFT_CHUNK = 1 << 18


# --------------------------------------------------------------------------- hvp


def hvp(
    loss_fn: Callable[[Params], torch.Tensor],
    params: Params,
    v: Params,
    *,
    method: str = "exact",
    eps: float | None = None,
) -> dict[str, torch.Tensor]:
    """Hessian of the scalar ``loss_fn(params)`` w.r.t. ``params``, times ``v``.

    Args:
        loss_fn: params dict -> scalar loss.
        params: name -> tensor. ``finite_difference`` shifts these tensors in
            place (they must be leaf tensors, e.g. ``dict(model.named_parameters())``)
            and restores them bit-exactly; the other methods do not touch them.
        v: name -> tensor of the same shapes (the same keys as ``params``).
        method: ``exact`` (double backward: the reference; keeps the gradient's
            graph alive), ``forward_over_reverse`` (``torch.func.jvp`` over
            ``torch.func.grad``; no retained graph but dual tensors of every
            activation), or ``finite_difference`` (two gradients, peak memory
            about one gradient's; see ``default_fd_eps`` for the step). The
            finite difference needs a smooth loss: on ReLU networks the gradient
            jumps at kinks, and with many units some cross one at any step
            (relative error 0.2-26 in fp32 on cnn-small, batch 128;
            utilgen/valuation/multistep.py), so use it on smooth networks only.
        eps: finite-difference step (perturbation eps * v); None for the default.

    Returns:
        name -> H v, shaped like ``params``.
    """
    names = _check_dicts(params, v, "hvp", "v")
    if method == "exact":
        return _hvp_exact(loss_fn, params, v, names)
    if method == "forward_over_reverse":
        return _hvp_forward_over_reverse(loss_fn, params, v, names)
    if method == "finite_difference":
        return _hvp_finite_difference(loss_fn, params, v, names, eps)
    raise ValueError(f"hvp: method must be one of {HVP_METHODS}, got {method!r}")


def _hvp_exact(loss_fn, params, v, names):
    leaves = {name: params[name].detach().requires_grad_(True) for name in names}
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
    used = [(name, g) for name, g in zip(names, grads, strict=True) if g is not None and g.requires_grad]
    products = (
        torch.autograd.grad(
            [g for _, g in used],
            [leaves[name] for name in names],
            grad_outputs=[v[name] for name, _ in used],
            allow_unused=True,
        )
        if used
        else [None] * len(names)
    )
    return {name: _or_zeros(h, params[name]) for name, h in zip(names, products, strict=True)}


def _hvp_forward_over_reverse(loss_fn, params, v, names):
    primals = {name: params[name].detach() for name in names}
    tangents = {name: v[name].detach().to(params[name].dtype) for name in names}
    _, products = torch.func.jvp(torch.func.grad(loss_fn), (primals,), (tangents,))
    return {name: products[name] for name in names}


def default_fd_eps(params: Params, v: Params) -> float:
    """Central-difference step: ``eps = u^(1/3) (1 + ||theta||) / ||v||``.

    u is the machine epsilon of the parameters' dtype (fp32: u^(1/3) = 4.9e-3;
    fp64: 6.1e-6). The central difference has truncation error O(eps^2) and
    rounding error O(u / eps) (relative), balanced at eps ~ u^(1/3); scaling by
    ||theta|| / ||v|| makes the perturbation eps * v a fixed fraction of the
    parameters' size, so the step does not depend on how v is normalised.
    """
    dtype = next(iter(params.values())).dtype
    unit_roundoff = torch.finfo(dtype).eps
    # Per-tensor norms in the tensors' own dtype: no upcast copy (a float64 copy
    # of a 2048x2048 layer cost 126 ms and 64 MB here), and a step needs no
    # more precision than that.
    theta_norm = math.sqrt(sum(float(torch.linalg.vector_norm(t.detach())) ** 2 for t in params.values()))
    v_norm = math.sqrt(sum(float(torch.linalg.vector_norm(t.detach())) ** 2 for t in v.values()))
    if v_norm == 0.0:
        return 0.0
    return unit_roundoff ** (1.0 / 3.0) * (1.0 + theta_norm) / v_norm


def _hvp_finite_difference(loss_fn, params, v, names, eps):
    """(g(theta + eps v) - g(theta - eps v)) / (2 eps) with one gradient's memory.

    Both gradients accumulate into the parameters' ``.grad`` buffers: the first
    backward leaves g+ there, it is negated in place, and the second backward
    adds g- into the same buffers in place (AccumulateGrad adds in place when
    nothing else holds the buffer), so no second full gradient is ever alive;
    only one parameter's freshly computed gradient exists at a time. The result
    is scaled in place and handed out; the caller's ``.grad`` and
    ``requires_grad`` are put back.

    Restoring theta: the shifts run as theta+d, -d (back), -d, +d (back), with
    d = eps * v computed identically each time. Within a binade x + d - d == x
    exactly; elements where it is not (a binade crossing, |x| below |d|'s
    precision, a rounding tie) are found before anything moves, by replaying
    the same four additions out of place, and their original values are kept
    (a sparse list: 9 of 452 fp32 elements of the test MLP, 1.5% of the 12.6M
    of benchmarks/bench_hvp.py at the default step, none in fp64) and written back.
    So theta is restored bit-exactly.
    """
    tensors = [params[name] for name in names]
    directions = [v[name] for name in names]
    for name, tensor in zip(names, tensors, strict=True):
        if not tensor.is_leaf:
            raise ValueError(
                f"hvp(method='finite_difference'): params[{name!r}] is not a leaf tensor; it is shifted in place "
                "and its gradient accumulates in .grad: pass leaves such as dict(model.named_parameters()) "
                "or {k: t.detach() for k, t in params.items()}"
            )
    step = default_fd_eps(params, v) if eps is None else float(eps)
    if step == 0.0:
        return {name: torch.zeros_like(params[name]) for name in names}

    saved_grads = [t.grad for t in tensors]
    saved_requires_grad = [t.requires_grad for t in tensors]
    restore_lists = _plan_exact_restore(tensors, directions, step)
    try:
        for t in tensors:
            t.grad = None
            t.requires_grad_(True)
        _shift(tensors, directions, +step)  # theta + d
        _accumulate_gradient(loss_fn, params, tensors)  # .grad = g+
        _shift(tensors, directions, -step)  # theta
        with torch.no_grad():
            for t in tensors:
                if t.grad is not None:
                    t.grad.neg_()  # .grad = -g+
        _shift(tensors, directions, -step)  # theta - d
        _accumulate_gradient(loss_fn, params, tensors)  # .grad = g- - g+
        _shift(tensors, directions, +step)  # theta
        products = {}
        with torch.no_grad():
            for name, t in zip(names, tensors, strict=True):
                products[name] = torch.zeros_like(t) if t.grad is None else t.grad.mul_(-0.5 / step)
    finally:
        _apply_exact_restore(tensors, restore_lists)
        for t, grad, requires_grad in zip(tensors, saved_grads, saved_requires_grad, strict=True):
            t.grad = grad
            t.requires_grad_(requires_grad)
    return products


def _accumulate_gradient(loss_fn, params, tensors):
    loss = loss_fn(params)
    torch.autograd.backward(loss, inputs=tensors)


def _chunks(tensor: torch.Tensor, direction: torch.Tensor):
    """Matching flat slices of a parameter and its direction."""
    flat, flat_direction = tensor.view(-1), direction.reshape(-1)
    for start in range(0, flat.numel(), _SHIFT_CHUNK):
        yield start, flat[start : start + _SHIFT_CHUNK], flat_direction[start : start + _SHIFT_CHUNK]


def _scaled(direction_chunk: torch.Tensor, step: float, dtype: torch.dtype) -> torch.Tensor:
    # The same expression everywhere, so the planned and the real shifts agree bit for bit.
    return direction_chunk.mul(step).to(dtype)


@torch.no_grad()
def _shift(tensors, directions, step):
    for tensor, direction in zip(tensors, directions, strict=True):
        for _, chunk, direction_chunk in _chunks(tensor, direction):
            chunk.add_(_scaled(direction_chunk, step, tensor.dtype))


_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


@torch.no_grad()
def _plan_exact_restore(tensors, directions, step):
    """Per tensor: (flat indices, original values) where x+d-d-d+d would not give x back."""
    plans = []
    for tensor, direction in zip(tensors, directions, strict=True):
        bits = _BITS[tensor.dtype]
        index_dtype = torch.int32 if tensor.numel() < 2**31 else torch.int64
        indices, values = [], []
        for start, chunk, direction_chunk in _chunks(tensor, direction):
            d = _scaled(direction_chunk, step, tensor.dtype)
            replay = chunk + d  # the same four additions as the real shifts, in place on one temporary
            replay.sub_(d).sub_(d).add_(d)
            where = (replay.view(bits) != chunk.view(bits)).nonzero().squeeze(1)
            if where.numel():
                # int32 indices: 8 instead of 12 bytes per kept fp32 value (the plan is ~1.5% of the
                # elements at the default step, so it costs ~2.5% of one gradient instead of ~5%).
                indices.append((where + start).to(index_dtype))
                values.append(chunk[where])
        empty = torch.empty(0, dtype=index_dtype, device=tensor.device)
        plans.append((torch.cat(indices) if indices else empty, torch.cat(values) if values else tensor.new_empty(0)))
    return plans


@torch.no_grad()
def _apply_exact_restore(tensors, plans):
    for tensor, (indices, values) in zip(tensors, plans, strict=True):
        tensor.view(-1)[indices] = values


def _or_zeros(value, like):
    return torch.zeros_like(like) if value is None else value


def _check_dicts(params, other, who, other_name) -> list[str]:
    names = list(params)
    if set(other) != set(names):
        missing, extra = sorted(set(names) - set(other)), sorted(set(other) - set(names))
        raise ValueError(f"{who}: {other_name} must have the keys of params; missing {missing}, unexpected {extra}")
    for name in names:
        if other[name].shape != params[name].shape:
            raise ValueError(
                f"{who}: {other_name}[{name!r}] has shape {tuple(other[name].shape)}, params[{name!r}] has "
                f"{tuple(params[name].shape)}"
            )
        if not params[name].is_floating_point():
            raise TypeError(f"{who}: params[{name!r}] must be floating point, got {params[name].dtype}")
    return names


# --------------------------------------------------------------------------- per-sample directional derivatives


class PerSampleDirectional(NamedTuple):
    directional: torch.Tensor  # (N,) float32: s_i = <grad_theta l_i(theta), g>
    per_sample_loss: torch.Tensor  # (N,) float32: l_i(theta), the weight network's input


def per_sample_directional_derivative(
    model_fn: Callable[[Params, torch.Tensor], torch.Tensor],
    params: Params,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    direction: Params,
    *,
    backend: str | None = None,
) -> PerSampleDirectional:
    """s_i = <grad_theta l_i(theta), g> for per-sample cross-entropy losses, by forward mode.

    One ``torch.func.jvp`` of ``model_fn(params, inputs) -> logits (N, K)``
    along ``direction`` gives the logit tangent u = J g (N, K); then
    s_i = <softmax(z_i) - onehot(y_i), u_i>, fused with the loss itself in
    ``weighted_cross_entropy(..., tangent=u)``. Nothing is differentiable:
    the result feeds a vector-Jacobian product of the weight network.

    Args:
        model_fn: (params, inputs) -> logits (N, K).
        params: name -> tensor (theta); not modified.
        inputs: the batch (N, ...).
        targets: (N,) int64 class indices.
        direction: name -> tensor g, the keys and shapes of ``params``.
        backend: ``weighted_cross_entropy``'s backend (None: the default choice).

    Returns:
        ``PerSampleDirectional(directional (N,), per_sample_loss (N,))``, float32, detached.
    """
    names = _check_dicts(params, direction, "per_sample_directional_derivative", "direction")
    primals = {name: params[name].detach() for name in names}
    tangents = {name: direction[name].detach().to(params[name].dtype) for name in names}
    logits, logit_tangent = torch.func.jvp(lambda p: model_fn(p, inputs), (primals,), (tangents,))  # (N, K) each
    if logits.dim() != 2 or targets.shape != (logits.shape[0],):
        raise ValueError(
            f"per_sample_directional_derivative: model_fn must return (N, K) logits for the N={targets.shape[0]} "
            f"targets, got logits of shape {tuple(logits.shape)}"
        )
    out = weighted_cross_entropy(
        logits.detach().contiguous(),
        targets,
        tangent=logit_tangent.detach().contiguous(),
        return_per_sample=True,
        backend=backend,
    )
    return PerSampleDirectional(out.directional, out.per_sample_loss)
