"""The judge (what a pool shows) and the validation studies' bookkeeping."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from utilgen import experiment
from utilgen.data.fashion_mnist import CLASS_NAMES
from utilgen.judge import Judge, judge_pools, load_judge


class _Says(nn.Module):
    """A 'classifier' whose prediction for image i is ``answers[i]`` (the image's first pixel holds i)."""

    def __init__(self, answers: list[int]):
        super().__init__()
        self.answers = torch.tensor(answers)
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        index = images[:, 0, 0, 0].round().long()
        return nn.functional.one_hot(self.answers[index], len(CLASS_NAMES)).float()


def test_verdicts_count_the_right_class_and_the_right_group():
    labels = torch.tensor([5, 5, 5, 0])  # sandal x3, t-shirt
    answers = [5, 7, 1, 6]  # right; sneaker (footwear too); trouser (other); shirt (tops too)
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()
    verdicts = Judge(_Says(answers), image_size=16).verdicts(images, labels)
    assert verdicts["fine"] == 0.25
    assert verdicts["coarse"] == 0.75
    assert verdicts["per_class"]["sandal"] == {"fine": round(1 / 3, 4), "coarse": round(2 / 3, 4)}
    assert verdicts["per_class"]["t-shirt/top"] == {"fine": 0.0, "coarse": 1.0}
    assert verdicts["images"] == 4


def test_the_committed_judge_sees_real_validation_images():
    from utilgen.data.fashion_mnist import load_validation

    data = load_validation(16)
    verdicts = load_judge().verdicts(data.images[::10], data.labels[::10])
    assert verdicts["fine"] > 0.8  # 85.8% on all 6000 when it was trained (judge.json)
    assert verdicts["coarse"] > 0.93


def test_judge_pools_only_for_fashion_mnist_classes():
    assert judge_pools({}, ("cat", "dog")) is None
    assert judge_pools({}, CLASS_NAMES) == {}


def test_grid_settings_are_the_product_of_the_axes():
    grid = experiment.grid_settings(["tokens.steps=200,400", "tokens.lr=5e-3"])
    assert grid == [["tokens.steps=200", "tokens.lr=5e-3"], ["tokens.steps=400", "tokens.lr=5e-3"]]
    assert experiment.grid_settings([]) == [[]]
    assert experiment.setting_name(grid[0]) == "tokens.steps=200__tokens.lr=5e-3"
    with pytest.raises(SystemExit, match="KEY=V1,V2"):
        experiment.grid_settings(["tokens.steps"])


def test_a_study_resumes_from_the_settings_it_finished(tmp_path, monkeypatch):
    calls = []

    def fake_study(cfg, seed, *, judge, progress):
        calls.append((cfg.tokens.steps, seed))
        return {
            "seed": seed,
            "judge": {"fine": 0.4, "coarse": 0.9},
            "plain_synthetic_only": {"mean": 0.5},
            "token_moved_relative": [0.1],
        }

    monkeypatch.setattr(experiment, "tokens_study", fake_study)
    monkeypatch.setattr("utilgen.judge.load_judge", lambda: None)
    args = ["tokens", "--out", str(tmp_path), "--grid", "tokens.steps=3,4", "--seeds", "0,1", "--quiet"]
    assert experiment.main(args) == 0
    assert calls == [(3, 0), (3, 1), (4, 0), (4, 1)]
    row = json.loads((tmp_path / "tokens.steps=3" / "seed-1.json").read_text())
    assert row["config"]["data"]["source"] == "validation"  # never the test subset
    assert row["config"]["data"]["split_seed"] == 1
    assert experiment.main(args) == 0
    assert len(calls) == 4  # nothing ran twice
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["tokens.steps=4"]["plain_synthetic_only_per_seed"] == [0.5, 0.5]


def test_the_mlco_study_compares_the_tuned_generator_with_plain_on_validation(tmp_path):
    args = ["mlco", "--out", str(tmp_path), "--preset", "smoke", "--seeds", "0", "--grid", "mlco.lr=1e-4", "--quiet"]
    assert experiment.main(args) == 0
    row = json.loads((tmp_path / "mlco.lr=1e-4" / "seed-0.json").read_text())
    assert row["config"]["data"]["source"] == "validation"
    assert set(row["accuracy"]) == {"plain synthetic-only", "+mlco synthetic-only"}
    assert len(row["rounds"]) == row["config"]["mlco"]["rounds"]
    assert set(row["judge"]) == {"plain", "+mlco"}
    summary = json.loads((tmp_path / "summary.json").read_text())["mlco.lr=1e-4"]
    assert summary["mlco_minus_plain"]["seeds"] == len(row["config"]["evaluation"]["seeds"])


def test_auroc_is_the_share_of_right_over_wrong_pairs_with_ties_half():
    from utilgen.valuation import auroc

    generator = torch.Generator().manual_seed(0)
    right = torch.randint(0, 5, (40,), generator=generator).float()  # many ties
    wrong = torch.randint(0, 4, (30,), generator=generator).float()
    pairs = (right[:, None] > wrong[None, :]).float() + 0.5 * (right[:, None] == wrong[None, :]).float()
    assert auroc(right, wrong) == pytest.approx(float(pairs.mean()), abs=1e-4)
    assert auroc(right, torch.empty(0)) is None


def test_verdicts_report_the_utility_auroc_when_the_pool_is_valued():
    labels = torch.tensor([5, 5, 5, 0])
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 16, 16).clone()
    judge = Judge(_Says([5, 7, 1, 0]), image_size=16)  # right, wrong, wrong, right
    assert judge.verdicts(images, labels, torch.tensor([0.9, 0.1, 0.2, 0.8]))["utility_auroc"] == 1.0
    assert "utility_auroc" not in judge.verdicts(images, labels, torch.full((4,), float("nan")))
