"""Final evaluation: the training recipe, augmentation, checkpointed resume."""

from __future__ import annotations

import json

import pytest
import torch

from utilgen.config import EvaluationConfig
from utilgen.data import LabelledImages, resize_images
from utilgen.evaluate import (
    NonFiniteTrainingError,
    TrainingSet,
    augment,
    evaluate,
    joint,
    summarise,
    train_classifier,
)

CLASSES = ("a", "b", "c")


def _task(n_per_class: int, seed: int) -> LabelledImages:
    """Three classes told apart by where a bright square sits: learnable by a small CNN in a few steps."""
    g = torch.Generator().manual_seed(seed)
    images = 0.1 * torch.rand(3 * n_per_class, 1, 16, 16, generator=g)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    for i, label in enumerate(labels.tolist()):
        images[i, :, 2:7, 2 + 5 * label : 7 + 5 * label] = 1.0
    return LabelledImages(images, labels, CLASSES)


# No augmentation: the toy classes differ by horizontal position, which a flip would swap.
CONFIG = EvaluationConfig(seeds=(0, 1), steps=80, batch_size=16, lr=0.05, augment=False)


def test_a_learnable_task_is_learned_and_training_is_deterministic():
    train, test = _task(20, 0), _task(30, 1)
    results = evaluate([TrainingSet("toy", train, "real", None)], test, CONFIG, device=torch.device("cpu"))
    again = evaluate([TrainingSet("toy", train, "real", None)], test, CONFIG, device=torch.device("cpu"))
    assert results == again
    assert results["toy"]["mean"] > 0.9
    assert results["toy"]["train_size"] == 60
    assert len(results["toy"]["accuracies"]) == 2


def test_checkpoint_resume_gives_the_uninterrupted_numbers(tmp_path):
    train, test = _task(20, 0), _task(30, 1)
    settings = [TrainingSet("one", train, "real", None), TrainingSet("two", _task(10, 2), "synthetic", "p")]
    full = evaluate(settings, test, CONFIG, device=torch.device("cpu"))
    checkpoint = tmp_path / "partial.json"
    evaluate(settings[:1], test, CONFIG, device=torch.device("cpu"), checkpoint=checkpoint)  # "killed" after one
    assert set(json.loads(checkpoint.read_text())["done"]) == {"one|0", "one|1"}
    resumed = evaluate(settings, test, CONFIG, device=torch.device("cpu"), checkpoint=checkpoint)
    assert resumed == full


def test_checkpointed_results_count_only_under_their_key(tmp_path):
    checkpoint = tmp_path / "partial.json"
    checkpoint.write_text(json.dumps({"key": "k1", "done": {"one|0": 0.25, "one|1": 0.75}}))
    setting = [TrainingSet("one", _task(5, 0), "real", None)]
    results = evaluate(
        setting, _task(5, 1), CONFIG, device=torch.device("cpu"), checkpoint=checkpoint, checkpoint_key="k1"
    )
    assert results["one"]["accuracies"] == [0.25, 0.75]
    assert results["one"]["mean"] == 0.5
    other = evaluate(
        setting, _task(5, 1), CONFIG, device=torch.device("cpu"), checkpoint=checkpoint, checkpoint_key="k2"
    )  # another config: the saved numbers must not leak in
    assert other["one"]["accuracies"] != [0.25, 0.75]
    assert json.loads(checkpoint.read_text())["key"] == "k2"


def test_training_with_augmentation_is_deterministic():
    config = EvaluationConfig(seeds=(0,), steps=10, batch_size=16, augment=True)
    train = _task(5, 0)
    first = train_classifier(train, config, seed=3, device=torch.device("cpu"))
    second = train_classifier(train, config, seed=3, device=torch.device("cpu"))
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_diverging_training_stops_with_a_clear_error():
    config = EvaluationConfig(seeds=(0,), steps=50, batch_size=16, lr=1e12)
    with pytest.raises(NonFiniteTrainingError, match=r"lower evaluation\.lr"):
        train_classifier(_task(10, 0), config, seed=0, device=torch.device("cpu"))


def test_augment_shifts_and_flips_within_bounds():
    images = torch.zeros(64, 1, 16, 16)
    images[:, :, 6:10, 6:10] = 1.0
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.allclose(out.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))  # the square moves, stays whole
    moved = (out != images).flatten(1).any(dim=1)
    assert 0 < int(moved.sum()) < 64
    again = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_joint_resizes_synthetic_to_the_real_size():
    real = _task(2, 0)
    synthetic = LabelledImages(torch.rand(4, 1, 32, 32), torch.tensor([0, 1, 2, 0]), CLASSES)
    both = joint(real, synthetic)
    assert both.images.shape == (10, 1, 16, 16)
    assert both.labels.tolist()[-4:] == [0, 1, 2, 0]
    assert resize_images(real.images, 16) is real.images


def test_summarise():
    assert summarise([0.5]) == {"accuracies": [0.5], "mean": 0.5, "std": 0.0}
    result = summarise([0.4, 0.6])
    assert result["mean"] == pytest.approx(0.5)
    assert result["std"] == pytest.approx(0.1414, abs=1e-4)


def test_evaluation_classifiers_have_their_own_seed_stream():
    from utilgen.evaluate import classifier_seed
    from utilgen.models import build_classifier

    def initial_weights(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return build_classifier("cnn-small", num_classes=10, in_channels=1, image_size=16).head[-1].weight

    todv = initial_weights(0)  # TODV seeds its classifier with the run seed itself
    evaluation = initial_weights(classifier_seed(0, "init"))
    assert not torch.equal(todv, evaluation)
    assert classifier_seed(0, "init") != classifier_seed(0, "batches") != classifier_seed(1, "init")
