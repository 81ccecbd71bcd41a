"""The T-step look-ahead meta-gradient (reverse recursion with HVPs) against the exact T-step unroll.

fp64 problems check the recursion's algebra (tolerances near rounding); fp32 problems check the
stated bounds of the finite differences. lr 0.5 on the tiny models makes the curvature term large,
so an error in it cannot hide (``test_the_curvature_term_is_tested`` checks that).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

import utilgen.valuation.multistep as multistep
from utilgen.models import WeightNet, build_classifier
from utilgen.valuation.multistep import (
    HVP_METHODS,
    MultiStepLookahead,
    exact_unrolled_meta_gradient,
    unrolled_hvp_meta_gradient,
)
from utilgen.valuation.strategies import Lookahead, meta_gradient

CLASSES = 5
SEED = 100  # the dropout draws: every compared call starts from it


def _tiny_cnn(activation=nn.ReLU, dropout=0.5):
    # SmallCNN's pieces at 8x8: bias-free convs, GroupNorm, ReLU, dropout before the head.
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False),
        nn.GroupNorm(2, 4),
        activation(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        nn.GroupNorm(2, 4),
        activation(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(4 * 4 * 4, CLASSES),
    )


def _linear():
    return nn.Sequential(nn.Flatten(), nn.Linear(8 * 8, CLASSES))


def _problem(model, steps, *, dtype=torch.float64, n=12, m=10, lr=0.5, masks=None, normalize=True, features=("loss",)):
    model = model.to(dtype).train()
    batches = [(torch.rand(n, 1, 8, 8, dtype=dtype), torch.randint(0, CLASSES, (n,))) for _ in range(steps)]
    meta_inputs, meta_targets = torch.rand(m, 1, 8, 8, dtype=dtype), torch.randint(0, CLASSES, (m,))

    def model_fn(params, inputs):
        return functional_call(model, params, (inputs,))

    params = {name: p.detach() for name, p in model.named_parameters()}
    weight_net = WeightNet(hidden=16, features=features).to(dtype)
    return MultiStepLookahead(
        model_fn, params, weight_net, features, batches, meta_inputs, meta_targets, lr, masks, normalize
    )


def _seeded(compute, *args, **kwargs):
    torch.manual_seed(SEED)
    return compute(*args, **kwargs)


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


def _relative_error(got: dict, expected: dict) -> float:
    return float((_flat(got) - _flat(expected)).norm() / _flat(expected).norm())


# --------------------------------------------------------------------------- exact algebra in fp64


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("hvp_method", ["exact", "forward_over_reverse"])
@pytest.mark.parametrize("model", [_tiny_cnn, _linear], ids=["cnn", "linear"])
def test_recursion_equals_exact_unroll_fp64(model, hvp_method, steps):
    torch.manual_seed(steps)
    problem = _problem(model(), steps)
    expected = _seeded(exact_unrolled_meta_gradient, problem)
    got = _seeded(unrolled_hvp_meta_gradient, problem, hvp_method=hvp_method)
    assert float(_flat(expected.phi_grads).norm()) > 0  # not vacuous
    # Measured <= 5e-15: the same derivative by two fp64 algorithms.
    assert _relative_error(got.phi_grads, expected.phi_grads) < 1e-10
    torch.testing.assert_close(got.meta_loss, expected.meta_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.per_sample_loss, expected.per_sample_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(got.weights, expected.weights, rtol=1e-12, atol=0)


@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
def test_weight_masks_and_normalisation_fp64(normalize):
    """Masked rows (real samples) get weight 1 and no meta-gradient in every step; normalisation per batch."""
    torch.manual_seed(0)
    masks = [torch.arange(12) % 3 != 0, None, torch.arange(12) % 2 == 0]
    problem = _problem(_tiny_cnn(), 3, masks=masks, normalize=normalize, features=("loss", "entropy", "margin"))
    expected = _seeded(exact_unrolled_meta_gradient, problem)
    got = _seeded(unrolled_hvp_meta_gradient, problem)
    assert _relative_error(got.phi_grads, expected.phi_grads) < 1e-10
    torch.testing.assert_close(got.weights, expected.weights, rtol=1e-12, atol=0)
    if normalize:
        torch.testing.assert_close(got.weights.mean(), torch.tensor(1.0, dtype=got.weights.dtype))
    else:
        assert torch.equal(got.weights[~masks[0]], torch.ones(4, dtype=got.weights.dtype))
    unmasked = _seeded(unrolled_hvp_meta_gradient, _problem_like(problem, weight_masks=None))
    assert _relative_error(unmasked.phi_grads, got.phi_grads) > 1e-2  # the masks change the answer


def _problem_like(problem: MultiStepLookahead, **changes) -> MultiStepLookahead:
    return MultiStepLookahead(**{**problem.__dict__, **changes})


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("tangent", ["forward", "finite_difference"])
def test_gauss_newton_is_exact_for_a_linear_model(tangent, steps):
    torch.manual_seed(steps)
    problem = _problem(_linear(), steps)
    expected = _seeded(exact_unrolled_meta_gradient, problem)
    got = _seeded(unrolled_hvp_meta_gradient, problem, hvp_method="gauss_newton", tangent=tangent)
    # Forward mode: measured <= 3e-15. The one-sided logit difference is exact for logits linear in theta up
    # to rounding at its step (0.3 sqrt(u) / ||v||): measured <= 9e-8.
    assert _relative_error(got.phi_grads, expected.phi_grads) < (1e-10 if tangent == "forward" else 1e-6)


def test_gauss_newton_is_an_approximation_for_a_nonlinear_model():
    """GroupNorm and products of layers have curvature G drops: the linear-model test above is not vacuous."""
    torch.manual_seed(0)
    problem = _problem(_tiny_cnn(), 3)
    expected = _seeded(exact_unrolled_meta_gradient, problem)
    got = _seeded(unrolled_hvp_meta_gradient, problem, hvp_method="gauss_newton")
    assert _relative_error(got.phi_grads, expected.phi_grads) > 1e-3


def test_the_curvature_term_is_tested(monkeypatch):
    """Without H_t v (v_t = v_{t+1}) the answer is far outside the tolerances above."""
    torch.manual_seed(3)
    problem = _problem(_tiny_cnn(), 3)
    expected = _seeded(exact_unrolled_meta_gradient, problem)
    monkeypatch.setattr(
        multistep, "hvp", lambda loss_fn, params, v, method: {k: torch.zeros_like(t) for k, t in v.items()}
    )
    first_order = _seeded(unrolled_hvp_meta_gradient, problem)
    assert _relative_error(first_order.phi_grads, expected.phi_grads) > 1e-2


# --------------------------------------------------------------------------- finite differences


def test_finite_differences_fp64_smooth_model():
    """Both differences at their default steps on a smooth (tanh) network: truncation and rounding only."""
    torch.manual_seed(0)
    problem = _problem(_tiny_cnn(nn.Tanh), 3)
    expected = _seeded(exact_unrolled_meta_gradient, problem)
    got = _seeded(unrolled_hvp_meta_gradient, problem, hvp_method="finite_difference", tangent="finite_difference")
    assert _relative_error(got.phi_grads, expected.phi_grads) < 1e-5  # measured 5e-7 (2e-8 .. 5e-7 over 3 seeds)


@pytest.mark.parametrize("steps", [2, 3])
def test_finite_differences_fp32_within_stated_bound(steps):
    """fp32, smooth network: stated bound 3e-2 relative; measured 9e-4 .. 7e-3 over these seeds and T.

    On ReLU networks the difference of gradients crosses kinks and is not an HVP estimate at all
    (see the module docstring); there only the logit tangent may be a finite difference.
    """
    errors = []
    for seed in range(3):
        torch.manual_seed(seed)
        problem = _problem(_tiny_cnn(nn.Tanh), steps, dtype=torch.float32)
        expected = _seeded(exact_unrolled_meta_gradient, problem)
        got = _seeded(unrolled_hvp_meta_gradient, problem, hvp_method="finite_difference", tangent="finite_difference")
        errors.append(_relative_error(got.phi_grads, expected.phi_grads))
    assert max(errors) < 3e-2, errors


def test_finite_difference_tangent_fp32_relu_network():
    """The one-sided logit difference stays accurate on ReLU networks (logits are continuous at kinks).

    Stated bound 1e-2; measured 3e-4 .. 1.1e-3. (A difference of gradients, hvp_method="finite_difference",
    gives 2e-2 .. 0.5 on the same problems: it crosses kinks.)
    """
    errors = []
    for seed in range(3):
        torch.manual_seed(seed)
        problem = _problem(_tiny_cnn(), 3, dtype=torch.float32)
        expected = _seeded(exact_unrolled_meta_gradient, problem)
        got = _seeded(unrolled_hvp_meta_gradient, problem, hvp_method="exact", tangent="finite_difference")
        errors.append(_relative_error(got.phi_grads, expected.phi_grads))
    assert max(errors) < 1e-2, errors


# --------------------------------------------------------------------------- T = 1 is the one-step strategy


@pytest.mark.parametrize("hvp_method", HVP_METHODS)
def test_one_step_reproduces_the_one_step_strategies(hvp_method):
    """T = 1 on cnn-small (dropout, fixed real weights, normalised) against strategies.py, fp32."""
    torch.manual_seed(0)
    classifier = build_classifier("cnn-small", num_classes=CLASSES, in_channels=1, image_size=8)  # train mode
    problem = _problem(classifier, 1, dtype=torch.float32, n=16, m=11, lr=0.1, masks=[torch.arange(16) % 3 != 0])
    (inputs, targets), mask = problem.batches[0], problem.weight_masks[0]
    one_step = Lookahead(
        problem.model_fn, problem.params, problem.weight_net, problem.features, inputs, targets,
        problem.meta_inputs, problem.meta_targets, problem.inner_lr, mask, problem.normalize,
    )  # fmt: skip
    exact = _seeded(meta_gradient, one_step, "exact")
    for name, grad in _seeded(exact_unrolled_meta_gradient, problem).phi_grads.items():
        torch.testing.assert_close(grad, exact.phi_grads[name])  # the two references agree
    forward = _seeded(unrolled_hvp_meta_gradient, problem, hvp_method=hvp_method, tangent="forward")
    differenced = _seeded(unrolled_hvp_meta_gradient, problem, hvp_method=hvp_method, tangent="finite_difference")
    assert _relative_error(forward.phi_grads, exact.phi_grads) < 1e-4  # fp32 double backward vs forward mode
    # The one-sided logit difference at ReLU kinks, exactly strategies.py's finite_difference: measured 1.2e-2.
    assert _relative_error(differenced.phi_grads, exact.phi_grads) < 3e-2
    # The same computation as the one-step strategies, step for step.
    for ours, strategy in ((forward, "directional"), (differenced, "finite_difference")):
        theirs = _seeded(meta_gradient, one_step, strategy)
        for name in theirs.phi_grads:
            torch.testing.assert_close(ours.phi_grads[name], theirs.phi_grads[name])
    torch.testing.assert_close(forward.meta_loss, exact.meta_loss)
    torch.testing.assert_close(forward.weights, exact.weights)
    torch.testing.assert_close(forward.per_sample_loss, exact.per_sample_loss)


# --------------------------------------------------------------------------- randomness, inputs, errors


def _recording(problem: MultiStepLookahead):
    """The problem with a model_fn that logs (which batch, RNG state at entry) for every call."""
    calls = []
    names = {id(x): f"batch{t}" for t, (x, _) in enumerate(problem.batches)} | {id(problem.meta_inputs): "meta"}

    def model_fn(params, inputs):
        calls.append((names[id(inputs)], torch.get_rng_state()))
        return problem.model_fn(params, inputs)

    return _problem_like(problem, model_fn=model_fn), calls


@pytest.mark.parametrize(
    ("hvp_method", "tangent"), [(m, "forward") for m in HVP_METHODS] + [("finite_difference", "finite_difference")]
)
def test_dropout_is_replayed_in_every_pass(hvp_method, tangent):
    """Every pass at theta_t starts from step t's RNG state; the forward phase draws as the exact unroll."""
    torch.manual_seed(0)
    problem, calls = _recording(_problem(_tiny_cnn(), 3))
    _seeded(exact_unrolled_meta_gradient, problem)
    unroll_calls, after_unroll = list(calls), torch.get_rng_state()
    calls.clear()
    _seeded(unrolled_hvp_meta_gradient, problem, hvp_method=hvp_method, tangent=tangent)
    assert torch.equal(torch.get_rng_state(), after_unroll)  # the global RNG ends where the exact unroll leaves it
    assert [name for name, _ in unroll_calls] == ["batch0", "batch1", "batch2", "meta"]
    for name, unroll_state in unroll_calls:
        states = [state for called, state in calls if called == name]
        assert len(states) >= (1 if name == "meta" else 2), (name, len(states))  # every step is replayed
        for state in states:
            assert torch.equal(state, unroll_state), name


@pytest.mark.parametrize(
    ("hvp_method", "tangent"), [(m, "forward") for m in HVP_METHODS] + [("finite_difference", "finite_difference")]
)
def test_params_and_weight_net_untouched(hvp_method, tangent):
    torch.manual_seed(0)
    problem = _problem(_tiny_cnn(), 3, dtype=torch.float32)
    before = {name: t.clone() for name, t in problem.params.items()}
    unrolled_hvp_meta_gradient(problem, hvp_method=hvp_method, tangent=tangent)
    for name, tensor in problem.params.items():
        assert torch.equal(tensor, before[name]), name
        assert not tensor.requires_grad
        assert tensor.grad is None
    assert all(p.grad is None for p in problem.weight_net.parameters())


def test_bad_input_is_rejected():
    torch.manual_seed(0)
    problem = _problem(_linear(), 2)
    with pytest.raises(ValueError, match="at least one training batch"):
        _problem_like(problem, batches=[])
    with pytest.raises(ValueError, match="weight_masks has 1 entries for 2 batches"):
        _problem_like(problem, weight_masks=[None])
    with pytest.raises(ValueError, match=r"weight_masks\[1\] must be a \(12,\) bool tensor"):
        _problem_like(problem, weight_masks=[None, torch.ones(12)])
    with pytest.raises(ValueError, match="N >= 1"):
        _problem_like(problem, batches=[problem.batches[0], (problem.batches[1][0], problem.batches[1][1][:3])])
    with pytest.raises(ValueError, match="unknown hvp_method 'newton'"):
        unrolled_hvp_meta_gradient(problem, hvp_method="newton")
    with pytest.raises(ValueError, match="unknown tangent 'central'"):
        unrolled_hvp_meta_gradient(problem, tangent="central")
