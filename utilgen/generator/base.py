"""The generator protocol both backends implement (embedded pixel-space model, Stable Diffusion).

A generator maps (prompt embeddings, initial noise) to images. Everything the
UtilGen stages need goes through this one interface:

- class prompts: ``class_prompt_embeds(labels)`` (N, L, D) from the current
  class tokens, ``null_prompt_embeds(n)`` for classifier-free guidance, and
  ``prompt_embeds_from_tokens(tokens, labels)``, differentiable in the tokens
  (textual inversion trains those, with the generator frozen);
- noise: ``initial_noise(seeds)`` (N, C, H, W), one ``torch.Generator`` per seed,
  so an image depends on its own seed and never on the batch it was drawn in;
- the denoiser: ``denoiser`` (the nn.Module LoRA/DPO adapts) and
  ``predict_noise(latents, t, prompt_embeds, guidance_scale)``, differentiable,
  always returning epsilon (a v-prediction model is converted here);
- images: ``encode(images) -> latents`` and ``decode(latents) -> images``.
  Images at the boundary are float32 (N, C, H, W) in [0, 1] (the data module's
  convention); latents are whatever the model denoises ([-1, 1] pixels for
  the embedded model, scaled VAE latents for SD).
- ``ddim_latents(...)``: the one DDIM loop. ``sample(...)`` runs it batched
  under no_grad; the differentiable sampler (``sampler.py``) runs it keeping a
  graph through its last denoiser calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint as _checkpoint

PREDICTION_TYPES = ("epsilon", "v_prediction")


class Generator(ABC):
    """Common state: ``denoiser`` (a diffusers UNet2DConditionModel), ``scheduler`` (DDIMScheduler)."""

    denoiser: nn.Module
    scheduler: object  # diffusers.DDIMScheduler: alphas_cumprod, timestep spacing, clipping config

    # ---- shapes -------------------------------------------------------------------
    num_classes: int
    image_size: int  # side of the square images ``decode`` returns

    @property
    @abstractmethod
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one latent (and of one initial noise)."""

    @property
    @abstractmethod
    def prompt_shape(self) -> tuple[int, int]:
        """(L, D) of one prompt embedding."""

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    # ---- prompts ------------------------------------------------------------------
    @property
    @abstractmethod
    def class_tokens(self) -> torch.Tensor:
        """The learnable per-class token vectors: (K, L, D) embedded, (K, D_token) SD. Read-only view."""

    @abstractmethod
    def set_class_tokens(self, tokens: torch.Tensor) -> None:
        """Install learned class tokens (e.g. from textual inversion)."""

    @abstractmethod
    def prompt_embeds_from_tokens(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, L, D) prompt embeddings of ``labels`` (N,) under ``tokens``; differentiable in ``tokens``."""

    def class_prompt_embeds(self, labels: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """(N, L, D) prompt embeddings of the classes ``labels`` with the installed class tokens."""
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got {labels.min()}..{labels.max()}")
        with torch.no_grad():
            return self.prompt_embeds_from_tokens(self.class_tokens, labels)

    @abstractmethod
    def null_prompt_embeds(self, n: int) -> torch.Tensor:
        """(n, L, D) unconditional prompt embeddings (the guidance baseline)."""

    # ---- noise and images ---------------------------------------------------------
    def initial_noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """(N, C, H, W) standard normal noise, image i drawn from its own ``torch.Generator(seed_i)``.

        Drawn on the CPU in float32 and then moved, so a seed gives the same noise
        on every device and in every batch.
        """
        noises = [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        if not noises:
            return torch.empty(0, *self.latent_shape, device=self.device, dtype=self.dtype)
        return torch.stack(noises).to(device=self.device, dtype=self.dtype)

    @abstractmethod
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, H', W') in [0, 1], any size -> latents (N, *latent_shape) (deterministic)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, *latent_shape) -> images (N, C, image_size, image_size) in [0, 1]."""

    # ---- denoiser -----------------------------------------------------------------
    def alpha_bar(self, t: int) -> float:
        """Cumulative alpha at training timestep ``t``; ``t < 0`` is the end of sampling (clean image)."""
        if t < 0:
            return float(self.scheduler.final_alpha_cumprod)
        return float(self.scheduler.alphas_cumprod[int(t)])

    def timesteps(self, steps: int) -> list[int]:
        """The ``steps`` DDIM timesteps, high to low, with the scheduler's spacing (leading/trailing/...)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        # A fresh scheduler from the same config: set_timesteps mutates, and the
        # generator's own scheduler may be shared with a training loop.
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(steps)
        return [int(t) for t in scheduler.timesteps]

    def _eps_from_output(self, output: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return output
        if prediction_type == "v_prediction":  # eps = sqrt(a) v + sqrt(1 - a) x_t, per sample
            alphas = self.scheduler.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)
            a = alphas[timestep].view(-1, *([1] * (latents.dim() - 1)))
            return a.sqrt() * output + (1 - a).sqrt() * latents
        raise ValueError(f"prediction_type {prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")

    def predict_noise(
        self,
        latents: torch.Tensor,
        t: int | torch.Tensor,
        prompt_embeds: torch.Tensor,
        guidance_scale: float = 1.0,
        null_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Guided epsilon (N, C, H, W) at timestep ``t`` for latents (N, C, H, W) and prompts (N, L, D).

        ``t``: one training timestep for all, or (N,) per sample (DPO's random timesteps).
        eps = eps_null + guidance_scale * (eps_cond - eps_null); at guidance 1 the
        null branch is skipped. Differentiable in latents, prompts and the denoiser.
        Both branches run as one batch of 2N: one UNet call instead of two.
        ``null_output``: the null branch's output (``predict_null_output(latents, t)``) when the caller already has it;
        only the conditional branch then runs, as a batch of N (equal to the 2N batch up to rounding).
        """
        n = latents.shape[0]
        if prompt_embeds.shape[0] != n:
            raise ValueError(f"{n} latents but {prompt_embeds.shape[0]} prompt embeddings")
        timestep = torch.as_tensor(t, device=latents.device, dtype=torch.long).expand(n).contiguous()  # (N,)
        if guidance_scale == 1.0 or null_output is not None:
            output = self.denoiser(latents, timestep, encoder_hidden_states=prompt_embeds).sample
            if guidance_scale != 1.0:
                output = null_output + guidance_scale * (output - null_output)
            return self._eps_from_output(output, latents, timestep)
        null = self.null_prompt_embeds(n).to(prompt_embeds.dtype)
        both = self.denoiser(
            torch.cat([latents, latents]),
            torch.cat([timestep, timestep]),
            encoder_hidden_states=torch.cat([null, prompt_embeds]),
        ).sample
        output_null, output_cond = both.chunk(2)
        output = output_null + guidance_scale * (output_cond - output_null)
        return self._eps_from_output(output, latents, timestep)

    def predict_null_output(self, latents: torch.Tensor, t: int) -> torch.Tensor:
        """The denoiser's raw output (N, C, H, W) for the null prompt at latents (N, C, H, W) and timestep ``t``:
        the null branch of ``predict_noise``, before guidance and the v -> epsilon conversion."""
        n = latents.shape[0]
        timestep = torch.full((n,), int(t), device=latents.device, dtype=torch.long)  # (N,)
        null = self.null_prompt_embeds(n).to(latents.dtype)
        return self.denoiser(latents, timestep, encoder_hidden_states=null).sample

    def predict_noise_checkpointed(
        self,
        latents: torch.Tensor,
        t: int,
        prompt_embeds: torch.Tensor,
        guidance_scale: float,
        null_output: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``predict_noise`` whose activations are recomputed in the backward instead of stored (when grad is on)."""
        if torch.is_grad_enabled():
            return _checkpoint(
                self.predict_noise, latents, t, prompt_embeds, guidance_scale, null_output, use_reentrant=False
            )
        return self.predict_noise(latents, t, prompt_embeds, guidance_scale, null_output)

    def predict_x0(self, latents: torch.Tensor, eps: torch.Tensor, t: int, clip_sample: bool) -> torch.Tensor:
        """The clean image the DDIM step assumes: x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t), (N, C, H, W).

        ``clip_sample`` clamps it to the scheduler's ``clip_sample_range``, as the sampler does.
        """
        a_t = self.alpha_bar(t)
        x0 = (latents - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        if clip_sample:
            limit = float(self.scheduler.config.clip_sample_range)
            x0 = x0.clamp(-limit, limit)
        return x0

    def ddim_update(
        self, latents: torch.Tensor, eps: torch.Tensor, t: int, t_next: int, clip_sample: bool
    ) -> torch.Tensor:
        """Deterministic DDIM move (eta = 0) of x_t to timestep ``t_next`` (lower: denoise; higher: invert).

        x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);  x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps.
        """
        a_next = self.alpha_bar(t_next)
        x0 = self.predict_x0(latents, eps, t, clip_sample)
        return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps

    @property
    def clips_samples(self) -> bool:
        return bool(getattr(self.scheduler.config, "clip_sample", False))

    # ---- sampling -----------------------------------------------------------------
    def ddim_latents(
        self,
        prompt_embeds: torch.Tensor,
        noise: torch.Tensor,
        *,
        steps: int,
        guidance_scale: float,
        grad_steps: int = 0,
        checkpoint: bool = False,
        first_null_output: torch.Tensor | None = None,
        split_guidance: bool = False,
    ) -> torch.Tensor:
        """The one DDIM loop (both samplers run it): noise (N, C, H, W) under prompts (N, L, D) -> latents.

        Deterministic DDIM (eta = 0), x0 clipped as the scheduler's config says. Only the last
        ``grad_steps`` denoiser calls keep a graph, each under ``torch.utils.checkpoint`` when
        ``checkpoint``; the earlier calls run under no_grad on detached inputs, so their epsilon is a
        constant and gradient reaches the noise only through the DDIM update's direct path.
        ``grad_steps = 0`` (the no-grad sampler) differentiates no denoiser call.

        Two savings for callers that render the same noise many times (ILPO), each equal to the plain loop up
        to rounding (a batch of N instead of 2N): ``first_null_output`` (N, C, H, W), ``predict_null_output(noise,
        timesteps[0])``, stands in for the first call's null branch, which depends on the noise only; with
        ``split_guidance`` a kept call whose latents carry no gradient (the first kept one, for a prompt
        gradient) runs its null branch under no_grad, a constant, so that the backward skips it.
        """
        if not 0 <= grad_steps <= steps:
            raise ValueError(f"grad_steps must lie in [0, steps={steps}], got {grad_steps}")
        predict = self.predict_noise_checkpointed if checkpoint else self.predict_noise
        timesteps = self.timesteps(steps)
        latents = noise
        for i, t in enumerate(timesteps):
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
            null = first_null_output if i == 0 else None
            if i >= steps - grad_steps:
                split = split_guidance and guidance_scale != 1.0 and torch.is_grad_enabled()
                if null is None and split and not latents.requires_grad:
                    with torch.no_grad():
                        null = self.predict_null_output(latents, t)
                eps = predict(latents, t, prompt_embeds, guidance_scale, null)
            else:
                with torch.no_grad():
                    eps = self.predict_noise(latents.detach(), t, prompt_embeds.detach(), guidance_scale, null)
            latents = self.ddim_update(latents, eps, t, t_next, clip_sample=self.clips_samples)
        return latents

    @torch.no_grad()
    def sample_latents(
        self, prompt_embeds: torch.Tensor, noise: torch.Tensor, *, guidance_scale: float, steps: int
    ) -> torch.Tensor:
        """One batch: DDIM from noise (N, C, H, W) under prompts (N, L, D) -> latents (N, C, H, W)."""
        noise = noise.to(device=self.device, dtype=self.dtype)
        prompt_embeds = prompt_embeds.to(device=self.device, dtype=self.dtype)
        return self.ddim_latents(prompt_embeds, noise, steps=steps, guidance_scale=guidance_scale)

    @torch.no_grad()
    def sample(
        self,
        prompt_embeds: torch.Tensor,
        noise: torch.Tensor,
        *,
        guidance_scale: float = 2.0,
        steps: int = 20,
        batch_size: int = 64,
        progress: bool = False,
    ) -> torch.Tensor:
        """images (N, C, image_size, image_size) in [0, 1], float32 on the CPU, from prompts (N, L, D) and noise.

        Batched by ``batch_size``; each image depends only on its own prompt and
        noise (up to floating-point reassociation across batch sizes).
        """
        if prompt_embeds.shape[0] != noise.shape[0]:
            raise ValueError(f"{prompt_embeds.shape[0]} prompt embeddings but {noise.shape[0]} noises")
        from tqdm.auto import tqdm

        out = []
        starts = range(0, noise.shape[0], batch_size)
        for start in tqdm(starts, desc="sampling", unit="batch", disable=not progress):
            stop = start + batch_size
            latents = self.sample_latents(
                prompt_embeds[start:stop], noise[start:stop], guidance_scale=guidance_scale, steps=steps
            )
            out.append(self.decode(latents).float().cpu())
        if not out:
            return torch.empty(0, *self.decode_shape)
        return torch.cat(out)

    @property
    @abstractmethod
    def decode_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one decoded image."""

    def freeze(self) -> None:
        """No parameter of the generator trains (textual inversion, sampling)."""
        for module in self.modules():
            module.requires_grad_(False)

    @abstractmethod
    def modules(self) -> list[nn.Module]:
        """Every nn.Module of the generator (for freeze, .to, eval)."""

    def eval(self) -> Generator:
        for module in self.modules():
            module.eval()
        return self
