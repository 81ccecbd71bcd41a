"""Time and peak memory of one gradient (baseline "eager") vs hvp by each method.

The model's parameters dominate memory (an MLP of 1024-2048 wide layers, ~12.6M
parameters, batch 8), which is the regime where a Hessian-vector product's
extra gradient-sized buffers matter. Goal: finite-difference peak <= 1.3x one
gradient's; every row records ``peak_vs_gradient``.

The finite difference's floor is 1 + (largest parameter) / (all parameters):
its second backward adds each freshly computed parameter gradient into the
live .grad buffers, and autograd materialises one parameter's gradient (the
2048x2048 weight: 16 MiB) before adding it. Hence two models: 3 and 4 such
layers (floors 1.33 and 1.25).
"""

from __future__ import annotations

import functools
import itertools

import pytest
import registry
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from utilgen.ops import HVP_METHODS, hvp

PROVIDERS = ("eager", *(f"hvp_{method}" for method in HVP_METHODS))
MODELS = {
    "mlp-12.6M": {"widths": (1024, 2048, 2048, 2048, 1024), "classes": 10, "batch": 8},
    "mlp-16.8M": {"widths": (1024, 2048, 2048, 2048, 2048, 1024), "classes": 10, "batch": 8},
}


def _setup(spec):
    torch.manual_seed(0)
    widths = spec["widths"]
    layers = []
    for fan_in, fan_out in itertools.pairwise(widths):
        layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(widths[-1], spec["classes"])).to(registry.DEVICE)
    inputs = torch.randn(spec["batch"], widths[0], device=registry.DEVICE)
    targets = torch.randint(0, spec["classes"], (spec["batch"],), device=registry.DEVICE)
    params = dict(model.named_parameters())
    v = {name: torch.randn_like(p) for name, p in params.items()}

    def loss_fn(p):
        return F.cross_entropy(functional_call(model, p, (inputs,)), targets)

    return loss_fn, params, v


def _callable(provider, loss_fn, params, v):
    if provider == "eager":
        return lambda: torch.autograd.grad(loss_fn(params), list(params.values()))
    method = provider.removeprefix("hvp_")
    return lambda: hvp(loss_fn, params, v, method=method)


@functools.cache
def _gradient_peak(model_name):
    loss_fn, params, v = _setup(MODELS[model_name])
    fn = _callable("eager", loss_fn, params, v)
    fn()
    return registry.peak_memory_bytes(fn)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_hvp(benchmark, provider, model_name):
    spec = MODELS[model_name]
    loss_fn, params, v = _setup(spec)
    fn = registry.synced(_callable(provider, loss_fn, params, v))
    fn()  # warm up allocator and kernels before measuring the peak
    peak = registry.peak_memory_bytes(fn)
    n_params = sum(p.numel() for p in params.values())
    benchmark.group = f"hvp {model_name} batch{spec['batch']} float32"
    registry.record(benchmark, provider=provider, shape={"model": model_name, **spec}, peak_bytes=peak)
    benchmark.extra_info["parameter_bytes"] = n_params * 4
    benchmark.extra_info["peak_vs_gradient"] = round(peak / _gradient_peak(model_name), 3)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)
