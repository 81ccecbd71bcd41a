"""Fused per-sample-weighted cross-entropy: TODV's weighted loss (docs/method.md, "TODV").

    l_i  = logsumexp(z_i) - z_{i, y_i}                      per-sample loss, (N,)
    loss = sum_i w_i l_i / N      (mean)                    weights are NOT renormalised:
         = sum_i w_i l_i          (sum)                     the bi-level objective is
         = w_i l_i                (none, (N,))              (1/N) sum_i W(l_i) l_i
    s_i  = <softmax(z_i) - onehot(y_i), u_i>                optional, for a tangent u (N, K)

Backward gives gradients for the logits AND the weights (the weights carry the
meta-gradient to the weight network):

    dloss/dz_i = g_i w_i (softmax(z_i) - onehot(y_i)),   dloss/dw_i = g_i l_i,

with g_i = grad_output (/N for mean). The kernels read the logits once in the
forward (online logsumexp, also accumulating s_i) and once more in the backward,
which recomputes the softmax from the saved logsumexp and writes the gradient:
two reads and one write of (N, K), nothing of size (N, K) saved (CUDA, Triton).
On CPU the exp, not memory, is the cost, so the C++ forward writes the
gradient for grad_output = 1 while the softmax is at hand, and the backward
only scales it: one exp per logit instead of two. No host synchronisation in
either direction.

s_i is the per-sample directional derivative of l_i along the parameter
direction whose logit tangent is u_i (u = J g): the one quantity the
memory-efficient TODV meta-gradient needs (see ``utilgen.ops.meta_grad``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from utilgen import _native
from utilgen._describe import describe
from utilgen.ops import _backend

SUPPORT = _backend.OpSupport("weighted_cross_entropy")

# The op and its custom op take these names; the C++/CUDA kernels get the codes the extension
# exports for them (utilgen._C.Reduction, defined once in csrc/weighted_cross_entropy.h).
REDUCTIONS = ("none", "mean", "sum")


class WeightedCrossEntropyOutput(NamedTuple):
    loss: torch.Tensor  # () for mean/sum, (N,) for none; float32
    per_sample_loss: torch.Tensor  # (N,) float32, detached: the weight network's input
    directional: torch.Tensor | None  # (N,) float32, detached; None without a tangent


# --------------------------------------------------------------------------- reference


def weighted_cross_entropy_reference(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    tangent: torch.Tensor | None = None,
) -> WeightedCrossEntropyOutput:
    """fp32 PyTorch reference: the spec, the CPU fallback and the test oracle.

    Shapes: logits (N, K) any float dtype, target (N,) int64 in [0, K),
    weight (N,) or None (all ones), tangent (N, K) or None. Differentiable to
    any order (the exact double-backward meta-gradient runs through it).
    """
    z = logits.float()  # (N, K)
    lse = torch.logsumexp(z, dim=1)  # (N,)
    per_sample = lse - z.gather(1, target.unsqueeze(1)).squeeze(1)  # (N,)
    weighted = per_sample if weight is None else weight.float() * per_sample  # (N,)
    loss = _reduce(weighted, reduction)
    directional = None
    if tangent is not None:
        with torch.no_grad():
            residual = torch.softmax(z, dim=1) - F.one_hot(target, z.shape[1]).float()  # (N, K)
            directional = (residual * tangent.float()).sum(dim=1)  # (N,)
    return WeightedCrossEntropyOutput(loss, per_sample.detach(), directional)


def _reduce(weighted: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return weighted.sum() / weighted.shape[0]
    if reduction == "sum":
        return weighted.sum()
    return weighted


# --------------------------------------------------------------------------- public API


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    tangent: torch.Tensor | None = None,
    return_per_sample: bool = False,
    backend: str | None = None,
) -> torch.Tensor | WeightedCrossEntropyOutput:
    """Per-sample-weighted cross-entropy, fused forward and backward.

    Args:
        logits: (N, K) float32 (any backend) or float16/bfloat16 (CUDA, Triton).
        target: (N,) int64 class indices in [0, K).
        weight: (N,) per-sample weights, or None for all ones. Gradients flow
            to it when it requires grad.
        reduction: "mean" (sum of w_i l_i over N), "sum", or "none" ((N,)).
        tangent: optional (N, K) logit tangent u; adds the per-sample
            directional derivatives s_i = <softmax(z_i) - onehot(y_i), u_i>.
        return_per_sample: also return the (detached) per-sample losses.
        backend: "auto" | "reference" | "cpp" | "cuda" | "triton"; default from
            ``use_backend`` / UTILGEN_BACKEND (see ``utilgen.ops.info()``).

    Returns:
        The loss (float32), or a ``WeightedCrossEntropyOutput(loss,
        per_sample_loss, directional)`` when ``return_per_sample`` or a
        ``tangent`` is given.

    The kernel backward is once-differentiable; second-order use (the exact
    meta-gradient) must take ``backend="reference"``.
    """
    weight = _check_inputs(logits, target, weight, reduction, tangent)
    chosen = _backend.resolve(SUPPORT, logits, backend)
    if chosen == "reference":
        out = weighted_cross_entropy_reference(logits, target, weight, reduction, tangent=tangent)
    else:
        needs_grad = torch.is_grad_enabled() and (logits.requires_grad or weight.requires_grad)
        loss, per_sample, _lse, directional, _grad_cache = torch.ops.utilgen.weighted_cross_entropy(
            logits, target, weight, tangent, reduction, needs_grad, chosen
        )
        out = WeightedCrossEntropyOutput(loss, per_sample, directional if tangent is not None else None)
    if return_per_sample or tangent is not None:
        return out
    return out.loss


def _check_inputs(logits, target, weight, reduction, tangent) -> torch.Tensor:
    """Validate shapes, dtypes and devices; return the (N,) weight (ones if None)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"weighted_cross_entropy: logits must be a (N, K) tensor, got {describe(logits)}")
    n, k = logits.shape
    if n == 0 or k == 0:
        raise ValueError(f"weighted_cross_entropy: logits must be non-empty, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"weighted_cross_entropy: logits must be floating point, got {logits.dtype}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"weighted_cross_entropy: reduction must be one of {sorted(REDUCTIONS)}, got {reduction!r}")
    if not isinstance(target, torch.Tensor) or target.shape != (n,):
        raise ValueError(
            f"weighted_cross_entropy: target must have shape ({n},) to match logits, got {describe(target)}"
        )
    if target.dtype != torch.int64:
        raise TypeError(
            f"weighted_cross_entropy: target must be int64 class indices, got {target.dtype}; use target.long()"
        )
    if weight is None:
        weight = torch.ones(n, device=logits.device, dtype=torch.float32)
    elif not isinstance(weight, torch.Tensor) or weight.shape != (n,):
        raise ValueError(f"weighted_cross_entropy: weight must have shape ({n},), got {describe(weight)}")
    elif not weight.is_floating_point():
        raise TypeError(f"weighted_cross_entropy: weight must be floating point, got {weight.dtype}")
    if tangent is not None and (not isinstance(tangent, torch.Tensor) or tangent.shape != logits.shape):
        raise ValueError(
            f"weighted_cross_entropy: tangent must have the logits' shape {tuple(logits.shape)}, "
            f"got {describe(tangent)}"
        )
    for name, tensor in (("target", target), ("weight", weight), ("tangent", tangent)):
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(
                f"weighted_cross_entropy: {name} is on {tensor.device} but logits are on {logits.device}; "
                "move them to one device"
            )
    return weight


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("utilgen::weighted_cross_entropy", mutates_args=())
def _weighted_cross_entropy_op(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    tangent: torch.Tensor | None,
    reduction: str,
    compute_grad: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss, per_sample_loss (N,), lse (N,), directional (N,) or (0,), grad_cache).

    grad_cache is d loss / d logits for grad_output = 1, (N, K) float32, when
    ``compute_grad`` and the C++ kernel runs; (0,) otherwise (the backward
    recomputes the softmax from lse).
    """
    raise NotImplementedError(f"utilgen::weighted_cross_entropy has no kernel for {logits.device.type} tensors")


def _reduction_code(reduction: str) -> int:
    """The extension's code for a reduction name."""
    return getattr(_native.extension().Reduction, reduction).value


def _caches_grad(logits: torch.Tensor, compute_grad: bool, backend: str) -> bool:
    return compute_grad and backend == "cpp" and logits.device.type == "cpu"


@_weighted_cross_entropy_op.register_fake
def _(logits, target, weight, tangent, reduction, compute_grad, backend):
    n = logits.shape[0]
    loss = logits.new_empty((n,) if reduction == "none" else (), dtype=torch.float32)
    per_sample = logits.new_empty((n,), dtype=torch.float32)
    directional = logits.new_empty((n,) if tangent is not None else (0,), dtype=torch.float32)
    grad_cache = logits.new_empty(
        logits.shape if _caches_grad(logits, compute_grad, backend) else (0,), dtype=torch.float32
    )
    return loss, per_sample, torch.empty_like(per_sample), directional, grad_cache


def _forward_outputs(logits, reduction, with_tangent, with_grad=False):
    n = logits.shape[0]
    f32 = {"device": logits.device, "dtype": torch.float32}
    loss = torch.empty((n,) if reduction == "none" else (), **f32)
    per_sample = torch.empty((n,), **f32)
    lse = torch.empty((n,), **f32)
    directional = torch.empty((n,) if with_tangent else (0,), **f32)
    grad_cache = torch.empty(logits.shape if with_grad else (0,), **f32)
    return loss, per_sample, lse, directional, grad_cache


@_weighted_cross_entropy_op.register_kernel("cpu")
def _(logits, target, weight, tangent, reduction, compute_grad, backend):
    if backend == "triton":
        return _forward_triton(logits, target, weight, tangent, reduction)
    if backend != "cpp":
        return _forward_via_reference(logits, target, weight, tangent, reduction)
    logits, weight = logits.contiguous(), weight.float().contiguous()
    tangent = None if tangent is None else tangent.float().contiguous()
    target = target.contiguous()
    with_grad = _caches_grad(logits, compute_grad, backend)
    loss, per_sample, lse, directional, grad_cache = _forward_outputs(logits, reduction, tangent is not None, with_grad)
    _native.extension().weighted_cross_entropy_fwd_cpu(
        _native.ptr(logits),
        _native.ptr(target),
        _native.ptr(weight),
        _native.ptr(tangent),
        logits.shape[0],
        logits.shape[1],
        _reduction_code(reduction),
        _native.ptr(loss),
        _native.ptr(per_sample),
        _native.ptr(lse),
        _native.ptr(directional),
        _native.ptr(grad_cache) if with_grad else 0,
        _native.cpu_threads(),
    )
    return loss, per_sample, lse, directional, grad_cache


@_weighted_cross_entropy_op.register_kernel("cuda")
def _(logits, target, weight, tangent, reduction, compute_grad, backend):
    if backend == "triton":
        with torch.cuda.device(logits.device):  # Triton launches on the current device
            return _forward_triton(logits, target, weight, tangent, reduction)
    if backend != "cuda":
        return _forward_via_reference(logits, target, weight, tangent, reduction)
    logits, target = logits.contiguous(), target.contiguous()
    weight = weight.float().contiguous()
    tangent = None if tangent is None else tangent.to(logits.dtype).contiguous()
    loss, per_sample, lse, directional, grad_cache = _forward_outputs(logits, reduction, tangent is not None)
    module = _native.extension()
    blocks = module.weighted_cross_entropy_cuda_blocks(logits.shape[0])
    partials = torch.empty(blocks, device=logits.device, dtype=torch.float32)
    counter = torch.zeros(1, device=logits.device, dtype=torch.int32)
    # Python custom ops get no device guard: launch on the logits' device, not the current one.
    with torch.cuda.device(logits.device):
        module.weighted_cross_entropy_fwd_cuda(
            _native.ptr(logits),
            _native.ptr(target),
            _native.ptr(weight),
            _native.ptr(tangent),
            logits.shape[0],
            logits.shape[1],
            _reduction_code(reduction),
            _native.dtype_code(logits),
            _native.ptr(loss),
            _native.ptr(per_sample),
            _native.ptr(lse),
            _native.ptr(directional),
            _native.ptr(partials),
            _native.ptr(counter),
            _native.cuda_stream(logits),
        )
    return loss, per_sample, lse, directional, grad_cache


def _forward_via_reference(logits, target, weight, tangent, reduction):
    """Any device without a kernel (and backend='reference' reaching the op)."""
    out = weighted_cross_entropy_reference(logits, target, weight, reduction, tangent=tangent)
    z = logits.float()
    lse = out.per_sample_loss + z.gather(1, target.unsqueeze(1)).squeeze(1)  # l_i = lse_i - z_{i, y_i}
    directional = out.directional if out.directional is not None else z.new_empty((0,))
    return out.loss.detach().clone(), out.per_sample_loss.clone(), lse, directional, z.new_empty((0,))


def _forward_triton(logits, target, weight, tangent, reduction):
    from utilgen.kernels import weighted_cross_entropy as triton_kernels

    logits, target = logits.contiguous(), target.contiguous()
    weight = weight.float().contiguous()
    tangent = None if tangent is None else tangent.contiguous()
    _, per_sample, lse, directional, grad_cache = _forward_outputs(logits, "none", tangent is not None)
    triton_kernels.forward(logits, target, tangent, per_sample, lse, directional)
    loss = _reduce(weight * per_sample, reduction)
    return loss, per_sample, lse, directional, grad_cache


# --------------------------------------------------------------------------- backward


@torch.library.custom_op("utilgen::weighted_cross_entropy_backward", mutates_args=())
def _weighted_cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    per_sample: torch.Tensor,
    lse: torch.Tensor,
    reduction: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (grad_logits (N, K) in the logits' dtype, grad_weight (N,) float32)."""
    raise NotImplementedError(
        f"utilgen::weighted_cross_entropy_backward has no kernel for {logits.device.type} tensors"
    )


@_weighted_cross_entropy_backward_op.register_fake
def _(grad_loss, logits, target, weight, per_sample, lse, reduction, backend):
    return torch.empty_like(logits), per_sample.new_empty(per_sample.shape)


def _row_scale(grad_loss: torch.Tensor, reduction: str, n: int) -> tuple[torch.Tensor, bool, float]:
    """grad_loss as float32 plus how to read it: per row (none) or one scalar times `scale`."""
    per_row = reduction == "none"
    scale = 1.0 / n if reduction == "mean" else 1.0
    return grad_loss.float().contiguous(), per_row, scale


@_weighted_cross_entropy_backward_op.register_kernel("cpu")
def _(grad_loss, logits, target, weight, per_sample, lse, reduction, backend):
    # The C++ forward caches the gradient, so only the Triton interpreter and
    # the reference recompute it on CPU.
    if backend == "triton":
        return _backward_triton(grad_loss, logits, target, weight, per_sample, lse, reduction)
    return _backward_via_reference(grad_loss, logits, target, weight, per_sample, lse, reduction)


@_weighted_cross_entropy_backward_op.register_kernel("cuda")
def _(grad_loss, logits, target, weight, per_sample, lse, reduction, backend):
    if backend == "triton":
        with torch.cuda.device(logits.device):  # Triton launches on the current device
            return _backward_triton(grad_loss, logits, target, weight, per_sample, lse, reduction)
    if backend != "cuda":
        return _backward_via_reference(grad_loss, logits, target, weight, per_sample, lse, reduction)
    logits, target, weight = logits.contiguous(), target.contiguous(), weight.float().contiguous()
    grad, per_row, scale = _row_scale(grad_loss, reduction, logits.shape[0])
    grad_logits = torch.empty_like(logits)
    grad_weight = torch.empty_like(per_sample)
    # Python custom ops get no device guard: launch on the logits' device, not the current one.
    with torch.cuda.device(logits.device):
        _native.extension().weighted_cross_entropy_bwd_cuda(
            _native.ptr(grad),
            per_row,
            scale,
            _native.ptr(logits),
            _native.ptr(target),
            _native.ptr(weight),
            _native.ptr(per_sample),
            _native.ptr(lse),
            logits.shape[0],
            logits.shape[1],
            _native.dtype_code(logits),
            _native.ptr(grad_logits),
            _native.ptr(grad_weight),
            _native.cuda_stream(logits),
        )
    return grad_logits, grad_weight


def _backward_via_reference(grad_loss, logits, target, weight, per_sample, lse, reduction):
    z = logits.float()  # (N, K)
    g = grad_loss.float() / z.shape[0] if reduction == "mean" else grad_loss.float()  # () or (N,)
    residual = torch.exp(z - lse.unsqueeze(1)) - F.one_hot(target, z.shape[1]).float()  # (N, K)
    grad_logits = (g * weight.float()).unsqueeze(-1) * residual  # (N, K)
    return grad_logits.to(logits.dtype), g * per_sample


def _backward_triton(grad_loss, logits, target, weight, per_sample, lse, reduction):
    from utilgen.kernels import weighted_cross_entropy as triton_kernels

    logits, target, weight = logits.contiguous(), target.contiguous(), weight.float().contiguous()
    grad, per_row, scale = _row_scale(grad_loss, reduction, logits.shape[0])
    grad_logits = torch.empty_like(logits)
    grad_weight = torch.empty_like(per_sample)
    triton_kernels.backward(grad, per_row, scale, logits, target, weight, per_sample, lse, grad_logits, grad_weight)
    return grad_logits, grad_weight


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    logits, target, weight, _tangent, reduction, _compute_grad, backend = inputs
    _loss, per_sample, lse, directional, grad_cache = output
    ctx.save_for_backward(logits, target, weight, per_sample, lse, grad_cache)
    ctx.reduction, ctx.backend = reduction, backend
    ctx.mark_non_differentiable(per_sample, lse, directional, grad_cache)
    # Gradients of the non-differentiable outputs stay None instead of being
    # materialised as zeros: an (N, K) zero fill per backward was 30% of the
    # step at N=8192, K=100.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, _grad_per_sample, _grad_lse, _grad_directional, _grad_cache):
    if torch.is_grad_enabled():
        raise RuntimeError(
            "weighted_cross_entropy: the fused kernel backward is once-differentiable "
            "(create_graph=True reached it); second-order use such as the exact "
            "meta-gradient must call it with backend='reference'"
        )
    logits, target, weight, per_sample, lse, grad_cache = ctx.saved_tensors
    if grad_cache.numel() > 0:
        # The C++ forward wrote d loss / d logits for grad_output = 1 (mean's 1/N
        # included). Scale it in place (we own it; a second backward through
        # this graph then fails autograd's saved-tensor version check loudly),
        # and not at all for the usual loss.backward(): on CPU, reading the
        # scalar costs no device sync, and skipping the pass saved 0.5 ms of
        # 2 ms at N=8192, K=100 (2-core Xeon).
        # Tracers (torch.compile, opcheck) see tensor subclasses and get the
        # functional form.
        g = grad_loss.float()  # () for mean/sum, (N,) for none
        g_rows = g.unsqueeze(1) if ctx.reduction == "none" else g
        if type(grad_cache) is not torch.Tensor:
            grad_logits = grad_cache * g_rows
        else:
            if ctx.reduction == "none" or g.item() != 1.0:
                grad_cache.mul_(g_rows)
            grad_logits = grad_cache
        grad_weight = (g / per_sample.shape[0] if ctx.reduction == "mean" else g) * per_sample
    else:
        grad_logits, grad_weight = _weighted_cross_entropy_backward_op(
            grad_loss, logits, target, weight, per_sample, lse, ctx.reduction, ctx.backend
        )
    return (
        grad_logits.to(logits.dtype) if ctx.needs_input_grad[0] else None,
        None,
        grad_weight.to(weight.dtype) if ctx.needs_input_grad[2] else None,
        None,
        None,
        None,
        None,
    )


_weighted_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
