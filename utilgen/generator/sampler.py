"""The differentiable sampler (ILPO) and single DDIM / DDIM-inversion steps (noise refinement).

``sample_differentiable`` runs the DDIM loop of ``Generator.sample`` (``Generator.ddim_latents``:
the same images) keeping a graph, and memory is what limits it:
- the first ``steps - grad_steps`` denoiser calls run under ``no_grad``: their
  epsilon is a constant, so the prompt gets gradient only from the last
  ``grad_steps`` calls, and the noise gets gradient through the DDIM update's
  direct x_t -> x_{t-1} path of those early steps (elementwise: no stored UNet
  activations) plus through the last calls in full;
- with ``checkpoint``, each kept call is wrapped in ``torch.utils.checkpoint``, so its
  activations are recomputed in the backward instead of stored: the same gradient for
  one more forward of each kept call (ILPO turns it on for large denoisers only).
With ``grad_steps = steps`` the gradient is exact (tests compare against finite
differences). With ``grad_steps = 0`` no denoiser call is differentiated.
``first_null_output`` and ``split_guidance`` (``Generator.ddim_latents``) save work for
a caller that renders the same noise again and again, at the cost of rounding.
"""

from __future__ import annotations

import torch

from utilgen.generator.base import Generator


def sample_differentiable_latents(
    generator: Generator,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    grad_steps: int = 1,
    checkpoint: bool = True,
    first_null_output: torch.Tensor | None = None,
    split_guidance: bool = False,
) -> torch.Tensor:
    """latents (N, C, H, W) from prompts (N, L, D) and noise (N, C, H, W); see the module docstring."""
    return generator.ddim_latents(
        prompt_embeds,
        noise,
        steps=steps,
        guidance_scale=guidance_scale,
        grad_steps=grad_steps,
        checkpoint=checkpoint,
        first_null_output=first_null_output,
        split_guidance=split_guidance,
    )


def sample_differentiable(
    generator: Generator,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    *,
    steps: int = 10,
    guidance_scale: float = 2.0,
    grad_steps: int = 1,
    checkpoint: bool = True,
    first_null_output: torch.Tensor | None = None,
    split_guidance: bool = False,
) -> torch.Tensor:
    """images (N, C, H, W) in [0, 1] with a graph to ``prompt_embeds`` and ``noise`` (see module docstring)."""
    latents = sample_differentiable_latents(
        generator,
        prompt_embeds,
        noise,
        steps=steps,
        guidance_scale=guidance_scale,
        grad_steps=grad_steps,
        checkpoint=checkpoint,
        first_null_output=first_null_output,
        split_guidance=split_guidance,
    )
    return generator.decode(latents)


def predict_x0_one_step(
    generator: Generator,
    prompt_embeds: torch.Tensor,
    noise: torch.Tensor,
    *,
    guidance_scale: float = 2.0,
    t: int | None = None,
    checkpoint: bool = True,
) -> torch.Tensor:
    """images (N, C, H, W) in [0, 1]: the x0 the denoiser predicts from x_t = ``noise`` in one call.

    ``t`` defaults to the last training timestep T - 1, where the initial noise is
    x_T (not a 1-step schedule's timestep: with "leading" spacing that is t = 1).
    The cheapest differentiable proxy: one denoiser call.
    """
    if t is None:
        t = int(generator.scheduler.config.num_train_timesteps) - 1
    predict = generator.predict_noise_checkpointed if checkpoint else generator.predict_noise
    eps = predict(noise, t, prompt_embeds, guidance_scale)
    return generator.decode(generator.predict_x0(noise, eps, t, clip_sample=generator.clips_samples))


def ddim_step(
    generator: Generator, latents: torch.Tensor, t: int, t_prev: int, prompt_embeds: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """One DDIM denoising step x_t -> x_{t_prev} (t_prev < t; -1 = clean), epsilon at (x_t, t); no clipping.

    No x0 clipping, unlike the sampler: ``ddim_inversion_step`` is its inverse only then.
    """
    if not t_prev < t:
        raise ValueError(f"a DDIM step goes to a lower timestep: t={t}, t_prev={t_prev}")
    eps = generator.predict_noise(latents, t, prompt_embeds, guidance_scale)
    return generator.ddim_update(latents, eps, t, t_prev, clip_sample=False)


def ddim_inversion_step(
    generator: Generator, latents: torch.Tensor, t: int, t_next: int, prompt_embeds: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """One DDIM inversion step x_t -> x_{t_next} (t_next > t), epsilon evaluated at (x_t, t).

    The standard inversion approximation eps(x_{t_next}, t_next) ~ eps(x_t, t): it
    undoes ``ddim_step`` up to how much epsilon changes over one step.
    """
    if not t_next > t:
        raise ValueError(f"an inversion step goes to a higher timestep: t={t}, t_next={t_next}")
    eps = generator.predict_noise(latents, max(t, 0), prompt_embeds, guidance_scale)
    return generator.ddim_update(latents, eps, t, t_next, clip_sample=False)


@torch.no_grad()
def redenoise_noise(
    generator: Generator,
    noise: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    steps: int = 20,
    high_guidance: float = 5.5,
    low_guidance: float = 1.0,
) -> torch.Tensor:
    """ILPO noise refinement: eps' = Inversion_{cfg low}(DDIM_{cfg high}(eps, p)), one step each.

    The step is the first one of a ``steps``-step DDIM schedule (x_T -> x_{t_1} ->
    back to T). Defaults are Golden Noise's (cfg 5.5 forward, 1.0 inversion).
    Returns noises (N, C, H, W) in the dtype and device of ``noise``.
    """
    timesteps = generator.timesteps(steps)
    if len(timesteps) < 2:
        raise ValueError("the re-denoise step needs a schedule of at least 2 steps")
    t, t_prev = timesteps[0], timesteps[1]
    x = noise.to(device=generator.device, dtype=generator.dtype)
    prompt_embeds = prompt_embeds.to(device=generator.device, dtype=generator.dtype)
    x_prev = ddim_step(generator, x, t, t_prev, prompt_embeds, high_guidance)
    return ddim_inversion_step(generator, x_prev, t_prev, t, prompt_embeds, low_guidance).to(noise)
