"""TODV end to end at smoke scale: the noisy-label evidence, history, non-finite handling, save/load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from utilgen.config import ValuationConfig
from utilgen.data import LabelledImages, load_embedded, make_splits
from utilgen.models import WeightNet
from utilgen.models.classifier import SmallCNN
from utilgen.valuation import (
    FitHistory,
    NonFiniteLossError,
    Valuation,
    fit_valuation,
    meta_iteration,
    meta_update,
    weighted_step,
)
from utilgen.valuation.trainer import _Batches

FLIP_FRACTION = 0.3


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties count half."""
    pos, neg = positive[:, None], negative[None, :]
    return float(((pos > neg).float() + 0.5 * (pos == neg).float()).mean())


def noisy_task(pool_size: int = 500, seed: int = 0):
    """Real splits of the embedded data and a 'synthetic' pool of other REAL images with 30% of labels flipped."""
    data = load_embedded(16)
    splits = make_splits(data, shots_per_class=16, meta_per_class=10, test_per_class=50, seed=seed)
    used = set().union(*map(set, splits.indices.values()))
    rest = torch.tensor([i for i in range(len(data)) if i not in used])
    generator = torch.Generator().manual_seed(seed)
    pool = data.subset(rest[torch.randperm(len(rest), generator=generator)[:pool_size]])
    flipped = torch.rand(len(pool), generator=generator) < FLIP_FRACTION
    labels = pool.labels.clone()
    shift = torch.randint(1, data.num_classes, (int(flipped.sum()),), generator=generator)
    labels[flipped] = (labels[flipped] + shift) % data.num_classes  # always a wrong class
    return splits, LabelledImages(pool.images, labels, pool.class_names), flipped


SMOKE = ValuationConfig(steps=100, batch_size=64, meta_batch_size=50, inner_lr=0.05)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    splits, noisy, flipped = noisy_task()
    return splits, noisy, flipped, fit_valuation(splits.train, noisy, splits.meta, SMOKE, progress=False)


def test_flipped_labels_get_lower_utility(fitted):
    """Meta-Weight-Net's noisy-label behaviour.

    Measured AUROC 0.909, 0.915, 0.902 (seeds 0-2) at this scale; asserted >= 0.8.
    """
    _, noisy, flipped, valuation = fitted
    utilities = valuation.score(noisy.images, noisy.labels)
    assert utilities.shape == (len(noisy),)
    assert float(utilities.min()) >= 0.0
    assert float(utilities.max()) <= 1.0
    assert auroc(utilities[~flipped], utilities[flipped]) >= 0.8
    _losses, weights = valuation.curve()
    assert float(weights[0]) > float(weights[-1])  # the learned curve falls with the loss


def test_history_records_steps_and_meta_loss_falls(fitted):
    _, _, _, valuation = fitted
    history = valuation.history
    assert len(history.loss) == SMOKE.steps
    assert len(history.meta_loss) == SMOKE.steps
    first, last = history.meta_loss[:10], history.meta_loss[-10:]
    assert sum(last) / 10 < sum(first) / 10 - 0.3  # measured 2.27 -> ~1.35
    assert all(0.0 <= w for w in history.mean_weight_synthetic)


def test_save_load_round_trip_gives_identical_scores(fitted, tmp_path):
    _, noisy, _, valuation = fitted
    valuation.save(tmp_path / "todv")
    loaded = Valuation.load(tmp_path / "todv")
    config = json.loads((tmp_path / "todv" / "valuation.json").read_text())
    assert config["weight_net"] == {"kind": "meta-learned", "hidden": 100, "features": ["loss"]}
    assert config["classifier"] == "cnn-small"
    x, y = noisy.images[:200], noisy.labels[:200]
    assert torch.equal(loaded.score(x, y), valuation.score(x, y))
    assert torch.equal(loaded.curve()[1], valuation.curve()[1])


def test_no_reweighting_baseline_uses_unit_weights():
    splits, noisy, _ = noisy_task(pool_size=100)
    config = ValuationConfig(steps=3, batch_size=32, meta_every=0)
    valuation = fit_valuation(splits.train, noisy, splits.meta, config, progress=False)
    assert valuation.history.meta_loss == []
    assert valuation.history.mean_weight_real == pytest.approx([1.0] * 3, nan_ok=True)
    assert valuation.history.mean_weight_synthetic == pytest.approx([1.0] * 3, nan_ok=True)


def test_non_finite_loss_stops_with_the_partial_result():
    splits, noisy, _ = noisy_task(pool_size=100)
    config = ValuationConfig(steps=50, batch_size=32, meta_batch_size=20, inner_lr=1e6, momentum=0.0)
    with pytest.raises(NonFiniteLossError, match="at step") as info:
        fit_valuation(splits.train, noisy, splits.meta, config, progress=False)
    error = info.value
    assert 0 < error.step < 50
    assert len(error.history.loss) == error.step
    for p in error.valuation.classifier.parameters():
        assert torch.isfinite(p).all()  # the failing step was not applied


def test_curve_needs_the_loss_only_weight_net():
    splits, noisy, _ = noisy_task(pool_size=50)
    config = ValuationConfig(steps=2, batch_size=16, meta_batch_size=10, features=("loss", "margin"))
    valuation = fit_valuation(splits.train, noisy, splits.meta, config, progress=False)
    with pytest.raises(ValueError, match="loss-only"):
        valuation.curve()
    assert valuation.score(noisy.images[:5], noisy.labels[:5]).shape == (5,)


def test_classifier_loss_utility_is_p_of_the_label_without_meta_learning(tmp_path):
    splits, noisy, _flipped = noisy_task(pool_size=200)
    config = ValuationConfig(steps=40, batch_size=32, utility="classifier-loss")
    valuation = fit_valuation(splits.train, noisy, splits.meta, config, progress=False)
    assert valuation.history.meta_loss == []  # no meta step was taken
    assert valuation.history.mean_weight_synthetic == pytest.approx([1.0] * 40, nan_ok=True)
    with torch.no_grad():
        expected = torch.softmax(valuation.classifier(noisy.images), 1).gather(1, noisy.labels.view(-1, 1)).squeeze(1)
    scores = valuation.score(noisy.images, noisy.labels)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    # Differentiable like W_phi's utility: ILPO climbs it.
    images = noisy.images[:4].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(valuation.utility(images, noisy.labels[:4]).sum(), images)
    assert grad.abs().sum() > 0
    loaded = Valuation.load(valuation.save(tmp_path / "v"))
    torch.testing.assert_close(loaded.score(noisy.images, noisy.labels), scores)
    assert json.loads((tmp_path / "v/valuation.json").read_text())["weight_net"] == {"kind": "classifier-loss"}


def test_a_valuation_saved_before_its_kind_was_recorded_still_loads(fitted, tmp_path):
    _, noisy, _, valuation = fitted
    valuation.save(tmp_path / "old")
    path = tmp_path / "old/valuation.json"
    saved = json.loads(path.read_text())
    del saved["weight_net"]["kind"]
    path.write_text(json.dumps(saved))
    torch.testing.assert_close(
        Valuation.load(tmp_path / "old").score(noisy.images, noisy.labels), valuation.score(noisy.images, noisy.labels)
    )


# --------------------------------------------------------------------------- the fused iteration


def _iteration_setup(dropout: float):
    torch.manual_seed(3)
    classifier = SmallCNN(4, 1, (4, 8), dropout=dropout).train()
    weight_net = WeightNet(8)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    meta_optimizer = torch.optim.Adam(weight_net.parameters(), lr=1e-2)
    batch = (torch.rand(12, 1, 8, 8), torch.randint(0, 4, (12,)))
    meta = (torch.rand(10, 1, 8, 8), torch.randint(0, 4, (10,)))
    return classifier, weight_net, optimizer, meta_optimizer, batch, meta


def _run_iterations(dropout: float, real_step: str, *, replay: str | None = None, steps: int = 3):
    """(classifier, weight net, losses) after ``steps`` TODV iterations.

    ``replay``: instead of ``meta_iteration``, its reference: ``meta_update``, then a fresh ``weighted_step``
    that draws the virtual step's dropout masks, weighted by W_phi after ("updated") or before ("previous")
    the phi step.
    """
    classifier, weight_net, optimizer, meta_optimizer, batch, meta = _iteration_setup(dropout)
    losses = []
    for _ in range(steps):
        if replay is None:
            _, loss, _ = meta_iteration(
                classifier,
                weight_net,
                optimizer,
                meta_optimizer,
                batch,
                meta,
                strategy="directional",
                real_step=real_step,
            )
        else:
            state, previous = torch.get_rng_state(), copy.deepcopy(weight_net)
            meta_update(classifier, weight_net, meta_optimizer, batch, meta, strategy="directional", inner_lr=0.05)
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(state)
                weights_from = weight_net if replay == "updated" else previous
                loss, _ = weighted_step(classifier, weights_from, optimizer, batch)
        losses.append(float(loss))
    return classifier, weight_net, losses


def _assert_same_state(a, b, tolerance):
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=tolerance, atol=tolerance, msg=name)


def test_reusing_the_forward_equals_a_second_forward_without_dropout():
    # Without dropout both forwards compute the same function: only float rounding may differ.
    fused = _run_iterations(0.0, "reuse_forward")
    separate = _run_iterations(0.0, "fresh_forward")
    _assert_same_state(fused[0], separate[0], 1e-6)
    _assert_same_state(fused[1], separate[1], 1e-6)
    assert fused[2] == pytest.approx(separate[2], rel=1e-6)


def test_reusing_the_forward_keeps_the_virtual_steps_dropout_masks():
    fused = _run_iterations(0.5, "reuse_forward")
    replayed = _run_iterations(0.5, "fresh_forward", replay="updated")
    fresh = _run_iterations(0.5, "fresh_forward")
    _assert_same_state(fused[0], replayed[0], 1e-6)
    assert fused[2] == pytest.approx(replayed[2], rel=1e-6)
    # and the masks matter: a fresh forward draws new ones and lands elsewhere
    assert any(abs(a - b) > 1e-4 for a, b in zip(fused[2], fresh[2], strict=True))


def test_the_lagged_step_uses_the_weights_from_before_the_phi_step():
    lagged = _run_iterations(0.5, "lagged")
    replayed = _run_iterations(0.5, "fresh_forward", replay="previous")
    updated = _run_iterations(0.5, "reuse_forward")
    _assert_same_state(lagged[0], replayed[0], 1e-6)
    _assert_same_state(lagged[1], replayed[1], 1e-6)
    assert lagged[2] == pytest.approx(replayed[2], rel=1e-6)
    assert any(  # phi moved, so the lag is visible in theta
        not torch.allclose(p, q, rtol=1e-6, atol=1e-7)
        for p, q in zip(lagged[0].parameters(), updated[0].parameters(), strict=True)
    )


def test_an_unknown_real_step_is_refused():
    classifier, weight_net, optimizer, meta_optimizer, batch, meta = _iteration_setup(0.0)
    with pytest.raises(ValueError, match="real_step must be one of"):
        meta_iteration(classifier, weight_net, optimizer, meta_optimizer, batch, meta, strategy="exact", real_step="x")
    with pytest.raises(ValueError, match=r"valuation\.real_step"):
        ValuationConfig(real_step="twice")


def test_a_non_finite_meta_loss_skips_both_steps():
    classifier, weight_net, optimizer, meta_optimizer, batch, meta = _iteration_setup(0.0)
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    phi_before = {k: v.clone() for k, v in weight_net.state_dict().items()}
    bad_meta = (torch.full_like(meta[0], float("nan")), meta[1])
    out, loss, _ = meta_iteration(
        classifier, weight_net, optimizer, meta_optimizer, batch, bad_meta, strategy="finite_difference"
    )
    assert not torch.isfinite(out.meta_loss)
    assert not torch.isfinite(loss)
    for name, value in classifier.state_dict().items():
        assert torch.equal(value, before[name]), name
    for name, value in weight_net.state_dict().items():
        assert torch.equal(value, phi_before[name]), name


# --------------------------------------------------------------------------- the T-step look-ahead in the fit


def test_peeked_batches_are_the_ones_next_returns():
    batches = _Batches(10, 4, torch.Generator().manual_seed(0))
    reference = _Batches(10, 4, torch.Generator().manual_seed(0))
    first = batches.next()
    assert torch.equal(first, reference.next())
    ahead = batches.peek(3)  # crosses an epoch boundary: 10 rows, batches of 4
    assert [torch.equal(a, b) for a, b in zip(batches.peek(2), ahead[:2], strict=True)] == [True, True]
    for expected in ahead:
        got = batches.next()
        assert torch.equal(got, expected)
        assert torch.equal(got, reference.next())


def test_the_unrolled_look_ahead_steps_on_the_batches_the_classifier_trains_on_next(monkeypatch):
    from utilgen.valuation import trainer

    splits, noisy, _ = noisy_task(pool_size=100)
    seen_lookahead, seen_trained = [], []
    real_gradient, real_iteration = trainer.unrolled_hvp_meta_gradient, trainer.meta_iteration

    def recording_gradient(problem, **kwargs):
        seen_lookahead.append([targets.clone() for _, targets in problem.batches])
        return real_gradient(problem, **kwargs)

    def recording_iteration(classifier, weight_net, optimizer, meta_optimizer, batch, *args, **kwargs):
        seen_trained.append(batch[1].clone())
        return real_iteration(classifier, weight_net, optimizer, meta_optimizer, batch, *args, **kwargs)

    monkeypatch.setattr(trainer, "unrolled_hvp_meta_gradient", recording_gradient)
    monkeypatch.setattr(trainer, "meta_iteration", recording_iteration)
    config = ValuationConfig(
        steps=4, batch_size=32, meta_batch_size=20, strategy="unrolled_hvp", lookahead_steps=3, fix_real_weights=True
    )
    valuation = fit_valuation(splits.train, noisy, splits.meta, config, progress=False)
    assert len(valuation.history.meta_loss) == 4
    assert all(len(batches) == 3 for batches in seen_lookahead)
    for step, batches in enumerate(seen_lookahead):
        for ahead, targets in enumerate(batches):
            if step + ahead < len(seen_trained):
                assert torch.equal(targets, seen_trained[step + ahead])


def test_look_ahead_settings_that_cannot_work_are_refused():
    with pytest.raises(ValueError, match=r"needs valuation\.strategy=unrolled_hvp"):
        ValuationConfig(lookahead_steps=3)
    with pytest.raises(ValueError, match="keeps no forward graph"):
        ValuationConfig(strategy="unrolled_hvp", lookahead_steps=2, real_step="reuse_forward")
    with pytest.raises(ValueError, match="lookahead_hvp"):
        ValuationConfig(strategy="unrolled_hvp", lookahead_hvp="newton")


def test_the_one_step_unrolled_look_ahead_takes_the_lagged_step_of_the_exact_strategy():
    # T = 1 with exact products is the one-step look-ahead; both draw dropout in the same order.
    results = {}
    for strategy in ("exact", "unrolled_hvp"):
        classifier, weight_net, optimizer, meta_optimizer, batch, meta = _iteration_setup(0.5)
        torch.manual_seed(11)
        for _ in range(3):
            meta_iteration(
                classifier, weight_net, optimizer, meta_optimizer, batch, meta, strategy=strategy, real_step="lagged"
            )
        results[strategy] = (classifier, weight_net)
    _assert_same_state(results["exact"][0], results["unrolled_hvp"][0], 1e-5)
    _assert_same_state(results["exact"][1], results["unrolled_hvp"][1], 1e-5)


# --------------------------------------------------------------------------- the inversion guard


def test_an_inverted_fit_is_refitted_from_another_seed_and_the_best_kept(monkeypatch):
    """Seed 3 of this task learns a rising w(loss) (flipped-label AUROC 0.07, the meta set's mislabel AUROC
    0.07); fits from other seeds do not (0.88-0.94). The guard must catch it from the meta set alone."""
    from utilgen.valuation import trainer

    splits, noisy, _ = noisy_task(seed=3)
    config = ValuationConfig(restarts=2)
    scores = iter([0.2, 0.4, 0.3])  # every fit inverted: all restarts used, the best (the second) kept
    monkeypatch.setattr(trainer, "mislabel_auroc", lambda *args: next(scores))
    monkeypatch.setattr(trainer, "_fit_once", lambda *args, seed, **kwargs: _StubValuation(seed))
    valuation = fit_valuation(splits.train, noisy, splits.meta, config, seed=3, progress=False)
    attempts = valuation.history.attempts
    assert [a["mislabel_auroc"] for a in attempts] == [0.2, 0.4, 0.3]
    assert [a["kept"] for a in attempts] == [False, True, False]
    assert attempts[0]["seed"] == 3
    assert len({a["seed"] for a in attempts}) == 3
    assert valuation.seed == attempts[1]["seed"]


class _StubValuation:
    """Stands in for a Valuation in the guard's bookkeeping test."""

    def __init__(self, seed):
        self.seed, self.history = seed, FitHistory()


def test_the_guard_repairs_an_inverted_fit_end_to_end(monkeypatch):
    """The first fit is turned upside down (W_phi's output negated before the sigmoid: w -> 1 - w, the ranking
    reversed), as fit seed 3 of this task does on its own on the 2-core Xeon (flipped-label AUROC 0.07; a
    restart there gave 0.93). Inverting by hand keeps the test independent of which seed a CPU inverts."""
    from utilgen.valuation import trainer

    splits, noisy, flipped = noisy_task(seed=0)
    real_fit, fits = trainer._fit_once, []

    def first_fit_inverted(*args, **kwargs):
        valuation = real_fit(*args, **kwargs)
        if not fits:
            last = valuation.weight_net.net[-1]
            with torch.no_grad():
                last.weight.neg_()
                last.bias.neg_()
        fits.append(valuation)
        return valuation

    monkeypatch.setattr(trainer, "_fit_once", first_fit_inverted)
    guarded = fit_valuation(splits.train, noisy, splits.meta, ValuationConfig(restarts=4), seed=0, progress=False)
    utilities = guarded.score(noisy.images, noisy.labels)
    attempts = guarded.history.attempts
    assert attempts[0]["mislabel_auroc"] < 0.5
    assert len(attempts) >= 2
    assert attempts[-1]["kept"]
    assert attempts[-1]["mislabel_auroc"] >= 0.5
    assert guarded is fits[-1]
    # measured on the 2-core Xeon: the first restart inverted on its own too (0.07), the second 0.94
    assert auroc(utilities[~flipped], utilities[flipped]) > 0.7


def test_a_correct_fit_is_not_refitted(fitted):
    *_, valuation = fitted
    assert len(valuation.history.attempts) == 1
    assert valuation.history.attempts[0]["kept"]
    assert valuation.history.attempts[0]["mislabel_auroc"] >= 0.5


def test_a_restart_that_diverges_keeps_the_earlier_fit(monkeypatch):
    from utilgen.valuation import trainer

    splits, noisy, _ = noisy_task(pool_size=100)
    scores = iter([0.2, 0.6])

    def fit_once(*args, seed, **kwargs):
        if seed != 3 and not hasattr(fit_once, "failed"):
            fit_once.failed = True
            raise NonFiniteLossError("TODV: meta loss is nan", step=5, valuation=None, history=FitHistory())
        return _StubValuation(seed)

    monkeypatch.setattr(trainer, "mislabel_auroc", lambda *args: next(scores))
    monkeypatch.setattr(trainer, "_fit_once", fit_once)
    valuation = fit_valuation(splits.train, noisy, splits.meta, ValuationConfig(restarts=2), seed=3, progress=False)
    attempts = valuation.history.attempts
    assert [a["mislabel_auroc"] for a in attempts] == [0.2, None, 0.6]
    assert "nan" in attempts[1]["error"]
    assert [a["kept"] for a in attempts] == [False, False, True]


def test_a_batch_norm_classifier_takes_the_fresh_forward_so_its_statistics_move():
    splits, noisy, _ = noisy_task(pool_size=100)
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 10),
    )
    config = ValuationConfig(steps=3, batch_size=32, meta_batch_size=20, real_step="lagged", restarts=0)
    fit_valuation(splits.train, noisy, splits.meta, config, classifier, progress=False)
    assert int(classifier[1].num_batches_tracked) == 3
    assert float(classifier[1].running_mean.abs().sum()) > 0
