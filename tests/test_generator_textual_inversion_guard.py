"""Textual inversion's divergence guard: a runaway lr stops the stage with an error naming tokens.lr."""

from __future__ import annotations

import pytest
import torch

from tests._generator_models import tiny_embedded
from utilgen.generator.textual_inversion import MAX_TOKEN_NORM_GROWTH, TokensDivergedError, learn_class_tokens


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
