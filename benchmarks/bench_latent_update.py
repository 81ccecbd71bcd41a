"""latent_update: one ILPO step (Adam + noise shell projection) over N noises and N prompt embeddings.

Providers, one group per shape (ratios are against "eager"):
- eager: ONE batched torch.optim.Adam (foreach) step over the (N, C, H, W) noises and
  (N, L, D) embeddings, then a separate renormalisation of the noises. This is the
  best plain-PyTorch way to do the step (it shares one step count across instances).
- per_sample_adam_loop: one torch.optim.Adam per instance (what per-instance step
  counts and learning rates give you in plain PyTorch), each followed by that
  instance's renormalisation.
- reference: utilgen's fp32 PyTorch reference (per-instance steps, masks, ...).
- compile: torch.compile of the reference's step.
- cpp / cuda / triton: utilgen's kernels.

Goals (CPU, 2 threads, N=256, 4x64x64 noise, 77x1024 embeddings): cpp >= 1.5x eager
and >= 3x per_sample_adam_loop.

Run: OMP_WAIT_POLICY=PASSIVE pytest benchmarks/bench_latent_update.py \
         --benchmark-json=benchmarks/results/<machine>-latent_update.json
"""

from __future__ import annotations

import math

import pytest
import registry
import torch

from utilgen.ops import LatentUpdateSettings, LatentUpdateState, latent_update
from utilgen.ops.latent_update import SUPPORT, _prepare, _reference_impl

PROVIDERS = ("eager", "per_sample_adam_loop", "reference", "compile", "cpp", "cuda", "triton")
SHAPES = registry.SHAPES["latent_update"]
NOISE_LR, EMBED_LR = 0.05, 0.01
# fp32 bytes per element of one step: read param, grad, exp_avg, exp_avg_sq; write param,
# exp_avg, exp_avg_sq. The projection's second pass over the noise is cache-hot and not counted.
BYTES_PER_ELEMENT = 7 * 4


def _shape_id(shape: dict) -> str:
    return "N{N}-noise{C}x{H}x{W}-embed{L}x{D}".format(**shape)


def _inputs(shape: dict):
    gen = torch.Generator().manual_seed(0)
    n = shape["N"]
    noise = torch.randn(n, shape["C"], shape["H"], shape["W"], generator=gen).to(registry.DEVICE)
    embed = torch.randn(n, shape["L"], shape["D"], generator=gen).to(registry.DEVICE)
    noise_grad, embed_grad = torch.randn_like(noise), torch.randn_like(embed)
    return noise, noise_grad, embed, embed_grad


def _renormalise_(noise: torch.Tensor) -> None:
    """Puts every noise of (N, C, H, W) back on the shell of radius sqrt(C*H*W)."""
    target = math.sqrt(noise[0].numel())
    noise.mul_(target / noise.flatten(1).norm(dim=1).view(-1, *([1] * (noise.dim() - 1))))


def _batched_adam_step(noise, noise_grad, embed, embed_grad):
    noise_p, embed_p = torch.nn.Parameter(noise), torch.nn.Parameter(embed)
    noise_p.grad, embed_p.grad = noise_grad, embed_grad
    opt = torch.optim.Adam([{"params": [noise_p], "lr": NOISE_LR}, {"params": [embed_p], "lr": EMBED_LR}], foreach=True)

    def step():
        opt.step()
        with torch.no_grad():
            _renormalise_(noise_p)

    return step


def _per_sample_adam_loop(noise, noise_grad, embed, embed_grad):
    instances = []
    for i in range(noise.shape[0]):
        noise_i, embed_i = torch.nn.Parameter(noise[i].clone()), torch.nn.Parameter(embed[i].clone())
        noise_i.grad, embed_i.grad = noise_grad[i].clone(), embed_grad[i].clone()
        opt = torch.optim.Adam([{"params": [noise_i], "lr": NOISE_LR}, {"params": [embed_i], "lr": EMBED_LR}])
        instances.append((opt, noise_i))

    def step():
        for opt, noise_i in instances:
            opt.step()
            with torch.no_grad():
                _renormalise_(noise_i.unsqueeze(0))

    return step


# The step every provider times: Adam, per-part learning rates, noise shell projection.
SETTINGS = LatentUpdateSettings(noise_lr=NOISE_LR, embed_lr=EMBED_LR, project_noise=True)


def _utilgen_args(noise, noise_grad, embed, embed_grad):
    state = LatentUpdateState.zeros_like(noise, embed)
    return _prepare(noise, noise_grad, embed, embed_grad, state, SETTINGS, None)


def _make_step(provider: str, shape: dict):
    noise, noise_grad, embed, embed_grad = _inputs(shape)
    if provider == "eager":
        return _batched_adam_step(noise, noise_grad, embed, embed_grad)
    if provider == "per_sample_adam_loop":
        return _per_sample_adam_loop(noise, noise_grad, embed, embed_grad)
    if provider in ("reference", "compile"):
        args = _utilgen_args(noise, noise_grad, embed, embed_grad)
        impl = _reference_impl if provider == "reference" else torch.compile(_reference_impl, dynamic=False)
        return lambda: impl(args)
    state = LatentUpdateState.zeros_like(noise, embed)
    return lambda: latent_update(noise, noise_grad, embed, embed_grad, state, SETTINGS, backend=provider)


def _skip_reason(provider: str) -> str:
    if provider in ("eager", "per_sample_adam_loop", "reference"):
        return ""
    return registry.provider_skip_reason(SUPPORT, provider)


@pytest.mark.parametrize("shape", SHAPES, ids=[_shape_id(s) for s in SHAPES])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_latent_update(benchmark, provider, shape):
    reason = _skip_reason(provider)
    if reason:
        pytest.skip(reason)
    benchmark.group = f"latent_update {_shape_id(shape)}"
    step = registry.synced(_make_step(provider, shape))
    step()  # warm-up: lazy state allocation, torch.compile's compilation
    elements = shape["N"] * (shape["C"] * shape["H"] * shape["W"] + shape["L"] * shape["D"])
    registry.record(
        benchmark,
        provider=provider,
        shape=shape,
        bytes_moved=elements * BYTES_PER_ELEMENT,
        peak_bytes=registry.peak_memory_bytes(step),
    )
    rounds = 30 if shape["N"] <= 16 else 8  # the per-sample loop at N=256 takes ~0.1-0.3 s a step
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
