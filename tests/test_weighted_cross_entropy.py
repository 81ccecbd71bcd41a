"""weighted_cross_entropy: every backend against the fp32 reference, autograd, opcheck, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params

from utilgen.ops import BackendUnavailable, use_backend, weighted_cross_entropy, weighted_cross_entropy_reference
from utilgen.ops.weighted_cross_entropy import SUPPORT

# K < 16, = 16 and just past it exercise the C++ row loops' three paths.
SHAPES = [(1, 1), (300, 10), (5, 16), (3, 17), (37, 123), (64, 1000)]
REDUCTIONS = ["mean", "sum", "none"]


def _inputs(n, k, dtype=torch.float32, device=DEVICE, scale=3.0):
    logits = (torch.randn(n, k, device=device) * scale).to(dtype)
    target = torch.randint(0, k, (n,), device=device)
    weight = torch.rand(n, device=device)
    tangent = torch.randn(n, k, device=device).to(dtype)
    return logits, target, weight, tangent


def _run(fn, logits, target, weight, reduction, tangent, grad_output_seed=1):
    z = logits.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    out = fn(z, target, w, reduction, tangent)
    gen = torch.Generator(device="cpu").manual_seed(grad_output_seed)
    grad_output = (torch.rand(out.loss.shape, generator=gen) + 0.5).to(out.loss.device)  # not 1
    (out.loss * grad_output).sum().backward()
    return out, z.grad, w.grad


def _kernel(backend):
    def fn(z, target, w, reduction, tangent):
        return weighted_cross_entropy(z, target, w, reduction, tangent=tangent, return_per_sample=True, backend=backend)

    return fn


def _reference(z, target, w, reduction, tangent):
    return weighted_cross_entropy_reference(z, target, w, reduction, tangent=tangent)


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}xK{s[1]}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_tangent", [False, True], ids=["plain", "tangent"])
def test_matches_reference_fp32(backend, shape, reduction, with_tangent):
    logits, target, weight, tangent = _inputs(*shape)
    tangent = tangent if with_tangent else None
    out, grad_z, grad_w = _run(_kernel(backend), logits, target, weight, reduction, tangent)
    ref, ref_grad_z, ref_grad_w = _run(_reference, logits, target, weight, reduction, tangent)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.per_sample_loss, ref.per_sample_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_z, ref_grad_z, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_w, ref_grad_w, rtol=1e-5, atol=1e-5)
    if with_tangent:
        torch.testing.assert_close(out.directional, ref.directional, rtol=1e-4, atol=1e-5)
    else:
        assert out.directional is None


def test_reference_matches_torch_cross_entropy():
    logits, target, weight, _ = _inputs(37, 123, device="cpu")
    expected = (F.cross_entropy(logits, target, reduction="none") * weight).mean()
    torch.testing.assert_close(weighted_cross_entropy_reference(logits, target, weight).loss, expected)


def test_directional_is_the_derivative_along_the_tangent():
    # s_i = d l_i(z + t u) / dt at t = 0, checked by a central difference in float64.
    logits, target, _, tangent = _inputs(5, 7, device="cpu")
    out = weighted_cross_entropy(logits, target, tangent=tangent, backend="reference")
    eps = 1e-6
    z, u = logits.double(), tangent.double()
    plus = F.cross_entropy(z + eps * u, target, reduction="none")
    minus = F.cross_entropy(z - eps * u, target, reduction="none")
    torch.testing.assert_close(out.directional.double(), (plus - minus) / (2 * eps), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
def test_large_logits_are_stable(backend):
    logits, target, weight, _ = _inputs(37, 123, scale=200.0)
    out = weighted_cross_entropy(logits, target, weight, return_per_sample=True, backend=backend)
    ref = weighted_cross_entropy_reference(logits, target, weight)
    assert torch.isfinite(out.per_sample_loss).all()
    torch.testing.assert_close(out.per_sample_loss, ref.per_sample_loss, rtol=1e-5, atol=1e-3)


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ kernel's input checks")
def test_cpp_non_finite_logits_give_nan_rows_like_torch():
    logits, target, weight, _ = _inputs(4, 9, device="cpu")
    logits[1, 3] = float("nan")
    logits[2, 0] = float("inf")
    logits[3, 5] = float("-inf")  # a masked class is fine
    target[3] = 0
    out = weighted_cross_entropy(logits, target, weight, "none", backend="cpp")
    ref = weighted_cross_entropy_reference(logits, target, weight, "none")
    assert torch.isnan(out[1])
    assert torch.isnan(out[2])
    torch.testing.assert_close(out[[0, 3]], ref.loss[[0, 3]])


@pytest.mark.skipif(DEVICE != "cpu", reason="the C++ kernel's input checks")
def test_cpp_rejects_out_of_range_targets():
    logits, target, weight, _ = _inputs(6, 5, device="cpu")
    target[4] = 5
    with pytest.raises(ValueError, match=r"target\[4\] = 5 is not a class index in \[0, 5\)"):
        weighted_cross_entropy(logits, target, weight, backend="cpp")


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
def test_no_grad_needed_no_backward_state(backend):
    logits, target, weight, _ = _inputs(37, 123)
    with torch.no_grad():
        loss = weighted_cross_entropy(logits.requires_grad_(), target, weight, backend=backend)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, weighted_cross_entropy_reference(logits, target, weight).loss)


@pytest.mark.parametrize("backend", [b for b in backend_params(SUPPORT) if b.values[0] != "reference"])
def test_kernel_backward_refuses_create_graph(backend):
    logits, target, weight, _ = _inputs(8, 5)
    z = logits.requires_grad_()
    loss = weighted_cross_entropy(z, target, weight, backend=backend)
    with pytest.raises(RuntimeError, match="once-differentiable"):
        torch.autograd.grad(loss, z, create_graph=True)


def test_reference_backend_is_twice_differentiable():
    # L = mean_i w_i CE_i:  dL/dz_i = c_i (p_i - e_{y_i}) = g_i with c_i = w_i / N, and the Hessian of CE_i is
    # diag(p_i) - p_i p_i^T, so d(sum ||g||^2)/dz_i = 2 c_i (p_i * g_i - p_i <p_i, g_i>): the closed forms in
    # float64 against the reference, which computes in float32 whatever the input dtype.
    logits, target, weight, _ = _inputs(8, 5, device="cpu")
    z, w = logits.double().requires_grad_(), weight.double()
    loss = weighted_cross_entropy(z, target, w, backend="reference")
    (grad,) = torch.autograd.grad(loss, z, create_graph=True)
    (second,) = torch.autograd.grad(grad.pow(2).sum(), z)
    p = torch.softmax(logits.double(), dim=1)  # (N, K)
    c = (w / len(target)).unsqueeze(1)  # (N, 1)
    g = c * (p - F.one_hot(target, p.shape[1]).double())  # (N, K)
    expected = 2 * c * (p * g - p * (p * g).sum(1, keepdim=True))  # (N, K)
    # float32 rounding: measured 1.1e-8 on g (entries up to 0.1) and 8e-10 on the second derivative (up to 4e-3).
    torch.testing.assert_close(grad, g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
def test_weight_gradient_can_be_off(backend):
    logits, target, weight, _ = _inputs(37, 10)
    z = logits.requires_grad_()
    weighted_cross_entropy(z, target, weight, backend=backend).backward()
    assert weight.grad is None
    assert z.grad is not None


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
def test_opcheck(backend):
    # backend="reference" here exercises the op's own fallback (devices without a kernel).
    logits, target, weight, tangent = _inputs(6, 7)
    op = torch.ops.utilgen.weighted_cross_entropy.default
    for reduction in REDUCTIONS:
        for tan in (None, tangent):
            args = (
                logits.clone().requires_grad_(),
                target,
                weight.clone().requires_grad_(),
                tan,
                reduction,
                True,
                backend,
            )
            torch.library.opcheck(op, args)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_op_fallback_matches_reference(reduction):
    logits, target, weight, tangent = _inputs(6, 7)
    z = logits.clone().requires_grad_()
    loss, _per_sample, lse, directional, _ = torch.ops.utilgen.weighted_cross_entropy(
        z, target, weight, tangent, reduction, True, "reference"
    )
    ref = weighted_cross_entropy_reference(logits, target, weight, reduction, tangent=tangent)
    torch.testing.assert_close(loss, ref.loss)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1))
    torch.testing.assert_close(directional, ref.directional)
    loss.sum().backward()
    ref_z = logits.clone().requires_grad_()
    weighted_cross_entropy_reference(ref_z, target, weight, reduction).loss.sum().backward()
    torch.testing.assert_close(z.grad, ref_z.grad)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_torch(backend, dtype):
    logits, target, weight, _ = _inputs(512, 1000, dtype=dtype)
    ref, ref_gz, _ = _run(_reference, logits.float(), target, weight, "mean", None)
    out, gz, _ = _run(_kernel(backend), logits, target, weight, "mean", None)
    z = logits.detach().clone().requires_grad_()
    torch_loss = (F.cross_entropy(z, target, reduction="none") * weight.to(dtype)).mean()
    torch_loss.backward()
    assert (out.loss - ref.loss).abs() <= 2 * (torch_loss.float() - ref.loss).abs() + 1e-6
    assert (gz.float() - ref_gz).abs().max() <= 2 * (z.grad.float() - ref_gz).abs().max() + 1e-6


class TestBadInput:
    def test_wrong_logits_rank(self):
        with pytest.raises(ValueError, match=r"logits must be a \(N, K\) tensor"):
            weighted_cross_entropy(torch.randn(3), torch.zeros(3, dtype=torch.long))

    def test_integer_logits(self):
        with pytest.raises(TypeError, match="floating point"):
            weighted_cross_entropy(torch.ones(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))

    def test_target_dtype(self):
        with pytest.raises(TypeError, match=r"use target.long\(\)"):
            weighted_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.int32))

    def test_target_shape(self):
        with pytest.raises(ValueError, match=r"target must have shape \(3,\)"):
            weighted_cross_entropy(torch.randn(3, 4), torch.zeros(4, dtype=torch.long))

    def test_weight_shape(self):
        with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
            weighted_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(3, 1))

    def test_tangent_shape(self):
        with pytest.raises(ValueError, match="tangent must have the logits' shape"):
            weighted_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), tangent=torch.randn(3, 5))

    def test_reduction(self):
        with pytest.raises(ValueError, match="reduction must be one of"):
            weighted_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), reduction="avg")

    def test_device_mismatch(self):
        with pytest.raises(ValueError, match="weight is on meta but logits are on cpu"):
            weighted_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.ones(3, device="meta"))

    def test_non_contiguous_logits_are_handled(self):
        logits = torch.randn(4, 6).t()  # (6, 4), non-contiguous
        target = torch.randint(0, 4, (6,))
        torch.testing.assert_close(
            weighted_cross_entropy(logits, target), weighted_cross_entropy_reference(logits, target).loss
        )

    def test_explicit_unavailable_backend_says_why(self):
        with pytest.raises(BackendUnavailable, match="backend 'cuda' is not supported for cpu float32 inputs because"):
            weighted_cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), backend="cuda")

    def test_unknown_backend_name(self):
        with pytest.raises(ValueError, match="is not a backend; choose one of"):
            with use_backend("fast"):
                pass


def test_reduction_names_are_the_extension_codes_names():
    """csrc/weighted_cross_entropy.h defines the codes; the op's names must be exactly the exported ones."""
    from utilgen import _native
    from utilgen.ops.weighted_cross_entropy import REDUCTIONS as OP_REDUCTIONS

    module = _native.extension()
    if module is None:
        pytest.skip(_native.extension_reason())
    assert set(module.Reduction.__members__) == set(OP_REDUCTIONS) == set(REDUCTIONS)
    for dtype in {*SUPPORT.cpp_dtypes, *SUPPORT.cuda_dtypes}:  # every kernel dtype has a code
        assert str(dtype).removeprefix("torch.") in module.DType.__members__
