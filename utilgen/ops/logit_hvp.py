"""Softmax cross-entropy Hessian (w.r.t. the logits) times a vector, per row.

    p_i   = softmax(z_i)                                        (K,)
    H_i   = diag(p_i) - p_i p_i^T                               d^2 l_i / dz_i^2 for any target
    out_i = w_i H_i v_i = w_i (p_i * v_i - p_i <p_i, v_i>)      (K,)

This is the logit-space block of a Gauss-Newton / Hessian-vector product of a
(weighted) cross-entropy: with u = J v the logit tangent of a parameter
direction, J^T (H u) is the Gauss-Newton product. It does not depend on the
targets.

The kernels read z and v and write out once per element (CPU: three passes
over a cached row; CUDA: a warp per row with an online softmax; Triton:
multi-row tiles looping over K). No host synchronisation.

Autograd: H_i is symmetric and linear in v, so

    d<g, out>/dv_i = w_i H_i g_i = logit_hvp(z, g, w)_i,   d<g, out>/dw_i = <H_i g_i, v_i>,

both computed with one kernel call on g (differentiable again, since they are
this op). The gradient w.r.t. the logits is a third derivative the kernels do
not provide: pass detached logits, or use ``backend="reference"`` for it.
"""

from __future__ import annotations

import torch

from utilgen import _native
from utilgen._describe import describe
from utilgen.ops import _backend

SUPPORT = _backend.OpSupport("logit_hvp")


# --------------------------------------------------------------------------- reference


def logit_hvp_reference(logits: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 PyTorch reference (fp64 stays fp64): the spec, the fallback and the oracle.

    Shapes: logits (N, K), v (N, K), weight (N,) or None (all ones).
    Returns (N, K) in the logits' dtype. Differentiable to any order in all inputs.
    """
    compute = torch.promote_types(logits.dtype, torch.float32)
    z, u = logits.to(compute), v.to(compute)  # (N, K)
    p = torch.softmax(z, dim=1)  # (N, K)
    p_dot_v = (p * u).sum(dim=1, keepdim=True)  # (N, 1)
    out = p * u - p * p_dot_v  # (N, K)
    if weight is not None:
        out = weight.to(compute).unsqueeze(1) * out
    return out.to(logits.dtype)


# --------------------------------------------------------------------------- public API


def logit_hvp(
    logits: torch.Tensor,
    v: torch.Tensor,
    weight: torch.Tensor | None = None,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Per-row softmax-CE Hessian times ``v``: ``w_i (p_i * v_i - p_i <p_i, v_i>)``.

    Args:
        logits: (N, K) contiguous; float32 (any backend), float16/bfloat16 (CUDA, Triton).
        v: (N, K) contiguous, the logits' dtype and device.
        weight: (N,) floating per-row weights, or None for all ones.
        backend: "auto" | "reference" | "cpp" | "cuda" | "triton"; default from
            ``use_backend`` / UTILGEN_BACKEND (see ``utilgen.ops.info()``).

    Returns:
        (N, K) in the logits' dtype (fp32 math inside every kernel).

    Gradients flow to ``v`` and ``weight``; the kernels give none for ``logits``
    (a third derivative): with logits that require grad, pass ``logits.detach()``
    or ``backend="reference"``.
    """
    _check_inputs(logits, v, weight)
    chosen = _backend.resolve(SUPPORT, logits, backend)
    if chosen == "reference":
        return logit_hvp_reference(logits, v, weight)
    if logits.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"logit_hvp: the {chosen} kernel gives no gradient w.r.t. logits (a third derivative of the loss); "
            "pass logits.detach() if the Hessian is taken at fixed logits, or backend='reference' to differentiate "
            "through them"
        )
    return torch.ops.utilgen.logit_hvp(logits, v, weight, chosen)


def _check_inputs(logits, v, weight) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logit_hvp: logits must be a (N, K) tensor, got {describe(logits)}")
    n, k = logits.shape
    if n == 0 or k == 0:
        raise ValueError(f"logit_hvp: logits must be non-empty, got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logit_hvp: logits must be floating point, got {logits.dtype}; use logits.float()")
    if not isinstance(v, torch.Tensor) or v.shape != logits.shape:
        raise ValueError(f"logit_hvp: v must have the logits' shape {tuple(logits.shape)}, got {describe(v)}")
    if v.dtype != logits.dtype:
        raise TypeError(f"logit_hvp: v is {v.dtype} but logits are {logits.dtype}; use v.to(logits.dtype)")
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (n,):
            raise ValueError(f"logit_hvp: weight must have shape ({n},) or be None, got {describe(weight)}")
        if not weight.is_floating_point():
            raise TypeError(f"logit_hvp: weight must be floating point, got {weight.dtype}; use weight.float()")
    for name, tensor in (("v", v), ("weight", weight)):
        if tensor is not None and tensor.device != logits.device:
            raise ValueError(
                f"logit_hvp: {name} is on {tensor.device} but logits are on {logits.device}; move them to one device"
            )
    for name, tensor in (("logits", logits), ("v", v)):
        if not tensor.is_contiguous():
            raise ValueError(
                f"logit_hvp: {name} is not contiguous (strides {tensor.stride()}); the kernels read rows in place, "
                f"pass {name}.contiguous()"
            )


# --------------------------------------------------------------------------- custom op


@torch.library.custom_op("utilgen::logit_hvp", mutates_args=())
def _logit_hvp_op(logits: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None, backend: str) -> torch.Tensor:
    """(N, K) in the logits' dtype; ``backend`` is the resolved backend name."""
    raise NotImplementedError(f"utilgen::logit_hvp has no kernel for {logits.device.type} tensors")


@_logit_hvp_op.register_fake
def _(logits, v, weight, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@_logit_hvp_op.register_kernel("cpu")
def _(logits, v, weight, backend):
    if backend == "triton":
        return _forward_triton(logits, v, weight)
    if backend != "cpp":
        return logit_hvp_reference(logits, v, weight)
    logits, v = logits.contiguous(), v.contiguous()
    weight = None if weight is None else weight.float().contiguous()
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, K)
    _native.extension().logit_hvp_fwd_cpu(
        _native.ptr(logits),
        _native.ptr(v),
        _native.ptr(weight),
        logits.shape[0],
        logits.shape[1],
        _native.ptr(out),
        _native.cpu_threads(),
    )
    return out


@_logit_hvp_op.register_kernel("cuda")
def _(logits, v, weight, backend):
    if backend == "triton":
        with torch.cuda.device(logits.device):  # Triton launches on the current device
            return _forward_triton(logits, v, weight)
    if backend != "cuda":
        return logit_hvp_reference(logits, v, weight)
    logits, v = logits.contiguous(), v.contiguous()
    weight = None if weight is None else weight.float().contiguous()
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, K)
    # Python custom ops get no device guard: launch on the logits' device, not the current one.
    with torch.cuda.device(logits.device):
        _native.extension().logit_hvp_fwd_cuda(
            _native.ptr(logits),
            _native.ptr(v),
            _native.ptr(weight),
            logits.shape[0],
            logits.shape[1],
            _native.dtype_code(logits),
            _native.ptr(out),
            _native.cuda_stream(logits),
        )
    return out


def _forward_triton(logits, v, weight):
    from utilgen.kernels import logit_hvp as triton_kernels

    logits, v = logits.contiguous(), v.contiguous()
    weight = None if weight is None else weight.float().contiguous()
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (N, K)
    triton_kernels.forward(logits, v, weight, out)
    return out


# --------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output):
    logits, v, weight, backend = inputs
    ctx.save_for_backward(logits, v, weight)
    ctx.backend = backend


def _backward(ctx, grad_out):
    logits, v, weight = ctx.saved_tensors
    if ctx.needs_input_grad[0]:
        raise RuntimeError(
            "logit_hvp: the kernels give no gradient w.r.t. logits (a third derivative of the loss); "
            "pass logits.detach(), or call utilgen.ops.logit_hvp(..., backend='reference') "
            "to differentiate through them"
        )
    grad_v = grad_weight = None
    needs_v, needs_weight = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if not (needs_v or needs_weight):
        return None, None, None, None
    # One kernel call on the incoming gradient serves both: H g (unweighted).
    # It is this op again, so the backward is itself differentiable in g and v.
    h_grad = _logit_hvp_op(logits, grad_out.to(logits.dtype).contiguous(), None, ctx.backend)  # (N, K)
    if needs_v:
        grad_v = h_grad if weight is None else (weight.unsqueeze(1) * h_grad).to(v.dtype)
    if needs_weight:
        grad_weight = (h_grad.float() * v.float()).sum(dim=1).to(weight.dtype)  # (N,) = <H g_i, v_i>
    return None, grad_v, grad_weight, None


_logit_hvp_op.register_autograd(_backward, setup_context=_setup_context)
