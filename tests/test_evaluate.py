"""Final evaluation: the training recipe, augmentation, checkpointed resume, batched (stacked, lanes) training."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace

import pytest
import torch

import utilgen.evaluate as evaluate_module
from utilgen.config import ConfigError, EvaluationConfig
from utilgen.data import LabelledImages, resize_images
from utilgen.evaluate import (
    NonFiniteTrainingError,
    TrainingPlan,
    TrainingSet,
    TrainingStopped,
    augment,
    evaluate,
    job_digests,
    joint,
    summarise,
    train_classifier,
    train_classifiers,
    training_plan,
)
from utilgen.models import build_classifier
from utilgen.models.stacked import StackedSmallCNN

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


# ------------------------------------------------------------------------------------ batched evaluation


def _toy_jobs() -> list[tuple[LabelledImages, int]]:
    """Three classifiers on two training sets of different sizes (the stack shares only the batch size)."""
    return [(_task(20, 0), 0), (_task(20, 0), 1), (_task(12, 5), 0)]


def test_stacked_training_follows_each_sequential_run():
    # Augmentation and dropout on: the stack must replay each member's batches, shifts, flips and masks.
    # One member (a CPU lane) and three (a CUDA stack: grouped convolutions) alike.
    config = EvaluationConfig(seeds=(0,), steps=12, batch_size=16, augment=True)
    for jobs in (_toy_jobs()[:1], _toy_jobs()):
        stacked = train_classifiers(jobs, config, device=torch.device("cpu"))
        for (train, seed), member in zip(jobs, stacked, strict=True):
            alone = train_classifier(train, config, seed=seed, device=torch.device("cpu"))
            for name, value in alone.state_dict().items():
                # float rounding only (grouped convolutions sum in another order): measured 6e-6 after 12 steps;
                # all-ones dropout masks in place of the replayed ones: 0.045.
                torch.testing.assert_close(member.state_dict()[name], value, rtol=0, atol=1e-4, msg=name)


def test_a_stacked_member_does_not_depend_on_the_others():
    config = EvaluationConfig(seeds=(0,), steps=8, batch_size=16, augment=True)
    first, second, _ = _toy_jobs()
    other = (LabelledImages(torch.rand(40, 1, 16, 16), torch.randint(0, 3, (40,)), CLASSES), 7)
    with_second = train_classifiers([first, second], config, device=torch.device("cpu"))[0]
    with_other = train_classifiers([first, other], config, device=torch.device("cpu"))[0]
    for name, value in with_second.state_dict().items():
        assert torch.equal(with_other.state_dict()[name], value), name


def test_batched_evaluation_gives_the_sequential_accuracies():
    train, test = _task(20, 0), _task(30, 1)
    settings = [TrainingSet("one", train, "real", None), TrainingSet("two", _task(6, 2), "synthetic", "p")]
    config = EvaluationConfig(seeds=(0, 1), steps=30, batch_size=16, lr=0.05, augment=False)
    batched = evaluate(settings, test, config, device=torch.device("cpu"))
    sequential = evaluate(settings, test, replace(config, batched=False), device=torch.device("cpu"))
    assert batched.keys() == sequential.keys()
    for name, result in batched.items():
        # Equal up to float rounding grown over 30 SGD steps: at most 2 of the 90 test images may flip.
        assert result["accuracies"] == pytest.approx(sequential[name]["accuracies"], abs=2 / 90), name
        assert {k: v for k, v in result.items() if k not in ("accuracies", "mean", "std")} == {
            k: v for k, v in sequential[name].items() if k not in ("accuracies", "mean", "std")
        }
    assert 0.5 < batched["one"]["mean"] < 1.01  # learned at all: the comparison is not of two chance levels


def _noisy_task(n: int, seed: int) -> LabelledImages:
    """Random images and labels: accuracies near chance, not all 1.0 (as the toy task's), so a classifier
    resumed with the wrong seed or data shows."""
    g = torch.Generator().manual_seed(seed)
    return LabelledImages(torch.rand(n, 1, 16, 16, generator=g), torch.randint(0, 3, (n,), generator=g), CLASSES)


def test_a_killed_batched_evaluation_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch):
    settings = [TrainingSet(name, _noisy_task(30, seed), "real", None) for seed, name in enumerate(("a", "b", "c"))]
    test, config = _noisy_task(200, 9), replace(CONFIG, steps=40)
    full = evaluate(settings, test, config, device=torch.device("cpu"))
    checkpoint = tmp_path / "partial.json"
    real_train_classifiers, calls = evaluate_module.train_classifiers, []

    def killed_at_the_third(*args, **kwargs):  # the kill lands as the third classifier starts
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train_classifiers(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "train_classifiers", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        evaluate(settings, test, config, device=torch.device("cpu"), checkpoint=checkpoint)
    finished = set(json.loads(checkpoint.read_text())["done"])
    assert finished  # the classifiers finished before the kill are kept ...
    assert len(finished) < 6  # ... and the others are not
    monkeypatch.undo()
    resumed = evaluate(settings, test, config, device=torch.device("cpu"), checkpoint=checkpoint)
    assert resumed == full


def test_a_job_digest_names_the_data_test_recipe_and_seed_not_the_setting():
    train, test, cpu = _noisy_task(30, 0), _noisy_task(50, 1), torch.device("cpu")
    digests = job_digests([TrainingSet("a", train, "real", None)], test, CONFIG, cpu)
    assert list(digests) == ["a|0", "a|1"]
    assert digests["a|0"] != digests["a|1"]  # the seed
    renamed = job_digests([TrainingSet("b", train, "joint", "p")], test, CONFIG, cpu)
    assert list(renamed.values()) == list(digests.values())  # equal data is the same job
    more_seeds = replace(CONFIG, seeds=(0, 1, 2), ablation=True)  # choose jobs, do not change them
    assert list(job_digests([TrainingSet("a", train, "real", None)], test, more_seeds, cpu).values())[:2] == list(
        digests.values()
    )
    changed = _noisy_task(30, 0)
    changed.images[0, 0, 0, 0] += 1e-3
    for other in (
        job_digests([TrainingSet("a", changed, "real", None)], test, CONFIG, cpu),  # one pixel of the training set
        job_digests([TrainingSet("a", train, "real", None)], _noisy_task(50, 2), CONFIG, cpu),  # the test split
        job_digests([TrainingSet("a", train, "real", None)], test, replace(CONFIG, lr=0.04), cpu),  # the recipe
        job_digests([TrainingSet("a", train, "real", None)], test, replace(CONFIG, batched=False), cpu),
        job_digests([TrainingSet("a", train, "real", None)], test, CONFIG, torch.device("meta")),  # the device
    ):
        assert not set(other.values()) & set(digests.values())


def test_known_accuracies_are_taken_and_only_the_other_jobs_train(monkeypatch):
    settings = [TrainingSet(name, _noisy_task(30, seed), "real", None) for seed, name in enumerate(("a", "b"))]
    test, config, cpu = _noisy_task(200, 9), replace(CONFIG, steps=40), torch.device("cpu")
    full = evaluate(settings, test, config, device=cpu)
    trained, real_train_classifiers = [], evaluate_module.train_classifiers

    def counting(jobs, *args, **kwargs):
        trained.extend(jobs)
        return real_train_classifiers(jobs, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "train_classifiers", counting)
    known = {"a|0": full["a"]["accuracies"][0], "a|1": full["a"]["accuracies"][1]}
    extended = evaluate(settings, test, config, device=cpu, known=known)
    assert extended == full
    assert len(trained) == 2  # b's two classifiers only


def test_a_diverging_member_stops_the_batched_evaluation_naming_its_setting():
    settings = [TrainingSet("fine", _task(10, 0), "real", None), TrainingSet("loud", _task(10, 1), "real", None)]
    config = EvaluationConfig(seeds=(0, 1), steps=50, batch_size=16, lr=1e12)
    with pytest.raises(NonFiniteTrainingError, match=r"(fine|loud) \(seed [01]\).*lower evaluation\.lr"):
        evaluate(settings, _task(5, 2), config, device=torch.device("cpu"))


def test_stacked_training_names_the_member_whose_loss_is_not_finite():
    bad = _task(10, 1)
    bad.images.fill_(float("nan"))  # after LabelledImages' checks: only this member's loss turns NaN
    config = EvaluationConfig(seeds=(0,), steps=5, batch_size=16)
    with pytest.raises(NonFiniteTrainingError, match=r"^bad: the training loss is nan at step 0"):
        train_classifiers([(_task(10, 0), 0), (bad, 0)], config, device=torch.device("cpu"), names=["good", "bad"])


def test_a_stop_request_ends_stacked_training_at_the_next_step():
    stop = threading.Event()
    stop.set()
    with pytest.raises(TrainingStopped, match="stopped at step 0"):
        train_classifiers(_toy_jobs()[:1], CONFIG, device=torch.device("cpu"), stop=stop)


def test_batchnorm_classifiers_fall_back_to_sequential_training(caplog):
    jobs = [(TrainingSet("one", _task(4, 0), "real", None), seed) for seed in (0, 1)]
    with caplog.at_level(logging.INFO, logger="utilgen.evaluate"):
        plan = training_plan(jobs, EvaluationConfig(classifier="resnet18"), torch.device("cpu"))
    assert plan == TrainingPlan([[job] for job in jobs], stacked=False, lanes=1)
    assert "resnet18 has BatchNorm" in caplog.text
    assert training_plan(jobs, EvaluationConfig(batched=False), torch.device("cpu")).stacked is False


def test_the_plan_stacks_jobs_of_one_shape_on_accelerators_and_uses_lanes_on_cpu(monkeypatch):
    small, large = _task(4, 0), _task(30, 1)  # batch 16: 12 images give batch 12, 90 give 16
    odd = LabelledImages(torch.rand(90, 1, 8, 8), torch.randint(0, 3, (90,)), CLASSES)  # another image size
    jobs = [
        (TrainingSet(name, data, "real", None), seed)
        for name, data in [("s", small), ("l", large), ("o", odd)]
        for seed in (0, 1, 2)
    ]
    monkeypatch.setattr(evaluate_module, "MAX_STACK", 2)
    config = EvaluationConfig(seeds=(0, 1, 2), batch_size=16)
    plan = training_plan(jobs, config, torch.device("cuda"))
    names = [[f"{setting.name}{seed}" for setting, seed in group] for group in plan.groups]
    assert names == [["s0", "s1"], ["s2"], ["l0", "l1"], ["l2"], ["o0", "o1"], ["o2"]]
    monkeypatch.setattr(evaluate_module, "STACK_PIXELS", 16 * 16 * 16)  # one 16x16 batch of 16 (or 12) a group
    sizes = [len(group) for group in training_plan(jobs, config, torch.device("cuda")).groups]
    assert sizes == [1, 1, 1, 1, 1, 1, 2, 1]  # the 8x8 batches of 16 still pair up
    assert plan.stacked
    assert plan.lanes == 1
    cpu = training_plan(jobs, config, torch.device("cpu"))
    assert cpu.groups == [[job] for job in jobs]
    assert cpu.stacked
    assert cpu.lanes == torch.get_num_threads()


def test_the_stacked_model_is_its_members_side_by_side():
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_classifier("cnn-small", num_classes=4, in_channels=2, image_size=16).eval())
    stack = StackedSmallCNN(members)
    images = torch.rand(3, 5, 2, 16, 16)  # (G, N, C, H, W): each member its own images
    expected = torch.stack([member(images[g]) for g, member in enumerate(members)])
    torch.testing.assert_close(stack(images), expected, rtol=1e-5, atol=1e-6)
    for g, member in enumerate(members):
        state = stack.member_state_dict(g)
        assert state.keys() == member.state_dict().keys()
        assert all(torch.equal(state[name], value) for name, value in member.state_dict().items())
    with pytest.raises(ValueError, match="one architecture"):
        StackedSmallCNN([members[0], build_classifier("cnn-small", num_classes=5, in_channels=2, image_size=16)])
    with pytest.raises(ValueError, match="SmallCNN"):
        StackedSmallCNN([build_classifier("resnet18", num_classes=4, in_channels=2, image_size=16)])


def test_evaluation_config_batched_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"evaluation\.batched must be true or false"):
        EvaluationConfig(batched="yes")
