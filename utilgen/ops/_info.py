"""``utilgen.ops.info()``: what is available here, and which backend each op would use."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch

from utilgen import _native
from utilgen.ops import _backend
from utilgen.ops.latent_update import SUPPORT as _LATENT_UPDATE
from utilgen.ops.logit_hvp import SUPPORT as _LOGIT_HVP
from utilgen.ops.weighted_cross_entropy import SUPPORT as _WEIGHTED_CE

KERNEL_OPS = (_WEIGHTED_CE, _LATENT_UPDATE, _LOGIT_HVP)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict[str, Any]:
    """Versions, extension and device facts, and per-op backend choices with reasons."""
    module = _native.extension()
    cuda_available = torch.cuda.is_available()
    devices = ["cpu"] + (["cuda"] if cuda_available else [])
    report: dict[str, Any] = {
        "versions": {
            "utilgen": _version("utilgen"),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _version("triton"),
            "xformers": _version("xformers"),
            "diffusers": _version("diffusers"),
        },
        "extension": {
            "loaded": module is not None,
            "reason": _native.extension_reason(),
            "openmp": bool(module and module.openmp),
            "cuda_built": bool(module and module.cuda_built),
            "cuda_kernels": (_native.cuda_kernels_reason() or "usable")
            if module and module.cuda_built
            else "not built",
        },
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda_available,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_available else None,
        "triton": {device: _backend.triton_reason(device) or "usable" for device in devices},
        "requested_backend": _backend.requested(),
        "ops": {},
    }
    for op in KERNEL_OPS:
        per_device = {}
        for device in devices:
            per_backend = {
                backend: _backend.unavailable_reason(op, backend, device, torch.float32) or "available"
                for backend in _backend.BACKENDS
            }
            auto = next(b for b in _backend.auto_order(device) if per_backend[b] == "available")
            per_device[device] = {"auto": auto, "backends": per_backend}
        report["ops"][op.name] = per_device
    return report


def info_text() -> str:
    """``info()`` as the text ``python -m utilgen.run --info`` prints."""
    report = info()
    lines = ["utilgen " + str(report["versions"]["utilgen"])]
    lines.append("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in report["versions"].items()))
    ext = report["extension"]
    if ext["loaded"]:
        lines.append(
            f"utilgen._C: loaded (OpenMP {'on' if ext['openmp'] else 'off'}; CUDA kernels: {ext['cuda_kernels']})"
        )
    else:
        lines.append(f"utilgen._C: NOT loaded: {ext['reason']}")
    lines.append(f"torch threads: {report['torch_threads']}")
    lines.append(f"CUDA device: {report['cuda_device'] or 'none'}")
    for device, reason in report["triton"].items():
        lines.append(f"triton on {device}: {reason}")
    lines.append(f"requested backend: {report['requested_backend']} (UTILGEN_BACKEND or backend=...)")
    for name, per_device in report["ops"].items():
        for device, choice in per_device.items():
            lines.append(f"{name} [{device}, float32]: auto -> {choice['auto']}")
            for backend, reason in choice["backends"].items():
                lines.append(f"    {backend:<9} {reason}")
    return "\n".join(lines)
