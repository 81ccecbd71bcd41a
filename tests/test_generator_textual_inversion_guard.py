"""Textual inversion's divergence guards (a runaway lr stops the stage with an error naming tokens.lr) and the
loss-rise guard it shares with MLCO's DPO."""

from __future__ import annotations

import pytest
import torch

from tests._generator_models import tiny_embedded
from utilgen.generator.textual_inversion import (
    MAX_TOKEN_NORM_GROWTH,
    LossRiseGuard,
    TokensDivergedError,
    learn_class_tokens,
)


def _shots() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    return torch.rand(6, 1, 28, 28) ** 2, torch.tensor([0, 1, 2] * 2)


def _largest_growth(generator, tokens: torch.Tensor) -> float:
    """The guarded quantity: the largest class token's norm over the initial tokens' mean norm."""
    start = generator.class_tokens.flatten(1).norm(dim=1).mean()
    return float(tokens.flatten(1).norm(dim=1).max() / start)


def test_a_runaway_lr_stops_with_an_error_naming_tokens_lr():
    """tokens.lr=1e9, the issue's case: the loss stays finite (no NaN for save_tokens to catch); the norm shows it."""
    generator = tiny_embedded()
    images, labels = _shots()
    with pytest.raises(TokensDivergedError, match=r"norm reached .* tokens\.lr=1e\+09; lower tokens\.lr") as info:
        learn_class_tokens(generator, images, labels, steps=20, lr=1e9, batch_size=6)
    assert info.value.step == 1  # caught at once, not after every remaining step


def test_a_nan_loss_stops_at_its_step(monkeypatch):
    from utilgen.generator import textual_inversion

    real_loss = textual_inversion.denoising_loss
    calls = []

    def nan_at_the_third_step(*args):
        calls.append(1)
        loss = real_loss(*args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(textual_inversion, "denoising_loss", nan_at_the_third_step)
    generator = tiny_embedded()
    images, labels = _shots()
    with pytest.raises(TokensDivergedError, match=r"the loss is nan at step 3 with tokens\.lr=0\.005") as info:
        learn_class_tokens(generator, images, labels, steps=10, lr=5e-3, batch_size=6)
    assert info.value.step == 3


def test_a_loss_far_above_its_start_stops_at_its_step(monkeypatch):
    from utilgen.generator import textual_inversion

    real_loss = textual_inversion.denoising_loss
    calls = []

    def blown_up_from_the_eighth_step(*args):
        calls.append(1)
        return real_loss(*args) * (100.0 if len(calls) >= 8 else 1.0)

    monkeypatch.setattr(textual_inversion, "denoising_loss", blown_up_from_the_eighth_step)
    generator = tiny_embedded()
    images, labels = _shots()
    with pytest.raises(TokensDivergedError, match=r"at step 8 the mean loss of the last 5 steps.*tokens\.lr=0\.005"):
        learn_class_tokens(generator, images, labels, steps=20, lr=5e-3, batch_size=6)


def _first_trigger(losses: list[float], factor: float = 10.0, window: int = 5) -> int | None:
    """The 0-based index of the loss at which the guard first answers True, or None."""
    guard = LossRiseGuard(factor, window)
    return next((index for index, loss in enumerate(losses) if guard.add(loss)), None)


def test_loss_rise_guard_ignores_flat_falling_and_noisy_losses():
    assert _first_trigger([1.0] * 200) is None
    assert _first_trigger([1.0 / (1 + step) for step in range(200)]) is None  # falls 200-fold: never a rise
    g = torch.Generator().manual_seed(0)
    noisy = (0.5 + 2.5 * torch.rand(500, generator=g)).tolist()  # each step anywhere in 0.5 .. 3 (6x apart)
    assert _first_trigger(noisy) is None
    assert _first_trigger([1.0] * 5 + [40.0] + [1.0] * 20) is None  # one 40x batch: a 5-step mean of 8.8


def test_loss_rise_guard_triggers_when_the_recent_mean_passes_the_factor():
    doubling = [1.0] * 5 + [2.0**k for k in range(20)]  # 5-step means from index 5: 1, 1.2, 1.8, 3.2, 6.2, 12.4
    assert _first_trigger(doubling) == 10
    assert _first_trigger(doubling, factor=5.0) == 9
    assert _first_trigger([1.0] * 5 + [50.0]) == 5  # one batch big enough to lift the mean past 10x by itself
    assert _first_trigger([1.0, 100.0, 100.0, 100.0, 100.0, 100.0]) is None  # risen in the first window: no start
    guard = LossRiseGuard(10.0, window=2)
    assert [guard.add(loss) for loss in (2.0, 2.0, 10.0, 50.0)] == [False, False, False, True]
    assert guard.start_mean == 2.0
    assert guard.recent_mean == 30.0
    assert "last 2 steps, 30, is over 10x that of the first 2, 2" in guard.describe()


@pytest.mark.parametrize("lr", [1e300, float("inf"), float("nan"), 0.0])
def test_an_lr_torch_cannot_use_is_refused_before_the_first_step(lr):
    """1e300 used to end in torch's raw 'cannot be converted to type float without overflow'."""
    generator = tiny_embedded()
    images, labels = _shots()
    with pytest.raises(ValueError, match=r"tokens\.lr must be > 0 and finite"):
        learn_class_tokens(generator, images, labels, steps=3, lr=lr, batch_size=6)


def test_an_ordinary_run_stays_far_below_the_limit():
    generator = tiny_embedded()
    images, labels = _shots()
    tokens = learn_class_tokens(generator, images, labels, steps=60, lr=5e-2, batch_size=6)
    assert _largest_growth(generator, tokens) < MAX_TOKEN_NORM_GROWTH / 10
