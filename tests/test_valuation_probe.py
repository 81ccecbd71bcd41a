"""The mislabel probe and the refresh check it drives (utilgen/valuation/probe.py, loop.refresh_check)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from utilgen import loop
from utilgen import run as cli
from utilgen.models import LossUtility
from utilgen.valuation import Valuation, mislabel_auroc

K = 4


class _InvertedUtility(LossUtility):
    """Utility rising with the loss: what an inverted W_phi learns."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return 1.0 - super().forward(features)


class _ConstantUtility(LossUtility):
    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.full((features.shape[0],), 0.5)


def _classifier_that_knows_the_labels() -> nn.Module:
    """Image k is a constant k / K; the logits peak at the class whose intensity the image has."""
    classifier = nn.Sequential(nn.Flatten(), nn.Linear(16, K))
    with torch.no_grad():
        classifier[1].weight.zero_()
        classifier[1].bias.zero_()
        for k in range(K):  # logit_k = -8 (mean pixel - k / K)^2, expanded: linear in the mean pixel
            classifier[1].weight[k] = 2 * 8 * (k / K) / 16
            classifier[1].bias[k] = -8 * (k / K) ** 2
    return classifier


def _real(per_class: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(K).repeat(per_class)
    images = (labels.float() / K).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    return images, labels


def _valuation(utility: nn.Module) -> Valuation:
    return Valuation(_classifier_that_knows_the_labels(), utility, tuple("abcd"), (1, 4, 4), None)


def test_a_utility_falling_with_the_loss_ranks_true_labels_first():
    images, labels = _real()
    assert mislabel_auroc(_valuation(LossUtility()), images, labels) == 1.0


def test_an_inverted_utility_scores_below_chance_and_a_constant_one_at_chance():
    images, labels = _real()
    assert mislabel_auroc(_valuation(_InvertedUtility()), images, labels) == 0.0
    assert mislabel_auroc(_valuation(_ConstantUtility()), images, labels) == 0.5


def test_every_wrong_label_is_scored_once():
    images, labels = _real(per_class=2)
    seen = []
    valuation = _valuation(LossUtility())
    score = valuation.score
    valuation.score = lambda x, y: seen.append(y.clone()) or score(x, y)  # type: ignore[method-assign]
    mislabel_auroc(valuation, images, labels)
    true_labels, wrong = seen
    assert torch.equal(true_labels, labels)
    pairs = {(int(y), int(w)) for y, w in zip(labels.repeat(K - 1), wrong, strict=True)}
    assert len(wrong) == len(labels) * (K - 1)
    assert all(y != w for y, w in pairs)
    assert len(pairs) == K * (K - 1)


def test_the_refresh_check_keeps_the_valuation_that_ranks_labels_better():
    images, labels = _real()
    real = SimpleNamespace(meta=SimpleNamespace(images=images, labels=labels))
    good, inverted = _valuation(LossUtility()), _valuation(_InvertedUtility())
    rejected = loop.refresh_check(good, inverted, real)
    assert rejected == {"mislabel_auroc_in_use": 1.0, "mislabel_auroc_refreshed": 0.0, "passed": False}
    assert loop.refresh_check(inverted, good, real)["passed"]
    assert loop.refresh_check(good, good, real)["passed"]  # a tie adopts the refit: it saw the newer candidates


@pytest.mark.parametrize("check", [True, False])
def test_a_failed_refresh_check_keeps_the_valuation_in_use_unless_turned_off(tmp_path, monkeypatch, check):
    failing = {"mislabel_auroc_in_use": 0.7, "mislabel_auroc_refreshed": 0.3, "passed": False}
    monkeypatch.setattr(loop, "refresh_check", lambda *args: dict(failing))
    out = tmp_path / "run"
    setting = f"mlco.refresh_check={'true' if check else 'false'}"
    assert cli.main(["--preset", "smoke", "--quiet", "--out", str(out), "--set", setting]) == 0
    round_dir = out / "mlco" / "round-1"
    assert json.loads((round_dir / "round.json").read_text())["valuation_refresh"] == failing | {"adopted": not check}
    assert (round_dir / "valuation-rejected").exists() is check
    assert (round_dir / "valuation").exists() is not check
    log = (out / "run.log").read_text()
    assert ("keeping the one in use" in log) is check
    assert ("adopted anyway (mlco.refresh_check=false)" in log) is not check
