"""The cost of one MLCO Diffusion-DPO step vs one plain LoRA fine-tuning step on the same model.

Providers (one group per model):
- ``eager``: the baseline, a plain epsilon-MSE step of the same LoRA model on the B winners
  (one conditional forward + backward of B images, clip, AdamW step);
- ``dpo_step``: one DPO step on B pairs (``utilgen.adaptation.mlco.dpo_gradients`` + AdamW step):
  a no-grad reference forward of 2B (adapter off) and a forward + backward of 2B (adapter on).
  Measured 2.2x eager on the 2-core CPU (343 vs 155 ms, peak 84 vs 42 MiB): twice the images
  through forward + backward, while the no-grad reference forward adds little next to a backward.

Groups:
- CPU (always): the embedded generator (committed weights; a random model of the same config if
  absent), B = 16 pairs, 16x16, LoRA rank 8 on to_q/to_k/to_v/to_out.0, float32;
- CUDA only (skipped with the reason otherwise): a UNet of SD-2.1 size (random weights from its
  config, 865M parameters) in bf16 with float32 LoRA rank 8, B = 8 pairs of 4x64x64 latents,
  77x1024 prompts.

Run: OMP_WAIT_POLICY=PASSIVE pytest benchmarks/bench_mlco.py \
         --benchmark-json=benchmarks/results/<machine>-mlco.json
"""

from __future__ import annotations

import pytest
import registry
import torch

from utilgen.adaptation import attach_adapters
from utilgen.adaptation.mlco import dpo_gradients, noised
from utilgen.generator.base import Generator
from utilgen.generator.embedded import EmbeddedGenerator, WeightsError, load_pretrained

PROVIDERS = ("eager", "dpo_step")
CPU_SHAPE = {"pairs": 16, "C": 1, "H": 16, "W": 16, "lora_rank": 8, "dtype": "float32"}
GPU_SHAPE = {"pairs": 8, "C": 4, "H": 64, "W": 64, "L": 77, "D": 1024, "lora_rank": 8, "dtype": "bfloat16"}


class _BareUNet:
    """Just what the DPO step reads from a generator: ``denoiser``, ``scheduler`` and the shared ``predict_noise``."""

    predict_noise = Generator.predict_noise
    _eps_from_output = Generator._eps_from_output

    def __init__(self, unet, scheduler):
        self.denoiser, self.scheduler = unet, scheduler


def _embedded() -> tuple[EmbeddedGenerator, str]:
    try:
        return load_pretrained(), "committed weights"
    except WeightsError as error:  # step cost does not depend on the weights' values
        return EmbeddedGenerator().eval(), f"random weights ({error})"


def _step(provider, generator, params, optimizer, x0_w, x0_l, prompts, t, eps):
    def plain():
        optimizer.zero_grad(set_to_none=True)
        x_t = noised(generator, x0_w, t, eps)
        pred = generator.predict_noise(x_t, t, prompts, guidance_scale=1.0)
        loss = (pred.float() - eps.float()).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        return loss.detach()

    def dpo():
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = dpo_gradients(generator, params, x0_w, x0_l, prompts, t, eps, beta=2500.0, max_grad_norm=1.0)
        optimizer.step()
        return loss

    return {"eager": plain, "dpo_step": dpo}[provider]


def _inputs(shape: dict, prompt_shape: tuple[int, int], device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    b, latent = shape["pairs"], (shape["C"], shape["H"], shape["W"])
    tensors = (
        torch.rand(b, *latent, generator=g) * 2 - 1,
        torch.rand(b, *latent, generator=g) * 2 - 1,
        torch.randn(b, *prompt_shape, generator=g),
        torch.randint(0, 1000, (b,), generator=g),
        torch.randn(b, *latent, generator=g),
    )
    return [x.to(device) if x.dtype == torch.long else x.to(device, dtype) for x in tensors]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_embedded_dpo_step(benchmark, provider):
    generator, weights = _embedded()
    params = attach_adapters(generator.denoiser, rank=CPU_SHAPE["lora_rank"], alpha=float(CPU_SHAPE["lora_rank"]))
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    inputs = _inputs(CPU_SHAPE, generator.prompt_shape, "cpu", torch.float32)
    step = registry.synced(_step(provider, generator, params, optimizer, *inputs))
    step()  # warm-up (allocator, optimizer state)
    benchmark.group = f"mlco step embedded 16x16 B{CPU_SHAPE['pairs']} pairs lora{CPU_SHAPE['lora_rank']}"
    registry.record(benchmark, provider=provider, shape=CPU_SHAPE, peak_bytes=registry.peak_memory_bytes(step))
    benchmark.extra_info["weights"] = weights
    benchmark.extra_info["adapter_parameters"] = sum(p.numel() for p in params.values())
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_sd21_dpo_step(benchmark, provider):
    if not torch.cuda.is_available():
        pytest.skip("the SD-2.1-size UNet DPO step needs CUDA (no GPU here)")
    from diffusers import DDIMScheduler

    unet = registry.sd21_unet().to("cuda", torch.bfloat16).eval()
    params = attach_adapters(unet, rank=GPU_SHAPE["lora_rank"], alpha=float(GPU_SHAPE["lora_rank"]))
    generator = _BareUNet(unet, DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    optimizer = torch.optim.AdamW(params.values(), lr=1e-4)
    inputs = _inputs(GPU_SHAPE, (GPU_SHAPE["L"], GPU_SHAPE["D"]), "cuda", torch.bfloat16)
    step = registry.synced(_step(provider, generator, params, optimizer, *inputs))
    step()
    benchmark.group = f"mlco step sd21-size unet 4x64x64 B{GPU_SHAPE['pairs']} pairs bf16 lora{GPU_SHAPE['lora_rank']}"
    registry.record(benchmark, provider=provider, shape=GPU_SHAPE, peak_bytes=registry.peak_memory_bytes(step))
    benchmark.extra_info["adapter_parameters"] = sum(p.numel() for p in params.values())
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
