"""Which attention kernel the UNet uses: xformers' memory-efficient attention or PyTorch SDPA.

``attention="auto"`` picks xformers when it is installed and the model is on
CUDA, else PyTorch's ``scaled_dot_product_attention`` (which has its own flash
and memory-efficient kernels on CUDA and a fused kernel on CPU). An explicit
``"xformers"`` that cannot be met raises with the reason; ``"plain"`` is the
unfused matmul-softmax-matmul (the benchmark's baseline).

Nothing here imports diffusers or xformers at module import.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache

import torch

ATTENTION_CHOICES = ("auto", "xformers", "sdpa", "plain")


@cache
def xformers_unavailable_reason() -> str:
    """'' when ``xformers.ops.memory_efficient_attention`` imports, else why not."""
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed (pip install 'utilgen[xformers]', GPU machines only)"
    try:
        importlib.import_module("xformers.ops")
    except Exception as error:  # a broken build raises anything from ImportError to OSError
        return f"xformers is installed but xformers.ops did not import ({type(error).__name__}: {error})"
    return ""


def resolve_attention(requested: str, device: torch.device | str) -> tuple[str, str]:
    """(backend, reason): the attention backend for a model on ``device`` and why it was chosen."""
    if requested not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {ATTENTION_CHOICES}, got {requested!r}")
    device = torch.device(device)
    not_xformers = xformers_unavailable_reason()
    if not not_xformers and device.type != "cuda":
        not_xformers = f"xformers' kernels need CUDA tensors, the model is on {device.type}"
    if requested == "xformers":
        if not_xformers:
            raise RuntimeError(f"attention='xformers' was requested but cannot be used: {not_xformers}")
        return "xformers", "requested"
    if requested in ("sdpa", "plain"):
        return requested, "requested"
    if not not_xformers:
        return "xformers", "auto: xformers is installed and the model is on CUDA"
    return "sdpa", f"auto: PyTorch SDPA because {not_xformers}"


def apply_attention(unet, requested: str = "auto") -> tuple[str, str]:
    """Set every attention processor of a diffusers ``unet`` to the resolved backend; returns (backend, reason)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, XFormersAttnProcessor

    backend, reason = resolve_attention(requested, unet.device)
    processor = {"xformers": XFormersAttnProcessor, "sdpa": AttnProcessor2_0, "plain": AttnProcessor}[backend]()
    unet.set_attn_processor(processor)
    return backend, reason


def attention_info(device: torch.device | str | None = None) -> dict:
    """What ``attention='auto'`` resolves to on ``device`` (default: CUDA if present, else CPU), for --info."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend, reason = resolve_attention("auto", device)
    return {
        "device": str(device),
        "auto": backend,
        "reason": reason,
        "xformers": xformers_unavailable_reason() or "available",
    }
