"""ILPO cost on the CPU: one prompt step on the embedded generator, and its update part alone.

Groups (embedded generator, committed weights; random weights of the same config if absent):
- "ilpo prompt step": one step of the prompt ascent for N instances: the differentiable
  sampler (DDIM 20, guidance 2, last call kept and checkpointed), the utility and L2 drift,
  the backward to the prompts, then the update. Providers differ in the update only:
    eager: a per-instance loop, one torch.optim.Adam per instance (what per-instance
           step counts and stopping give you in plain PyTorch): scatter each instance's
           gradient, step the active ones, gather the prompts back into the batch;
    cpp:   one batched ``utilgen.ops.latent_update`` call with the active mask.
- "ilpo update": the update part alone (same two providers, plus the reference), with half
  the instances stopped, so the ratio is not hidden by the sampler's cost.

Run: OMP_WAIT_POLICY=PASSIVE pytest benchmarks/bench_ilpo.py \
         --benchmark-json=benchmarks/results/<machine>-ilpo.json
"""

from __future__ import annotations

import pytest
import registry
import torch

from utilgen.generator import sample_differentiable
from utilgen.generator.embedded import EmbeddedGenerator, WeightsError, load_pretrained
from utilgen.models import WeightNet, build_classifier
from utilgen.ops import LatentUpdateSettings, LatentUpdateState, latent_update
from utilgen.ops.latent_update import SUPPORT
from utilgen.valuation import Valuation

SHAPES = [{"N": 16}, {"N": 32}]
STEP_PROVIDERS = ("eager", "cpp")
UPDATE_PROVIDERS = ("eager", "reference", "cpp")
LR, STEPS, GUIDANCE = 0.05, 20, 2.0


def _embedded() -> tuple[EmbeddedGenerator, str]:
    try:
        return load_pretrained(), "committed weights"
    except WeightsError as error:  # the cost does not depend on the weights' values
        return EmbeddedGenerator().eval(), f"random weights ({error})"


def _valuation(gen: EmbeddedGenerator) -> Valuation:
    """A valuation of the production shape (cnn-small classifier, MWN weight net); its values do not matter here."""
    torch.manual_seed(0)
    classifier = build_classifier("cnn-small", num_classes=gen.num_classes, in_channels=1, image_size=gen.image_size)
    names = tuple(str(k) for k in range(gen.num_classes))
    return Valuation(classifier, WeightNet(), names, gen.decode_shape)


class PerInstanceAdam:
    """The per-instance loop: one torch.optim.Adam per instance, stepping only the active ones."""

    def __init__(self, prompts: torch.Tensor):
        self.params = [torch.nn.Parameter(p.clone()) for p in prompts]
        self.optimizers = [torch.optim.Adam([p], lr=LR, maximize=True) for p in self.params]

    def step(self, prompts: torch.Tensor, grad: torch.Tensor, active: torch.Tensor) -> None:
        for i in torch.nonzero(active).squeeze(1).tolist():
            self.params[i].grad = grad[i]
            self.optimizers[i].step()
        with torch.no_grad():
            prompts.copy_(torch.stack(list(self.params)))  # the batch the next forward reads


class Batched:
    def __init__(self, prompts: torch.Tensor, backend: str):
        self.state, self.backend = LatentUpdateState.zeros_like(None, prompts), backend

    def step(self, prompts: torch.Tensor, grad: torch.Tensor, active: torch.Tensor) -> None:
        settings = LatentUpdateSettings(embed_lr=LR, maximize=True)
        latent_update(None, None, prompts, grad, self.state, settings, active=active, backend=self.backend)


def _updater(provider: str, prompts: torch.Tensor):
    if provider == "eager":
        return PerInstanceAdam(prompts)
    reason = registry.provider_skip_reason(SUPPORT, provider)
    if reason:
        pytest.skip(reason)
    return Batched(prompts, provider)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s['N']}")
@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_ilpo_prompt_step(benchmark, provider, shape):
    gen, weights = _embedded()
    valuation = _valuation(gen)
    n = shape["N"]
    labels = torch.arange(n) % gen.num_classes
    anchor = gen.class_prompt_embeds(labels)
    prompts = anchor.clone().contiguous()  # (N, L, D)
    noise = gen.initial_noise(range(n))
    active = torch.ones(n, dtype=torch.bool)
    updater = _updater(provider, prompts)

    def step():
        x = prompts.clone().requires_grad_(True)
        images = sample_differentiable(gen, x, noise, steps=STEPS, guidance_scale=GUIDANCE, grad_steps=1)
        objective = valuation.utility(images, labels) - (x - anchor).pow(2).flatten(1).mean(dim=1)
        (grad,) = torch.autograd.grad(objective.sum(), x)
        updater.step(prompts, grad.contiguous(), active)

    timed = registry.synced(step)
    timed()
    benchmark.group = f"ilpo prompt step N{n} embedded {gen.image_size}x{gen.image_size} ddim{STEPS} cfg"
    registry.record(
        benchmark,
        provider=provider,
        shape={**shape, "L": gen.prompt_shape[0], "D": gen.prompt_shape[1], "steps": STEPS, "grad_steps": 1},
    )
    benchmark.extra_info["weights"] = weights
    benchmark.pedantic(timed, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["ms_per_instance"] = round(1e3 * benchmark.stats.stats.median / n, 2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s['N']}")
@pytest.mark.parametrize("provider", UPDATE_PROVIDERS)
def test_ilpo_update(benchmark, provider, shape):
    gen, _ = _embedded()
    n = shape["N"]
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randn(n, *gen.prompt_shape, generator=generator)
    grad = torch.randn(n, *gen.prompt_shape, generator=generator)
    active = torch.arange(n) % 2 == 0  # half stopped: the mask is part of the work
    updater = _updater(provider, prompts)
    timed = registry.synced(lambda: updater.step(prompts, grad, active))
    timed()
    benchmark.group = f"ilpo update N{n} embed{gen.prompt_shape[0]}x{gen.prompt_shape[1]} half active"
    registry.record(benchmark, provider=provider, shape={**shape, "L": gen.prompt_shape[0], "D": gen.prompt_shape[1]})
    benchmark.pedantic(timed, rounds=200, iterations=1, warmup_rounds=5)
