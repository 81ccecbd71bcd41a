"""Sampling throughput (images/s) of the generators.

CPU group (always): the embedded generator (committed weights; a random model
of the same config if they are absent) draws N=100 images, guidance 2, 20 DDIM
steps, one batch. Providers:
- eager: ``Generator.sample`` (no grad, PyTorch SDPA attention): the baseline;
- plain_attention: the same with diffusers' unfused matmul-softmax-matmul attention;
- compile: ``torch.compile`` of the UNet (inductor, CPU), same sampler.

GPU group (CUDA only; skipped with the reason otherwise): one guided denoiser
call of a UNet of SD-2.1 size (random weights from its config: 865M parameters,
cross-attention width 1024, linear projections), batch 16 (32 with guidance),
4x64x64 latents, fp16. Providers: eager (plain attention), sdpa, xformers.

Run: OMP_WAIT_POLICY=PASSIVE pytest benchmarks/bench_sampling.py \
         --benchmark-json=benchmarks/results/<machine>-sampling.json
"""

from __future__ import annotations

import pytest
import registry
import torch

from utilgen.generator import attention
from utilgen.generator.embedded import EmbeddedGenerator, WeightsError, load_pretrained

CPU_SHAPE = {"N": 100, "steps": 20, "guidance": 2.0}
CPU_PROVIDERS = ("eager", "plain_attention", "compile")
GPU_SHAPE = {"N": 16, "C": 4, "H": 64, "W": 64, "L": 77, "D": 1024, "dtype": "float16"}
GPU_PROVIDERS = ("eager", "sdpa", "xformers")


def _embedded() -> tuple[EmbeddedGenerator, str]:
    try:
        return load_pretrained(), "committed weights"
    except WeightsError as error:  # throughput does not depend on the weights' values
        return EmbeddedGenerator().eval(), f"random weights ({error})"


@pytest.mark.parametrize("provider", CPU_PROVIDERS)
def test_embedded_sampling(benchmark, provider):
    gen, weights = _embedded()
    if provider == "plain_attention":
        attention.apply_attention(gen.denoiser, "plain")
    if provider == "compile":
        gen.denoiser = torch.compile(gen.denoiser, dynamic=False)
    n = CPU_SHAPE["N"]
    prompts, noise = gen.class_prompt_embeds(torch.arange(n) % gen.num_classes), gen.initial_noise(range(n))

    def draw():
        return gen.sample(prompts, noise, guidance_scale=CPU_SHAPE["guidance"], steps=CPU_SHAPE["steps"], batch_size=n)

    step = registry.synced(draw)
    step()  # warm-up (and torch.compile's compilation)
    benchmark.group = f"embedded sampling N{n} {gen.image_size}x{gen.image_size} steps{CPU_SHAPE['steps']} cfg"
    registry.record(benchmark, provider=provider, shape={**CPU_SHAPE, "image_size": gen.image_size})
    benchmark.extra_info["weights"] = weights
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=0)
    benchmark.extra_info["images_per_s"] = round(n / benchmark.stats.stats.median, 2)


def _gpu_skip_reason(provider: str) -> str:
    if not torch.cuda.is_available():
        return "the SD-2.1-size UNet benchmark needs CUDA (no GPU here)"
    if provider == "xformers":
        try:
            attention.resolve_attention("xformers", "cuda")
        except RuntimeError as error:
            return str(error)
    return ""


@pytest.mark.parametrize("provider", GPU_PROVIDERS)
def test_sd21_unet_guided_call(benchmark, provider):
    reason = _gpu_skip_reason(provider)
    if reason:
        pytest.skip(reason)
    unet = registry.sd21_unet().to("cuda", torch.float16).eval()
    attention.apply_attention(unet, {"eager": "plain", "sdpa": "sdpa", "xformers": "xformers"}[provider])
    s = GPU_SHAPE
    gen = torch.Generator("cuda").manual_seed(0)
    latents = torch.randn(2 * s["N"], s["C"], s["H"], s["W"], device="cuda", dtype=torch.float16, generator=gen)
    prompts = torch.randn(2 * s["N"], s["L"], s["D"], device="cuda", dtype=torch.float16, generator=gen)
    timesteps = torch.full((2 * s["N"],), 500, device="cuda")

    @torch.no_grad()
    def call():
        return unet(latents, timesteps, encoder_hidden_states=prompts).sample

    step = registry.synced(call)
    step()
    benchmark.group = "sd21 unet guided call N16 4x64x64 fp16"
    registry.record(benchmark, provider=provider, shape=s, peak_bytes=registry.peak_memory_bytes(step))
    benchmark.pedantic(step, rounds=10, iterations=1, warmup_rounds=2)
    # One guided call advances N images by one sampler step.
    benchmark.extra_info["images_steps_per_s"] = round(s["N"] / benchmark.stats.stats.median, 2)
