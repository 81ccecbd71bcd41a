"""The baselines' parts: the consistency filter and the DataDream-style adapter."""

from __future__ import annotations

import pytest
import torch
from _generator_models import tiny_embedded
from torch import nn

from utilgen.adaptation.lora import adapter_parameters, has_adapters
from utilgen.baselines import DataDreamDivergedError, fit_datadream_adapter, label_consistency, most_consistent
from utilgen.data import LabelledImages, SyntheticPool

LORA = {"rank": 4, "alpha": 4.0, "target_modules": ("to_q", "to_k", "to_v", "to_out.0")}


def _pool(labels: list[int]) -> SyntheticPool:
    n = len(labels)
    return SyntheticPool.create(
        torch.rand(n, 1, 8, 8), torch.tensor(labels), ("a", "b"), torch.arange(n), round=0, stage="plain"
    )


def test_the_filter_keeps_the_most_consistent_images_of_each_class_in_pool_order():
    pool = _pool([0, 0, 0, 1, 1, 1])
    consistency = torch.tensor([0.2, 0.9, 0.5, 0.1, 0.7, 0.7])
    assert most_consistent(pool, consistency, 2).tolist() == [1, 2, 4, 5]
    assert most_consistent(pool, consistency, 1).tolist() == [1, 4]  # a tie keeps the earlier image


def test_the_filter_refuses_a_class_with_too_few_images_and_a_wrong_score_count():
    pool = _pool([0, 0, 1])
    with pytest.raises(ValueError, match="class 'b' has 1 images"):
        most_consistent(pool, torch.rand(3), 2)
    with pytest.raises(ValueError, match="one consistency score per image"):
        most_consistent(pool, torch.rand(2), 1)


def test_label_consistency_is_the_probability_of_the_label():
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    images, labels = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 1, 0, 1])
    expected = torch.softmax(classifier(images), 1)[torch.arange(5), labels]
    torch.testing.assert_close(label_consistency(classifier, images, labels, batch_size=2), expected.detach())


def _shots(generator, n: int = 12) -> LabelledImages:
    size = generator.image_size
    labels = torch.arange(n) % generator.class_tokens.shape[0]
    return LabelledImages(torch.rand(n, 1, size, size), labels, tuple(f"c{k}" for k in range(int(labels.max()) + 1)))


def test_the_datadream_adapter_trains_only_a_lora_and_lowers_the_denoising_loss():
    generator = tiny_embedded()
    base = {k: v.clone() for k, v in generator.denoiser.state_dict().items()}
    settings = {**LORA, "batch_size": 12, "seed": 0}
    losses = fit_datadream_adapter(generator, _shots(generator), steps=60, lr=1e-2, **settings)
    assert len(losses) == 60
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < sum(losses[:10])
    assert has_adapters(generator.denoiser)
    assert any(p.abs().sum() > 0 for n, p in adapter_parameters(generator.denoiser).items() if "lora_B" in n)
    for name, value in generator.denoiser.state_dict().items():  # the base weights are untouched
        if name in base:
            torch.testing.assert_close(value, base[name])


def test_a_runaway_datadream_lr_stops_with_the_setting_named():
    generator = tiny_embedded()
    settings = {**LORA, "batch_size": 12, "seed": 0}
    with pytest.raises(DataDreamDivergedError, match=r"baselines\.datadream_lr"):
        fit_datadream_adapter(generator, _shots(generator), steps=200, lr=1e4, **settings)
