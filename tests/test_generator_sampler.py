"""The differentiable sampler and the single DDIM / inversion steps, on a tiny float64 model."""

from __future__ import annotations

import pytest
import torch
from _generator_models import tiny_embedded

from utilgen.generator.sampler import (
    ddim_inversion_step,
    ddim_step,
    predict_x0_one_step,
    redenoise_noise,
    sample_differentiable,
    sample_differentiable_latents,
)

STEPS, GUIDANCE = 3, 2.5


def _unclipped(gen):
    """The same model with x0 clipping off: no clamp kinks for the finite differences to straddle."""
    gen.scheduler = type(gen.scheduler).from_config(gen.scheduler.config, clip_sample=False)
    return gen


@pytest.fixture(scope="module")
def gen64():
    return _unclipped(tiny_embedded(torch.float64))


def _inputs(gen, n=2):
    prompts = gen.class_prompt_embeds(torch.arange(n)).clone()
    noise = gen.initial_noise(range(100, 100 + n))
    weights = torch.randn(n, *gen.decode_shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return prompts, noise, weights


def _directional_fd(f, x, direction, h=1e-6):
    with torch.no_grad():
        return (f(x + h * direction) - f(x - h * direction)) / (2 * h)


@pytest.mark.parametrize("checkpoint", [True, False])
def test_full_graph_gradients_match_finite_differences(gen64, checkpoint):
    prompts, noise, weights = _inputs(gen64)

    def loss(p, z):  # on latents: decode's clamp to [0, 1] would zero most of a random model's gradient
        latents = sample_differentiable_latents(
            gen64, p, z, steps=STEPS, guidance_scale=GUIDANCE, grad_steps=STEPS, checkpoint=checkpoint
        )
        return (latents * weights).sum()

    p, z = prompts.clone().requires_grad_(True), noise.clone().requires_grad_(True)
    grad_p, grad_z = torch.autograd.grad(loss(p, z), (p, z))
    rng = torch.Generator().manual_seed(3)
    v_p = torch.randn(p.shape, generator=rng, dtype=torch.float64)
    v_z = torch.randn(z.shape, generator=rng, dtype=torch.float64)
    fd_p = _directional_fd(lambda x: loss(x, noise), prompts, v_p)
    fd_z = _directional_fd(lambda x: loss(prompts, x), noise, v_z)
    assert abs((grad_p * v_p).sum().item()) > 1e-6  # the check is not vacuous
    torch.testing.assert_close((grad_p * v_p).sum(), fd_p, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close((grad_z * v_z).sum(), fd_z, rtol=1e-5, atol=1e-8)


def test_differentiable_sampler_draws_the_same_images_as_the_no_grad_sampler():
    gen = tiny_embedded()  # float32, clipping on
    prompts, noise = gen.class_prompt_embeds([1, 4]), gen.initial_noise([5, 6])
    expected = gen.sample(prompts, noise, guidance_scale=GUIDANCE, steps=STEPS)
    got = sample_differentiable(gen, prompts.requires_grad_(True), noise, steps=STEPS, guidance_scale=GUIDANCE)
    assert got.requires_grad
    assert torch.equal(got.detach(), expected)  # one DDIM loop: the same bits


def test_grad_steps_zero_differentiates_no_denoiser_call(gen64):
    """Only the DDIM update's direct path is left: d x_0 / d x_T = sqrt(a_final / a_first)."""
    prompts, noise, weights = _inputs(gen64)
    p, z = prompts.clone().requires_grad_(True), noise.clone().requires_grad_(True)
    latents = sample_differentiable_latents(gen64, p, z, steps=STEPS, guidance_scale=GUIDANCE, grad_steps=0)
    grad_p, grad_z = torch.autograd.grad((latents * weights).sum(), (p, z), allow_unused=True)
    assert grad_p is None
    first = gen64.timesteps(STEPS)[0]
    factor = (gen64.alpha_bar(-1) / gen64.alpha_bar(first)) ** 0.5
    torch.testing.assert_close(grad_z, factor * weights)


def test_grad_steps_one_keeps_the_last_call_only(gen64):
    prompts, noise, weights = _inputs(gen64)

    def prompt_grad(grad_steps):
        p = prompts.clone().requires_grad_(True)
        latents = sample_differentiable_latents(
            gen64, p, noise, steps=STEPS, guidance_scale=GUIDANCE, grad_steps=grad_steps
        )
        return torch.autograd.grad((latents * weights).sum(), p)[0]

    last_only, full = prompt_grad(1), prompt_grad(STEPS)
    # The last call alone, by hand: latents before it are constants.
    with torch.no_grad():
        timesteps = gen64.timesteps(STEPS)
        x = noise
        for i, t in enumerate(timesteps[:-1]):
            x = gen64.ddim_update(x, gen64.predict_noise(x, t, prompts, GUIDANCE), t, timesteps[i + 1], False)
    p = prompts.clone().requires_grad_(True)
    eps = gen64.predict_noise(x, timesteps[-1], p, GUIDANCE)
    by_hand = torch.autograd.grad((gen64.ddim_update(x, eps, timesteps[-1], -1, False) * weights).sum(), p)[0]
    torch.testing.assert_close(last_only, by_hand)
    assert (last_only - full).abs().max() > 1e-6  # truncation does change the gradient


def test_grad_steps_out_of_range_is_an_error(gen64):
    prompts, noise, _ = _inputs(gen64)
    with pytest.raises(ValueError, match="grad_steps"):
        sample_differentiable(gen64, prompts, noise, steps=2, grad_steps=3)


def test_one_step_x0_gradients_match_finite_differences(gen64):
    prompts, noise, weights = _inputs(gen64)
    t = 600

    def loss(p, z):  # the x0 of a random model is mostly outside [0, 1]: shrink it into decode's range
        return (predict_x0_one_step(gen64, p * 1.0, z * 0.05, guidance_scale=GUIDANCE, t=t) * weights).sum()

    p = prompts.clone().requires_grad_(True)
    (grad_p,) = torch.autograd.grad(loss(p, noise), p)
    v = torch.randn(p.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(
        (grad_p * v).sum(), _directional_fd(lambda x: loss(x, noise), prompts, v), rtol=1e-5, atol=1e-8
    )


@pytest.mark.parametrize("guidance", [1.0, 5.5])
def test_inversion_step_undoes_a_ddim_step(gen64, guidance):
    """Inverting uses eps(x_{t-d}, t-d) for eps(x_t, t): the round trip is off by how much eps changes over d.

    A random network's epsilon is not smooth in t (sinusoidal timestep features),
    so the error shrinks with the step but not cleanly quadratically.
    """
    prompts, noise, _ = _inputs(gen64)

    def relative_error(step):
        with torch.no_grad():
            x_prev = ddim_step(gen64, noise, 400, 400 - step, prompts, guidance)
            back = ddim_inversion_step(gen64, x_prev, 400 - step, 400, prompts, guidance)
        return ((back - noise).norm() / (x_prev - noise).norm()).item()

    coarse, fine = relative_error(10), relative_error(2)
    assert coarse < 0.25  # 0.06 at guidance 1, 0.15 at 5.5 on this model
    assert fine < 0.75 * coarse  # shrinks with the step


def test_redenoise_refines_the_noise():
    gen = tiny_embedded()
    prompts, noise = gen.class_prompt_embeds([0, 1]), gen.initial_noise([1, 2])
    refined = redenoise_noise(gen, noise, prompts, steps=10, high_guidance=5.5, low_guidance=1.0)
    assert refined.shape == noise.shape
    assert refined.dtype == noise.dtype
    assert (refined - noise).abs().max() > 1e-4
    torch.testing.assert_close(redenoise_noise(gen, noise, prompts, steps=10), refined)  # deterministic


def test_step_directions_are_checked(gen64):
    prompts, noise, _ = _inputs(gen64)
    with pytest.raises(ValueError, match="lower timestep"):
        ddim_step(gen64, noise, 100, 200, prompts, 1.0)
    with pytest.raises(ValueError, match="higher timestep"):
        ddim_inversion_step(gen64, noise, 200, 100, prompts, 1.0)
