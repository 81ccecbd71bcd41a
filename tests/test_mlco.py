"""MLCO: pair building, the Diffusion-DPO loss, LoRA-only training, the reference, non-finite handling, re-anchoring."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from _generator_models import tiny_embedded

from utilgen.adaptation import (
    CANDIDATE_STAGE,
    DPONonFiniteError,
    adapter_parameters,
    adapters_disabled,
    attach_adapters,
    build_pairs,
    dpo_loss,
    evaluate_pairs,
    generate_candidates,
    implicit_accuracy,
    load_adapters,
    reanchor,
    save_adapters,
    train_dpo_round,
)
from utilgen.adaptation.mlco import pair_errors
from utilgen.config import MLCOConfig


def _pairs(n: int = 24, classes: int = 3, per_class: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 8, 8, generator=g)
    labels = torch.arange(n) % classes
    utilities = torch.rand(n, generator=g)
    return build_pairs(images, labels, utilities, torch.arange(n) + 100, pairs_per_class=per_class, min_gap=0.0)


def _base_state(denoiser) -> dict[str, torch.Tensor]:
    """Every non-adapter weight, keyed by its name in the plain (adapter-free) model."""
    return {
        k.replace(".base_layer", ""): v.detach().clone() for k, v in denoiser.state_dict().items() if "lora_" not in k
    }


def _denoise(generator, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, *generator.latent_shape, generator=g)
    t = torch.randint(0, 1000, (6,), generator=g)
    with torch.no_grad():
        return generator.predict_noise(x, t, generator.class_prompt_embeds(torch.arange(6) % 3))


# --------------------------------------------------------------------------- pairs


def test_pairs_match_highest_with_lowest_within_each_class():
    labels = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    utilities = torch.tensor([0.5, 0.9, 0.1, 0.3, 0.7, 0.2, 0.8, 0.6, 0.4, 0.95, 0.05])
    pairs = build_pairs(
        torch.rand(11, 1, 4, 4), labels, utilities, torch.arange(11) * 10, pairs_per_class=5, min_gap=0.0
    )
    # class 0 by utility: 1 (.9), 4 (.7), 0 (.5), 3 (.3), 2 (.1) -> (1, 2), (4, 3); the median is left out
    # class 1: 9 (.95), 6 (.8), 7 (.6), 8 (.4), 5 (.2), 10 (.05) -> (9, 10), (6, 5), (7, 8)
    assert pairs.winners.tolist() == [1, 4, 9, 6, 7]
    assert pairs.losers.tolist() == [2, 3, 10, 5, 8]
    assert pairs.labels.tolist() == [0, 0, 1, 1, 1]
    assert pairs.winner_seeds.tolist() == [10, 40, 90, 60, 70]
    assert bool((pairs.gaps > 0).all())
    assert pairs.counts_per_class(3) == [2, 3, 0]


def test_pairs_per_class_caps_the_count_and_near_ties_are_skipped():
    labels = torch.tensor([0] * 6 + [1] * 4)
    utilities = torch.tensor([0.9, 0.8, 0.55, 0.5, 0.2, 0.1, 0.52, 0.5, 0.49, 0.51])
    images = torch.rand(10, 1, 4, 4)
    capped = build_pairs(images, labels, utilities, torch.arange(10), pairs_per_class=1, min_gap=0.0)
    assert capped.counts_per_class(2) == [1, 1]
    gapped = build_pairs(images, labels, utilities, torch.arange(10), pairs_per_class=3, min_gap=0.1)
    # class 0 gaps: 0.8, 0.6, 0.05 (near-tie, dropped); class 1 gaps 0.03, 0.01: all near-ties
    assert gapped.winners.tolist() == [0, 1]
    assert gapped.losers.tolist() == [5, 4]
    assert gapped.counts_per_class(2) == [2, 0]


def test_pairs_refuse_unvalued_candidates():
    utilities = torch.tensor([0.1, float("nan"), 0.3, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        build_pairs(torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long), utilities, torch.arange(4))


def test_generate_candidates_returns_a_valued_pool():
    generator = tiny_embedded()

    class Brightness:  # a deterministic utility: brighter is better
        class_names = ("a", "b", "c")

        def score(self, images, labels):
            return images.mean(dim=(1, 2, 3))

    pool = generate_candidates(generator, Brightness(), [2, 0], per_class=3, seeds=range(6), steps=2)
    assert len(pool) == 6
    assert set(pool.stages) == {CANDIDATE_STAGE}
    assert pool.labels.tolist() == [2, 2, 2, 0, 0, 0]
    assert pool.seeds.tolist() == list(range(6))
    torch.testing.assert_close(pool.utilities, pool.images.mean(dim=(1, 2, 3)))
    assert pool.noises is not None
    assert pool.prompt_embeds is not None


# --------------------------------------------------------------------------- the loss


def test_dpo_loss_equals_the_formula_on_fixed_numbers():
    model_w, model_l = torch.tensor([0.10, 0.30, 0.20]), torch.tensor([0.20, 0.10, 0.20])
    ref_w, ref_l = torch.tensor([0.12, 0.25, 0.20]), torch.tensor([0.18, 0.12, 0.20])
    beta = 7.0
    expected = []
    for mw, ml, rw, rl in zip(model_w.tolist(), model_l.tolist(), ref_w.tolist(), ref_l.tolist(), strict=True):
        x = -beta * ((mw - rw) - (ml - rl))
        expected.append(-math.log(1 / (1 + math.exp(-x))))
    loss = dpo_loss(model_w, model_l, ref_w, ref_l, beta)
    assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
    # pair 0: d_w = -0.02 < d_l = 0.02 (preferred); pair 1: 0.05 > -0.02 (not); pair 2: tie (half)
    assert implicit_accuracy(model_w, model_l, ref_w, ref_l).item() == pytest.approx(0.5)
    assert implicit_accuracy(model_w[:1], model_l[:1], ref_w[:1], ref_l[:1]).item() == 1.0


def test_dpo_gradient_reaches_only_the_adapter_and_the_reference_is_the_original_model():
    generator = tiny_embedded()
    original = copy.deepcopy(generator.denoiser)
    params = attach_adapters(generator.denoiser, rank=4, alpha=4.0)
    with torch.no_grad():  # a nonzero B, so the adapted model differs from the reference
        for name, p in params.items():
            if "lora_B" in name:
                p.normal_(std=0.1)
    pairs = _pairs()
    x0_w, x0_l = generator.encode(pairs.winner_images), generator.encode(pairs.loser_images)
    prompts = generator.class_prompt_embeds(pairs.labels)
    t, eps = torch.randint(0, 1000, (len(pairs),)), torch.randn_like(x0_w)
    with torch.no_grad(), adapters_disabled(generator.denoiser):
        ref_w, ref_l = pair_errors(generator, x0_w, x0_l, prompts, t, eps)
    model_w, model_l = pair_errors(generator, x0_w, x0_l, prompts, t, eps)
    dpo_loss(model_w, model_l, ref_w, ref_l, 2500.0).backward()
    for name, p in generator.denoiser.named_parameters():
        if name in params:
            assert p.grad is not None, name
            assert bool(p.grad.abs().sum() > 0), name
        else:
            assert p.grad is None, name
            assert not p.requires_grad, name
    # the reference: the same network with the adapter off is the original model, bit for bit
    plain = copy.copy(generator)
    plain.denoiser = original
    with adapters_disabled(generator.denoiser):
        torch.testing.assert_close(_denoise(generator), _denoise(plain), rtol=0, atol=0)
    assert not torch.allclose(_denoise(generator), _denoise(plain))
    assert all(p.requires_grad for p in params.values())  # switched back on


def test_round_trains_only_the_adapter_and_raises_implicit_accuracy_on_its_pairs():
    generator = tiny_embedded()
    base_before = _base_state(generator.denoiser)
    pairs = _pairs()
    config = MLCOConfig(steps=60, batch_pairs=9, lr=1e-3, lora_rank=4, lora_alpha=4.0)
    before = evaluate_pairs(generator, pairs, beta=config.beta)
    result = train_dpo_round(generator, pairs, config)
    after = evaluate_pairs(generator, pairs, beta=config.beta)
    assert before.implicit_acc == 0.5
    assert before.loss == pytest.approx(math.log(2))
    assert after.implicit_acc >= 0.7
    assert after.loss < before.loss - 0.1
    assert after.mse_gap_winners < after.mse_gap_losers
    assert result.steps_done == 60
    assert len(result.history.loss) == 60
    assert all(math.isfinite(v) for v in result.history.mse_gap_winners + result.history.grad_norm)
    base_after = _base_state(generator.denoiser)
    assert base_after.keys() == base_before.keys()
    for name, value in base_before.items():
        assert torch.equal(base_after[name], value), name


def test_non_finite_loss_stops_the_round_and_keeps_the_last_good_adapter():
    pairs = _pairs()
    config = MLCOConfig(steps=30, batch_pairs=9, lr=1e4, max_grad_norm=math.inf, lora_rank=4, lora_alpha=4.0)
    generator = tiny_embedded()
    with pytest.raises(DPONonFiniteError, match="at step") as caught:
        train_dpo_round(generator, pairs, config)
    step = caught.value.step
    assert step >= 2
    assert caught.value.result.steps_done == step == len(caught.value.result.history.loss)
    kept = {k: v.detach().clone() for k, v in adapter_parameters(generator.denoiser).items()}
    assert all(bool(torch.isfinite(v).all()) for v in kept.values())
    # the same run stopped before step - 1 ends at the weights the failing step's predecessor started from
    replay = tiny_embedded()
    train_dpo_round(replay, pairs, dataclasses.replace(config, steps=step - 1))
    for name, value in adapter_parameters(replay.denoiser).items():
        torch.testing.assert_close(kept[name], value, rtol=0, atol=0)


def test_reanchor_merges_the_adapter_and_starts_a_fresh_one(tmp_path):
    generator = tiny_embedded()
    config = MLCOConfig(steps=15, batch_pairs=9, lr=1e-2, lora_rank=4, lora_alpha=4.0)
    train_dpo_round(generator, _pairs(), config)
    adapted = _denoise(generator)
    with adapters_disabled(generator.denoiser):
        reference = _denoise(generator)
    assert not torch.allclose(adapted, reference, atol=1e-4)
    base_before = _base_state(generator.denoiser)
    reanchor(generator.denoiser, seed=1)
    torch.testing.assert_close(_denoise(generator), adapted, rtol=1e-4, atol=1e-5)  # output unchanged by the merge
    with adapters_disabled(generator.denoiser):
        torch.testing.assert_close(_denoise(generator), adapted, rtol=1e-4, atol=1e-5)  # the new reference
    params = adapter_parameters(generator.denoiser)
    assert all(bool((p == 0).all()) for n, p in params.items() if "lora_B" in n)
    assert any(not torch.equal(v, _base_state(generator.denoiser)[k]) for k, v in base_before.items())
    # a later round with reanchor=True merges first and reports it
    result = train_dpo_round(generator, _pairs(seed=1), dataclasses.replace(config, steps=2), round_index=1)
    assert result.reanchored


def test_adapters_round_trip_through_safetensors(tmp_path):
    generator = tiny_embedded()
    train_dpo_round(generator, _pairs(), MLCOConfig(steps=5, batch_pairs=9, lr=1e-2, lora_rank=4, lora_alpha=4.0))
    path = save_adapters(generator.denoiser, tmp_path / "adapters.safetensors")
    fresh = tiny_embedded()
    load_adapters(fresh.denoiser, path)
    torch.testing.assert_close(_denoise(fresh), _denoise(generator), rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp"))
