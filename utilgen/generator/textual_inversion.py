"""Textual inversion: learn per-class tokens from a few real images, the generator frozen.

Only the class tokens train (embedded: each class's (L, D) prompt; Stable
Diffusion: the word vector of its placeholder token ``<class-k>``). The loss is
the denoiser's epsilon-prediction MSE on the real images, noised at uniform
timesteps, conditioned on the class's prompt under the tokens being learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from utilgen.generator.base import Generator


def denoising_loss(
    generator: Generator,
    tokens: torch.Tensor,
    latents: torch.Tensor,
    labels: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean epsilon MSE of clean latents (N, C, H, W) noised to ``timesteps`` (N,) with ``noise``, under ``tokens``."""
    alphas = generator.scheduler.alphas_cumprod.to(device=latents.device, dtype=latents.dtype)[timesteps]
    a = alphas.view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    prompts = generator.prompt_embeds_from_tokens(tokens, labels)  # (N, L, D)
    output = generator.denoiser(noisy, timesteps, encoder_hidden_states=prompts.to(latents.dtype)).sample
    if generator.scheduler.config.prediction_type == "v_prediction":
        target = a.sqrt() * noise - (1 - a).sqrt() * latents
    else:
        target = noise
    return F.mse_loss(output, target)


def learn_class_tokens(
    generator: Generator,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 200,
    lr: float = 5e-3,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Learned class tokens (shape of ``generator.class_tokens``), starting from the installed ones.

    images (N, C, H, W) in [0, 1] with labels (N,); classes without images keep
    their tokens. The generator is frozen and not modified (install the result
    with ``generator.set_class_tokens``; save it with safetensors).
    """
    if images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"need matching non-empty images and labels, got {images.shape[0]} and {labels.shape[0]}")
    generator.freeze()
    device = generator.device
    with torch.no_grad():
        latents = generator.encode(images.to(device))  # (N, C, H, W), encoded once
    labels = labels.to(device=device, dtype=torch.long)
    tokens = generator.class_tokens.detach().clone().float().requires_grad_(True)
    optimiser = torch.optim.AdamW([tokens], lr=lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(seed)
    num_timesteps = generator.scheduler.alphas_cumprod.shape[0]
    for _ in tqdm(range(steps), desc="textual inversion", unit="step", disable=not progress):
        index = torch.randint(0, latents.shape[0], (min(batch_size, latents.shape[0]),), generator=rng)
        timesteps = torch.randint(0, num_timesteps, (index.shape[0],), generator=rng).to(device)
        noise = torch.randn(latents[index].shape, generator=rng).to(device=device, dtype=latents.dtype)
        loss = denoising_loss(generator, tokens.to(generator.dtype), latents[index], labels[index], timesteps, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    return tokens.detach()
