"""T-step look-ahead meta-gradients (utilgen.valuation.multistep) vs a plain weighted training step ("eager").

cnn-small 16x16x1, K = 10, training batches and meta batch of 128; one group per T = 1, 3, 5. Providers:
- ``eager``: the plain weighted step (W_phi under no_grad, weighted CE, backward, SGD step), as
  bench_valuation.py's: the baseline;
- ``unrolled_hvp``: ``unrolled_hvp_meta_gradient`` at its defaults (exact HVPs, forward-mode tangent);
- ``unrolled_gauss_newton``: ``hvp_method="gauss_newton", tangent="finite_difference"``, the memory-lean variant;
- ``exact_unroll``: ``exact_unrolled_meta_gradient``, T steps of double-backward graph.

Goal: unrolled_hvp peak memory within 1.3x a plain step at every T, while exact_unroll grows with T.
Every row records ``peak_vs_eager`` (conftest adds ``speedup_vs_eager``); the look-ahead rows also
``rel_error``: the relative L2 error of dL_v/dphi against ``exact_unroll`` from the same seed (the
accuracy the memory is bought with).
"""

from __future__ import annotations

import functools

import pytest
import registry
import torch

from utilgen.models import WeightNet, build_classifier
from utilgen.valuation import weighted_step
from utilgen.valuation.multistep import MultiStepLookahead, exact_unrolled_meta_gradient, unrolled_hvp_meta_gradient
from utilgen.valuation.trainer import lookahead_model_fn

SPEC = {"name": "cnn-small", "image": 16, "channels": 1, "classes": 10, "batch": 128, "meta_batch": 128}
STEPS = (1, 3, 5)
INNER_LR = 0.05  # ValuationConfig's default
SEED = 100  # dropout draws of every compared call
PROVIDERS = {
    "eager": None,
    "unrolled_hvp": functools.partial(unrolled_hvp_meta_gradient),
    "unrolled_gauss_newton": functools.partial(
        unrolled_hvp_meta_gradient, hvp_method="gauss_newton", tangent="finite_difference"
    ),
    "exact_unroll": exact_unrolled_meta_gradient,
}


def _setup(steps: int):
    torch.manual_seed(0)
    device = registry.DEVICE
    classifier = (
        build_classifier(
            SPEC["name"], num_classes=SPEC["classes"], in_channels=SPEC["channels"], image_size=SPEC["image"]
        )
        .to(device)
        .train()
    )
    weight_net = WeightNet().to(device)
    shape = (SPEC["channels"], SPEC["image"], SPEC["image"])

    def batch(n):
        return torch.rand(n, *shape, device=device), torch.randint(0, SPEC["classes"], (n,), device=device)

    batches = [batch(SPEC["batch"]) for _ in range(steps)]
    meta = batch(SPEC["meta_batch"])
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    params = {name: p.detach() for name, p in classifier.named_parameters()}
    problem = MultiStepLookahead(
        lookahead_model_fn(classifier), params, weight_net, weight_net.features, batches, *meta, INNER_LR, None, True
    )
    return classifier, weight_net, optimizer, problem


def _callable(provider: str, classifier, weight_net, optimizer, problem):
    if provider == "eager":
        return lambda: weighted_step(classifier, weight_net, optimizer, problem.batches[0])
    return functools.partial(PROVIDERS[provider], problem)


def _seeded(fn):
    torch.manual_seed(SEED)
    return fn()


def _relative_error(got: dict, expected: dict) -> float:
    flat = torch.cat([g.reshape(-1) for g in got.values()])
    reference = torch.cat([g.reshape(-1) for g in expected.values()])
    return float((flat - reference).norm() / reference.norm())


@functools.cache
def _baseline_peak(steps: int) -> int:
    fn = _callable("eager", *_setup(steps))
    fn()
    return registry.peak_memory_bytes(fn)


@pytest.mark.parametrize("steps", STEPS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_lookahead(benchmark, provider, steps):
    pieces = _setup(steps)
    fn = registry.synced(_callable(provider, *pieces))
    out = _seeded(fn)  # also warms up allocator and kernels before measuring the peak
    peak = registry.peak_memory_bytes(fn)
    benchmark.group = f"lookahead {SPEC['name']} T{steps} batch{SPEC['batch']} meta{SPEC['meta_batch']}"
    registry.record(benchmark, provider=provider, shape={"steps": steps, **SPEC}, peak_bytes=peak)
    benchmark.extra_info["peak_vs_eager"] = round(peak / _baseline_peak(steps), 3)
    if provider != "eager":
        expected = _seeded(functools.partial(exact_unrolled_meta_gradient, pieces[-1]))
        benchmark.extra_info["rel_error"] = float(f"{_relative_error(out.phi_grads, expected.phi_grads):.2e}")
    benchmark.pedantic(fn, rounds=3 if registry.DEVICE == "cpu" else 10, warmup_rounds=1)
