"""Throughput of weighted cross-entropy forward + backward (TODV's weighted loss).

Baseline "eager": the idiomatic PyTorch, F.cross_entropy(reduction="none") * w,
mean, backward. Goals (ratios vs eager, same run): CPU >= 2x at N=8192 with
K=100 and K=1000 (2 threads, OMP_WAIT_POLICY=PASSIVE); GPU >= 2x eager and
>= 1.2x torch.compile on bandwidth-bound shapes.
"""

from __future__ import annotations

import pytest
import registry
import torch
import torch.nn.functional as F

from utilgen.ops import weighted_cross_entropy
from utilgen.ops.weighted_cross_entropy import SUPPORT

PROVIDERS = ["eager", "compile", *registry.KERNEL_PROVIDERS]


def _eager_loss(logits, target, weight):
    return (F.cross_entropy(logits, target, reduction="none") * weight).mean()


_compiled_loss = None


def _step_fn(provider, logits, target, weight):
    global _compiled_loss
    if provider == "eager":
        loss_fn = _eager_loss
    elif provider == "compile":
        if _compiled_loss is None:
            _compiled_loss = torch.compile(_eager_loss, dynamic=False)
        loss_fn = _compiled_loss
    else:

        def loss_fn(z, y, w):
            return weighted_cross_entropy(z, y, w, backend=provider)

    def step():
        logits.grad = weight.grad = None
        loss_fn(logits, target, weight).backward()

    return step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", registry.SHAPES["weighted_cross_entropy"], ids=lambda s: f"N{s['N']}xK{s['K']}")
def test_weighted_cross_entropy_fwd_bwd(benchmark, provider, shape):
    reason = registry.provider_skip_reason(SUPPORT, provider)
    if reason:
        pytest.skip(reason)
    n, k = shape["N"], shape["K"]
    logits = torch.randn(n, k, device=registry.DEVICE, requires_grad=True)
    target = torch.randint(0, k, (n,), device=registry.DEVICE)
    weight = torch.rand(n, device=registry.DEVICE, requires_grad=True)
    step = _step_fn(provider, logits, target, weight)
    step()  # warm-up (and compilation)
    benchmark.group = f"weighted_cross_entropy fwd+bwd N={n} K={k}"
    # read-once/write-once: logits read, gradient written (+ O(N) vectors)
    registry.record(
        benchmark,
        provider=provider,
        shape=shape,
        bytes_moved=2 * n * k * logits.element_size() + 4 * n * 4,
        peak_bytes=registry.peak_memory_bytes(step),
    )
    benchmark.pedantic(registry.synced(step), rounds=20 if n * k < 10**7 else 8, warmup_rounds=2)
