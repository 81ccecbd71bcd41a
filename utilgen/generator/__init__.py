"""Generators: the embedded pixel-space diffusion model and the Stable Diffusion backend, one protocol.

- ``base.Generator``: the protocol (prompts, noise, guided epsilon, no-grad sampling).
- ``build_generator``: the generator a run config's generator section names.
- ``embedded``: the small class-conditional model shipped with utilgen (``load_pretrained``).
- ``stable_diffusion``: UNet/VAE/CLIP from a local diffusers directory.
- ``sampler``: the differentiable sampler and single DDIM / inversion steps (ILPO).
- ``textual_inversion``: per-class tokens from a few real images.
- ``attention``: xformers vs PyTorch SDPA.

Importing this package does not import diffusers or transformers; the
backends import them when a model is built.
"""

from utilgen.generator.base import Generator
from utilgen.generator.build import build_generator
from utilgen.generator.embedded import EmbeddedConfig, EmbeddedGenerator, WeightsError, load_pretrained, load_weights
from utilgen.generator.sampler import (
    ddim_inversion_step,
    ddim_step,
    predict_x0_one_step,
    redenoise_noise,
    sample_differentiable,
    sample_differentiable_latents,
)
from utilgen.generator.textual_inversion import learn_class_tokens

__all__ = [
    "EmbeddedConfig",
    "EmbeddedGenerator",
    "Generator",
    "WeightsError",
    "build_generator",
    "ddim_inversion_step",
    "ddim_step",
    "learn_class_tokens",
    "load_pretrained",
    "load_weights",
    "predict_x0_one_step",
    "redenoise_noise",
    "sample_differentiable",
    "sample_differentiable_latents",
]
