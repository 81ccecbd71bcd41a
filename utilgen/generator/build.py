"""The generator a run config names: the embedded model or Stable Diffusion from a local directory."""

from __future__ import annotations

import torch

from utilgen.config import GeneratorConfig
from utilgen.generator.base import Generator

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def build_generator(config: GeneratorConfig, class_names: tuple[str, ...], device: torch.device) -> Generator:
    """The embedded generator (its committed weights), or Stable Diffusion from ``config.path`` for ``class_names``."""
    if config.kind == "embedded":
        from utilgen.generator.embedded import load_pretrained

        return load_pretrained(device, config.embedded_weights).for_task(class_names)
    from utilgen.generator.stable_diffusion import StableDiffusionGenerator

    return StableDiffusionGenerator.from_directory(
        config.path, class_names, device=device, dtype=DTYPES[config.dtype], attention=config.attention
    )
