"""LoRA adapters on the denoiser (peft, through diffusers' adapter API) for MLCO.

- ``attach_adapters``: one adapter, ``ADAPTER_NAME``, on the attention projections; only its
  parameters train, kept in float32 even on a half-precision UNet (Adam on fp16 LoRA weights
  loses small updates; diffusers' training examples cast them the same way).
- ``adapters_disabled``: the DPO reference model is the same network with the adapter switched
  off, so the reference costs no second copy of the UNet.
- ``reanchor``: W <- W + (alpha / r) B A for every adapted layer, then a fresh adapter (B = 0):
  the model is unchanged at that moment and the reference becomes the current model.
- ``adapter_changes`` / ``largest_adapter_change``: how much the adapter changes each layer,
  ||scaling B A||_F / ||W||_F, the measure MLCO's runaway guard watches.
- ``save_adapters`` / ``load_adapters``: the adapter weights as safetensors (atomic), the LoRA
  settings in the header. After a re-anchor the merged base weights belong to the generator,
  not to the adapter file: save those with the generator's own weights writer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from utilgen.config import LORA_TARGET_MODULES
from utilgen.io import atomic_write_bytes, safetensors_bytes

ADAPTER_NAME = "mlco"
_FORMAT = "utilgen.mlco_adapters/1"


def _is_adapted(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A


def _lora_layers(denoiser: nn.Module) -> list[nn.Module]:
    return [m for m in denoiser.modules() if _is_adapted(m)]


def has_adapters(denoiser: nn.Module) -> bool:
    return bool(_lora_layers(denoiser))


def adapter_parameters(denoiser: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter's parameters by name (the only ones DPO trains)."""
    return {name: p for name, p in denoiser.named_parameters() if f".{ADAPTER_NAME}." in name and "lora_" in name}


def attach_adapters(
    denoiser: nn.Module,
    *,
    rank: int = 8,
    alpha: float = 8.0,
    target_modules: Sequence[str] = LORA_TARGET_MODULES,
    seed: int = 0,
) -> dict[str, nn.Parameter]:
    """Add the LoRA adapter (B = 0: the model's output is unchanged) and make only it trainable.

    Returns the adapter parameters. Raises if the denoiser already has one
    (re-anchor it or keep training it instead) or no module matches ``target_modules``.
    """
    from peft import LoraConfig

    if has_adapters(denoiser):
        raise ValueError(f"the denoiser already carries the {ADAPTER_NAME!r} adapter")
    for parameter in denoiser.parameters():
        parameter.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]):  # A's random init from our seed, without moving the global RNG
        torch.manual_seed(seed)
        try:
            denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
        except ValueError as error:
            raise ValueError(f"no LoRA target among {list(target_modules)} in the denoiser: {error}") from error
    params = adapter_parameters(denoiser)
    for parameter in params.values():
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return params


@contextmanager
def adapters_disabled(denoiser: nn.Module) -> Iterator[None]:
    """The base network (the DPO reference) inside the block; the adapter is back on after it.

    peft's switch also turns requires_grad off and on; the adapter is re-enabled
    even when the block raises.
    """
    denoiser.disable_adapters()
    try:
        yield
    finally:
        denoiser.enable_adapters()


@torch.no_grad()
def reanchor(denoiser: nn.Module, *, seed: int = 0) -> None:
    """Merge the adapter into the base weights and start a fresh one (B = 0, A re-drawn from ``seed``)."""
    layers = _lora_layers(denoiser)
    if not layers:
        raise ValueError(f"the denoiser has no {ADAPTER_NAME!r} adapter to merge")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for layer in layers:
            base = layer.get_base_layer()
            delta = layer.get_delta_weight(ADAPTER_NAME)  # (out, in) = scaling * B @ A
            base.weight.add_(delta.to(base.weight.dtype))
            layer.reset_lora_parameters(ADAPTER_NAME, True)  # kaiming A, zero B
    for parameter in adapter_parameters(denoiser).values():
        parameter.data = parameter.data.float()


@torch.no_grad()
def adapter_changes(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    """Per adapted module (by name): ||scaling B A||_F / ||W||_F, a 0-d float32 tensor on the weights' device.

    The adapter's change of the layer relative to the layer's own (base) weight W; a conv weight counts as
    its (out, in * kh * kw) matrix. No host sync: the caller reduces and reads what it needs.
    """
    return {name: _relative_change(module) for name, module in denoiser.named_modules() if _is_adapted(module)}


def largest_adapter_change(denoiser: nn.Module) -> tuple[str, float]:
    """The adapted layer the adapter changes most, and by how much relative to its own weights (one host sync)."""
    changes = adapter_changes(denoiser)
    if not changes:
        raise ValueError(f"the denoiser has no {ADAPTER_NAME!r} adapter to measure")
    names, values = list(changes), torch.stack(list(changes.values()))
    index = int(values.argmax())
    return names[index], float(values[index])


def _relative_change(layer: nn.Module) -> torch.Tensor:
    # ||B A||_F^2 = trace(A^T B^T B A) = trace((B^T B)(A A^T)): two r x r products instead of the (out, in) delta,
    # which for Stable Diffusion's projections would be a 1280 x 1280 (or larger) matrix per layer per step.
    a = layer.lora_A[ADAPTER_NAME].weight.float().flatten(1)  # (r, in [* kh * kw])
    b = layer.lora_B[ADAPTER_NAME].weight.float().flatten(1)  # (out, r)
    squared = torch.trace((b.T @ b) @ (a @ a.T)).clamp_min(0.0)  # rounding can dip just below 0 when B ~ 0
    delta_norm = abs(layer.scaling[ADAPTER_NAME]) * squared.sqrt()
    base_norm = torch.linalg.vector_norm(layer.get_base_layer().weight, dtype=torch.float32)  # no fp32 copy of W
    return delta_norm / base_norm.clamp_min(torch.finfo(torch.float32).tiny)


def _settings(denoiser: nn.Module) -> dict:
    layer = _lora_layers(denoiser)[0]
    return {
        "rank": int(layer.r[ADAPTER_NAME]),
        "alpha": float(layer.lora_alpha[ADAPTER_NAME]),
        "target_modules": sorted(denoiser.peft_config[ADAPTER_NAME].target_modules),
    }


def save_adapters(denoiser: nn.Module, path: str | os.PathLike) -> Path:
    """Write the adapter weights (float32) to ``path`` (safetensors, atomic); its LoRA settings in the header."""
    params = adapter_parameters(denoiser)
    if not params:
        raise ValueError(f"the denoiser has no {ADAPTER_NAME!r} adapter to save")
    tensors = {name: p.float() for name, p in params.items()}
    header = {"format": _FORMAT, "settings": json.dumps(_settings(denoiser))}
    return atomic_write_bytes(path, safetensors_bytes(tensors, header))


def load_adapters(denoiser: nn.Module, path: str | os.PathLike) -> dict[str, nn.Parameter]:
    """Attach an adapter with the saved settings (unless one is there) and copy the saved weights in, strictly."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    if header.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a utilgen MLCO adapter file (format {header.get('format')!r})")
    settings = json.loads(header["settings"])
    if not has_adapters(denoiser):
        attach_adapters(
            denoiser, rank=settings["rank"], alpha=settings["alpha"], target_modules=settings["target_modules"]
        )
    elif _settings(denoiser) != settings:
        raise ValueError(f"the denoiser's adapter {_settings(denoiser)} differs from the saved one {settings}")
    tensors = load_safetensors(path.read_bytes())
    params = adapter_parameters(denoiser)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this denoiser: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, parameter in params.items():
            parameter.copy_(tensors[name])
    return params
