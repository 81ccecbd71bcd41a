"""One TODV meta-iteration per meta-gradient strategy vs a plain weighted training step ("eager").

Providers (``registry.SHAPES``-style, one group per model):
- ``eager``: the plain weighted step (W_phi under no_grad, weighted CE, backward, SGD step): the baseline;
- ``iteration_<strategy>``: one full meta-iteration: look-ahead meta-gradient by <strategy>,
  Adam step of phi, then the same weighted step;
- ``metagrad_<strategy>``: the look-ahead meta-gradient alone.

Goal for the default (directional): iteration <= 2.5x the plain step's time, <= 1.3x its peak
memory, >= 1.5x faster than exact. Every row records ``time_vs_eager`` and ``peak_vs_eager``.
Training and meta batch: 128 each (the meta batch equal to the training batch, as Meta-Weight-Net).
"""

from __future__ import annotations

import functools

import pytest
import registry
import torch

from utilgen.models import WeightNet, build_classifier
from utilgen.valuation import META_GRADIENTS, meta_update, weighted_step
from utilgen.valuation.strategies import Lookahead, meta_gradient
from utilgen.valuation.trainer import lookahead_model_fn

MODELS = {
    "cnn-small 16x16x1 K10": {
        "name": "cnn-small",
        "image": 16,
        "channels": 1,
        "classes": 10,
        "batch": 128,
        "meta_batch": 128,
    },
    "resnet50 224x224x3 K100": {
        "name": "resnet50",
        "image": 224,
        "channels": 3,
        "classes": 100,
        "batch": 128,
        "meta_batch": 128,
    },
}
PROVIDERS = ("eager", *(f"iteration_{s}" for s in META_GRADIENTS), *(f"metagrad_{s}" for s in META_GRADIENTS))


def _skip_reason(model_name: str) -> str:
    if MODELS[model_name]["name"] == "resnet50" and registry.DEVICE != "cuda":
        return "ResNet-50 at batch 128 runs only on CUDA (the 2-core CPU would take minutes per step)"
    return ""


def _setup(spec):
    torch.manual_seed(0)
    device = registry.DEVICE
    classifier = (
        build_classifier(
            spec["name"], num_classes=spec["classes"], in_channels=spec["channels"], image_size=spec["image"]
        )
        .to(device)
        .train()
    )
    weight_net = WeightNet().to(device)
    shape = (spec["channels"], spec["image"], spec["image"])
    batch = (
        torch.rand(spec["batch"], *shape, device=device),
        torch.randint(0, spec["classes"], (spec["batch"],), device=device),
    )
    meta = (
        torch.rand(spec["meta_batch"], *shape, device=device),
        torch.randint(0, spec["classes"], (spec["meta_batch"],), device=device),
    )
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    meta_optimizer = torch.optim.Adam(weight_net.parameters(), lr=1e-3, weight_decay=1e-4)
    return classifier, weight_net, optimizer, meta_optimizer, batch, meta


def _callable(provider, classifier, weight_net, optimizer, meta_optimizer, batch, meta):
    def plain():
        return weighted_step(classifier, weight_net, optimizer, batch)

    if provider == "eager":
        return plain
    kind, strategy = provider.split("_", 1)
    if kind == "iteration":

        def iteration():
            meta_update(classifier, weight_net, meta_optimizer, batch, meta, strategy=strategy, inner_lr=0.01)
            return plain()

        return iteration

    def metagrad():
        params = {name: p.detach() for name, p in classifier.named_parameters()}
        problem = Lookahead(
            lookahead_model_fn(classifier), params, weight_net, weight_net.features, *batch, *meta, 0.01, None, True
        )
        return meta_gradient(problem, strategy)

    return metagrad


@functools.cache
def _baseline_peak(model_name):
    fn = _callable("eager", *_setup(MODELS[model_name]))
    fn()
    return registry.peak_memory_bytes(fn)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_valuation(benchmark, provider, model_name):
    reason = _skip_reason(model_name)
    if reason:
        pytest.skip(reason)
    spec = MODELS[model_name]
    fn = registry.synced(_callable(provider, *_setup(spec)))
    fn()  # warm up allocator and kernels before measuring the peak
    peak = registry.peak_memory_bytes(fn)
    benchmark.group = f"valuation {model_name} batch{spec['batch']} meta{spec['meta_batch']}"
    registry.record(benchmark, provider=provider, shape={"model": model_name, **spec}, peak_bytes=peak)
    benchmark.extra_info["peak_vs_eager"] = round(peak / _baseline_peak(model_name), 3)
    benchmark.pedantic(fn, rounds=10 if registry.DEVICE == "cpu" else 20, warmup_rounds=1)
