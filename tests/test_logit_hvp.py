"""logit_hvp: reference vs every backend, the reference vs torch's exact Hessian, autograd, bad args."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE, backend_params

from utilgen import _native
from utilgen.ops import BackendUnavailable, logit_hvp, logit_hvp_reference
from utilgen.ops.logit_hvp import SUPPORT

SHAPES = [(1, 1), (3, 5), (37, 123), (512, 1000), (4, 3000)]


def _inputs(n, k, dtype=torch.float32, scale=3.0):
    logits = (torch.randn(n, k, dtype=torch.float64) * scale).to(DEVICE, dtype)  # (N, K)
    v = torch.randn(n, k, dtype=torch.float64).to(DEVICE, dtype)  # (N, K)
    weight = torch.rand(n, dtype=torch.float64).to(DEVICE, torch.float32)  # (N,)
    return logits, v, weight


# --------------------------------------------------------------------------- reference is the spec


@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize(("n", "k"), [(3, 5), (37, 123)])
def test_reference_equals_autograd_hessian_vector_product(n, k, with_weight):
    """d/dz <grad_z loss, v> of the (weighted) summed CE is w_i H_i v_i, for any targets."""
    logits, v, weight = (t.double() for t in _inputs(n, k))
    target = torch.randint(0, k, (n,), device=DEVICE)
    z = logits.clone().requires_grad_(True)
    per_sample = F.cross_entropy(z, target, reduction="none")  # (N,)
    loss = (weight.double() * per_sample).sum() if with_weight else per_sample.sum()
    (grad_z,) = torch.autograd.grad(loss, z, create_graph=True)
    (expected,) = torch.autograd.grad(grad_z, z, grad_outputs=v)
    got = logit_hvp_reference(logits, v, weight.double() if with_weight else None)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_reference_row_is_hessian_matrix_times_v():
    """Against the explicit K x K Hessian diag(p) - p p^T of one row."""
    logits, v, _ = (t.double() for t in _inputs(1, 7))
    p = torch.softmax(logits[0], dim=0)
    hessian = torch.diag(p) - torch.outer(p, p)  # (K, K)
    torch.testing.assert_close(logit_hvp_reference(logits, v)[0], hessian @ v[0], rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- kernels vs reference


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_backend_matches_reference(backend, n, k, with_weight):
    logits, v, weight = _inputs(n, k)
    weight = weight if with_weight else None
    expected = logit_hvp_reference(logits.double(), v.double(), None if weight is None else weight.double())
    got = logit_hvp(logits, v, weight, backend=backend)
    assert got.dtype == torch.float32
    assert got.shape == (n, k)
    # fp32: the softmax sum and <p, v> carry ~K ulp of rounding at worst.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
def test_extreme_logits_stay_finite(backend):
    """Large spreads (exp underflow) and -inf logits (masked classes, probability 0)."""
    logits, v, _ = _inputs(6, 130, scale=60.0)
    logits[1, ::3] = float("-inf")
    logits[2] += 1e4  # the row max is subtracted first: no overflow
    expected = logit_hvp_reference(logits.double(), v.double())
    got = logit_hvp(logits, v, backend=backend)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    assert (got[1, ::3] == 0).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="float16/bfloat16 kernels run on CUDA (and Triton there)")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_within_twice_torch(backend, dtype):
    """Flash-attention rule: kernel error at most 2x PyTorch's own error in the same dtype."""
    logits, v, weight = _inputs(256, 1000)
    exact = logit_hvp_reference(logits, v, weight)
    lo_logits, lo_v = logits.to(dtype), v.to(dtype)
    torch_lo = torch.softmax(lo_logits, 1) * lo_v - torch.softmax(lo_logits, 1) * (
        torch.softmax(lo_logits, 1) * lo_v
    ).sum(1, keepdim=True)
    torch_error = (weight.unsqueeze(1) * torch_lo.float() - exact).abs().max()
    kernel_error = (logit_hvp(lo_logits, lo_v, weight, backend=backend).float() - exact).abs().max()
    assert kernel_error <= 2 * torch_error


# --------------------------------------------------------------------------- the vectorised exp of the C++ kernel


@pytest.mark.skipif(_native.extension() is None, reason="utilgen._C is not built")
def test_cpp_exp_within_two_ulp():
    x = torch.cat(
        [
            -torch.rand(1 << 18, dtype=torch.float64) * 87.3,
            -torch.rand(1 << 14, dtype=torch.float64) * 1e-3,  # near 0: r small, 2^0
            torch.tensor([0.0, -0.5 * 0.6931471805599453, -87.33, -1.0, -10.0], dtype=torch.float64),
        ]
    ).float()
    y = torch.empty_like(x)
    _native.extension().logit_hvp_exp_cpu(x.data_ptr(), y.data_ptr(), x.numel())
    exact = torch.exp(x.double())
    ulp = (torch.nextafter(exact.float(), torch.tensor(float("inf"))) - exact.float()).double()
    assert ((y.double() - exact).abs() / ulp).max() <= 2.0


@pytest.mark.skipif(_native.extension() is None, reason="utilgen._C is not built")
def test_cpp_exp_underflows_to_zero_and_propagates_nan():
    x = torch.tensor([-87.4, -100.0, -1e30, float("-inf"), float("nan")])
    y = torch.full_like(x, 7.0)
    _native.extension().logit_hvp_exp_cpu(x.data_ptr(), y.data_ptr(), x.numel())
    assert (y[:4] == 0).all()
    assert torch.isnan(y[4])


# --------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
def test_gradients_wrt_v_and_weight(backend):
    """grad_v = w H g and grad_w = <H g, v>, with a grad_output that is not 1."""
    logits, v, weight = _inputs(37, 123)
    grad_out = torch.randn(37, 123, device=DEVICE)  # (N, K)
    v_ref, w_ref = v.double().requires_grad_(True), weight.double().requires_grad_(True)
    expected = torch.autograd.grad(
        logit_hvp_reference(logits.double(), v_ref, w_ref), (v_ref, w_ref), grad_out.double()
    )
    v_k, w_k = v.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    got = torch.autograd.grad(logit_hvp(logits, v_k, w_k, backend=backend), (v_k, w_k), grad_out)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
def test_double_backward_through_v(backend):
    """The backward is the op again, so second derivatives in (v, grad_out) exist: d/dw <grad_v, c>."""
    logits, v, weight = _inputs(5, 17)
    grad_out, c = torch.randn(5, 17, device=DEVICE), torch.randn(5, 17, device=DEVICE)

    def second(fn, w):
        w = w.clone().requires_grad_(True)
        vv = v.to(w.dtype).requires_grad_(True)
        (grad_v,) = torch.autograd.grad(fn(vv, w), vv, grad_out.to(w.dtype), create_graph=True)
        return torch.autograd.grad((grad_v * c.to(w.dtype)).sum(), w)[0]

    expected = second(lambda vv, w: logit_hvp_reference(logits.double(), vv, w), weight.double())
    got = second(lambda vv, w: logit_hvp(logits, vv, w, backend=backend), weight)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_reference_backend_differentiates_through_logits():
    logits, v, _ = _inputs(4, 9)
    z = logits.double().requires_grad_(True)
    out = logit_hvp(z, v.double(), backend="reference")
    assert torch.autograd.gradcheck(lambda t: logit_hvp(t, v.double(), backend="reference"), (z,))
    assert out.requires_grad


@pytest.mark.parametrize("backend", [b for b in backend_params(SUPPORT) if b.values[0] != "reference"])
def test_kernel_refuses_logits_gradient(backend):
    logits, v, _ = _inputs(4, 9)
    with pytest.raises(RuntimeError, match=r"logits\.detach"):
        logit_hvp(logits.requires_grad_(True), v, backend=backend)
    # Under no_grad the same call is fine: nothing will be differentiated.
    with torch.no_grad():
        logit_hvp(logits, v, backend=backend)


@pytest.mark.parametrize("backend", backend_params(SUPPORT))
def test_opcheck(backend):
    logits, v, weight = _inputs(6, 11)
    for w in (None, weight.requires_grad_(True)):
        torch.library.opcheck(torch.ops.utilgen.logit_hvp, (logits, v.clone().requires_grad_(True), w, backend))


# --------------------------------------------------------------------------- bad arguments


def test_rejects_bad_arguments_with_actionable_messages():
    logits, v, weight = _inputs(4, 6)
    with pytest.raises(TypeError, match=r"v.to\(logits.dtype\)"):
        logit_hvp(logits, v.double())
    with pytest.raises(TypeError, match=r"logits.float\(\)"):
        logit_hvp(logits.long(), v.long())
    with pytest.raises(ValueError, match=r"v must have the logits' shape \(4, 6\)"):
        logit_hvp(logits, v[:, :5])
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        logit_hvp(logits, v, weight[:3])
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        logit_hvp(logits[0], v[0])
    with pytest.raises(ValueError, match=r"logits.contiguous\(\)"):
        logit_hvp(logits.t(), v.t())
    with pytest.raises(ValueError, match=r"v.contiguous\(\)"):
        logit_hvp(logits, v.t().contiguous().t())
    with pytest.raises(ValueError, match="move them to one device"):
        logit_hvp(logits, v.to("meta"))


@pytest.mark.skipif(_native.extension() is None, reason="utilgen._C is not built")
def test_cpp_backend_refuses_half_with_reason():
    logits, v, _ = _inputs(4, 6)
    with pytest.raises(BackendUnavailable, match="takes float32, not float16"):
        logit_hvp(logits.half(), v.half(), backend="cpp")


@pytest.mark.skipif(_native.extension() is None, reason="utilgen._C is not built")
def test_cpp_entry_point_validates():
    with pytest.raises(ValueError, match="non-empty"):
        _native.extension().logit_hvp_fwd_cpu(1, 1, 0, 0, 5, 1, 1)
    with pytest.raises(ValueError, match="null pointer"):
        _native.extension().logit_hvp_fwd_cpu(0, 1, 0, 2, 5, 1, 1)
