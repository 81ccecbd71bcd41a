"""Classifiers and the weight network: shapes, functional use, forward-mode AD, parameter counts, features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, jvp

from utilgen.models import CLASSIFIERS, WeightNet, build_classifier, per_sample_features


@pytest.mark.parametrize("name", ["cnn-small", "cnn-medium"])
@pytest.mark.parametrize(("channels", "size"), [(1, 16), (3, 32)])
def test_cnn_shapes(name, channels, size):
    model = build_classifier(name, num_classes=7, in_channels=channels, image_size=size)
    assert model(torch.rand(5, channels, size, size)).shape == (5, 7)


@pytest.mark.parametrize(("name", "expected_millions"), [("resnet18", 11.69), ("resnet50", 25.56)])
def test_resnet_parameter_counts_match_the_published_models(name, expected_millions):
    model = build_classifier(name, num_classes=1000, in_channels=3, image_size=224)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(expected_millions, abs=0.01)


def test_resnet18_at_224_and_small_images():
    big = build_classifier("resnet18", num_classes=10, in_channels=3, image_size=224).eval()
    assert big(torch.rand(1, 3, 224, 224)).shape == (1, 10)
    small = build_classifier("resnet18", num_classes=10, in_channels=1, image_size=16).eval()
    assert small(torch.rand(2, 1, 16, 16)).shape == (2, 10)


def test_cnn_losses_are_per_sample():
    # GroupNorm, not BatchNorm: a sample's logits do not depend on the rest of the batch.
    model = build_classifier("cnn-small", num_classes=10, in_channels=1, image_size=16).eval()
    x = torch.rand(6, 1, 16, 16)
    torch.testing.assert_close(model(x)[:2], model(x[:2]))


def test_functional_call_and_forward_mode_jvp():
    # Forward mode must agree with reverse mode: <J d, r> = <d, J^T r> (exact, no finite-difference kinks).
    model = build_classifier("cnn-small", num_classes=10, in_channels=1, image_size=16).eval().double()
    params = {k: v.detach() for k, v in model.named_parameters()}
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    probe = torch.randn(4, 10, dtype=torch.float64)
    logits, tangent = jvp(lambda p: functional_call(model, p, (x,)), (params,), (direction,))
    torch.testing.assert_close(logits, model(x))
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    (functional_call(model, leaves, (x,)) * probe).sum().backward()
    reverse = sum((leaves[k].grad * direction[k]).sum() for k in leaves)
    torch.testing.assert_close((tangent * probe).sum(), reverse)


def test_unknown_classifier_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of " + ", ".join(CLASSIFIERS)):
        build_classifier("vit", num_classes=10, in_channels=1, image_size=16)


def test_weight_net_default_is_meta_weight_net():
    net = WeightNet()
    shapes = [tuple(p.shape) for p in net.parameters()]
    assert shapes == [(100, 1), (100,), (1, 100), (1,)]
    weights = net(torch.linspace(0, 10, 50).unsqueeze(1))
    assert weights.shape == (50,)
    assert (weights >= 0).all()
    assert (weights <= 1).all()


def test_weight_net_rejects_bad_features_and_shapes():
    with pytest.raises(ValueError, match="subset of"):
        WeightNet(features=("loss", "confidence"))
    with pytest.raises(ValueError, match=r"expects features of shape \(N, 2\)"):
        WeightNet(features=("loss", "entropy"))(torch.rand(3, 1))


def test_per_sample_features():
    logits = torch.tensor([[0.0, 0.0, 0.0], [5.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    targets = torch.tensor([0, 0, 0])
    losses = F.cross_entropy(logits, targets, reduction="none")
    feats = per_sample_features(losses, logits, targets, ("loss", "entropy", "margin"))
    assert feats.shape == (3, 3)
    assert not feats.requires_grad
    torch.testing.assert_close(feats[:, 0], losses)
    assert feats[0, 1] == pytest.approx(math.log(3))  # uniform: maximal entropy
    torch.testing.assert_close(feats[:, 2], torch.tensor([0.0, 4.0, -3.0]))  # negative when misclassified
    with pytest.raises(ValueError, match="needs logits"):
        per_sample_features(losses, features=("entropy",))
