"""logit_hvp: eager reference vs torch.compile vs the kernels, over SHAPES["logit_hvp"].

Run: OMP_WAIT_POLICY=PASSIVE pytest benchmarks/bench_logit_hvp.py --benchmark-json=...
"""

from __future__ import annotations

import functools

import pytest
import registry
import torch

from utilgen.ops import logit_hvp, logit_hvp_reference
from utilgen.ops.logit_hvp import SUPPORT

PROVIDERS = ("eager", "compile", *registry.KERNEL_PROVIDERS)


@functools.cache
def _compiled_reference():
    return torch.compile(logit_hvp_reference, dynamic=False)


def _compile_skip_reason() -> str:
    try:
        z = torch.randn(4, 8, device=registry.DEVICE)
        _compiled_reference()(z, z, None)
    except Exception as error:  # inductor needs a working C++ toolchain on CPU
        return f"torch.compile of the reference failed here: {type(error).__name__}: {error}"[:300]
    return ""


def _callable(provider, logits, v, weight):
    if provider == "eager":
        return lambda: logit_hvp_reference(logits, v, weight)
    if provider == "compile":
        compiled = _compiled_reference()
        return lambda: compiled(logits, v, weight)
    return lambda: logit_hvp(logits, v, weight, backend=provider)


@pytest.mark.parametrize("shape", registry.SHAPES["logit_hvp"], ids=lambda s: f"N{s['N']}-K{s['K']}")
@pytest.mark.parametrize("provider", PROVIDERS)
def test_logit_hvp(benchmark, provider, shape):
    reason = _compile_skip_reason() if provider == "compile" else registry.provider_skip_reason(SUPPORT, provider)
    if reason:
        pytest.skip(f"{provider}: {reason}")
    n, k = shape["N"], shape["K"]
    logits = torch.randn(n, k, device=registry.DEVICE) * 3  # (N, K)
    v = torch.randn(n, k, device=registry.DEVICE)  # (N, K)
    weight = torch.rand(n, device=registry.DEVICE)  # (N,)
    fn = registry.synced(_callable(provider, logits, v, weight))
    torch.testing.assert_close(fn(), logit_hvp_reference(logits, v, weight), rtol=1e-4, atol=1e-5)
    benchmark.group = f"logit_hvp N{n} K{k} float32"
    # Read logits and v, write out, read weight: the bytes any implementation must move.
    registry.record(benchmark, provider=provider, shape=shape, bytes_moved=3 * n * k * 4 + n * 4)
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=3)
