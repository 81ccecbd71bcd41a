"""One TODV meta-iteration per meta-gradient strategy vs a plain weighted training step ("eager").

Providers (``registry.SHAPES``-style, one group per model):
- ``eager``: the plain weighted step (W_phi under no_grad, weighted CE, backward, SGD step): the baseline;
- ``iteration_<strategy>``: one full meta-iteration (``meta_iteration``): look-ahead meta-gradient by
  <strategy>, Adam step of phi, then the real step with a fresh forward under the new weights
  (``real_step="fresh_forward"``, Meta-Weight-Net's code);
- ``iteration_<strategy>_reuse``: the real step's backward through the virtual step's forward graph
  (``real_step="reuse_forward"``);
- ``iteration_<strategy>_lagged``: the real step along the virtual step's gradient (``real_step="lagged"``);
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
from utilgen.valuation import META_GRADIENTS, meta_iteration, weighted_step
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
# provider -> (kind, strategy, real step); the iteration's real step is named by a suffix
_SUFFIX = {"fresh_forward": "", "reuse_forward": "_reuse", "lagged": "_lagged"}
_PROVIDERS = {
    "eager": ("eager", None, None),
    **{
        f"iteration_{strategy}{suffix}": ("iteration", strategy, real_step)
        for real_step, suffix in _SUFFIX.items()
        for strategy in META_GRADIENTS
    },
    **{f"metagrad_{strategy}": ("metagrad", strategy, None) for strategy in META_GRADIENTS},
}
PROVIDERS = tuple(_PROVIDERS)


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

    kind, strategy, real_step = _PROVIDERS[provider]
    if kind == "eager":
        return plain
    if kind == "iteration":

        def iteration():
            return meta_iteration(
                classifier,
                weight_net,
                optimizer,
                meta_optimizer,
                batch,
                meta,
                strategy=strategy,
                real_step=real_step,
            )

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
