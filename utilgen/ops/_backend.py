"""Which kernel runs an op: the one place that decides (docs/design.md, "Backend choice").

Backends: ``reference`` (fp32 PyTorch, everywhere), ``cpp`` (utilgen._C,
C++/OpenMP, CPU tensors), ``cuda`` (utilgen._C, CUDA tensors) and ``triton``
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

The request comes from, in order: the op's ``backend=`` argument, the innermost
``use_backend(...)`` block, the ``UTILGEN_BACKEND`` environment variable, else
``auto``. ``auto`` takes the first available backend in the device's
preference order and logs one line with the reasons when it had to fall back;
an explicit request that cannot be met raises ``BackendUnavailable`` with the
reasons (in the style of xformers' "not supported because ...").
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from utilgen import _native

log = logging.getLogger("utilgen.ops")

BACKENDS = ("reference", "cpp", "cuda", "triton")
_REQUESTS = ("auto", *BACKENDS)

# Auto preference per device type. The Triton interpreter is a test vehicle on
# CPU (~2 ms per program instance), so auto never picks it there.
_AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}

_override_stack: list[str] = []
_fallbacks_logged: set[tuple[str, str, torch.dtype, str]] = set()


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run these inputs."""


@dataclass(frozen=True)
class OpSupport:
    """What an op's kernels accept, beyond the reference (which takes everything)."""

    name: str
    cpp_dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    cuda_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    triton_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)


def _check_request(name: str, origin: str) -> str:
    name = name.strip().lower()
    if name not in _REQUESTS:
        raise ValueError(f"{origin}={name!r} is not a backend; choose one of {', '.join(_REQUESTS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (or ``auto``)."""
    _override_stack.append(_check_request(name, "use_backend"))
    try:
        yield
    finally:
        _override_stack.pop()


def requested(explicit: str | None = None) -> str:
    if explicit is not None:
        return _check_request(explicit, "backend")
    if _override_stack:
        return _override_stack[-1]
    return _check_request(os.environ.get("UTILGEN_BACKEND", "auto"), "UTILGEN_BACKEND")


def triton_reason(device_type: str) -> str:
    """'' when Triton kernels can run on this device type, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'utilgen[triton]')"
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "CPU tensors need TRITON_INTERPRET=1, set before utilgen's Triton kernels are imported"
        import sys

        kernels = sys.modules.get("utilgen.kernels")
        if kernels is not None and not getattr(kernels, "INTERPRETED", False):
            return "utilgen.kernels was imported before TRITON_INTERPRET=1 was set"
        return ""
    if device_type != "cuda":
        return f"Triton kernels run on CUDA (or CPU under the interpreter), not {device_type}"
    return ""


def unavailable_reason(op: OpSupport, backend: str, device_type: str, dtype: torch.dtype) -> str:
    """'' when ``backend`` can run ``op`` on (device_type, dtype), else why not."""
    if backend == "reference":
        return ""
    if backend == "cpp":
        if device_type != "cpu":
            return f"the C++ kernels take CPU tensors, not {device_type}"
        if _native.extension() is None:
            return _native.extension_reason()
        if dtype not in op.cpp_dtypes:
            return f"the C++ kernel of {op.name} takes {_dtype_list(op.cpp_dtypes)}, not {_dtype_name(dtype)}"
        return ""
    if backend == "cuda":
        if device_type != "cuda":
            return f"the CUDA kernels take CUDA tensors, not {device_type}"
        reason = _native.cuda_kernels_reason()
        if reason:
            return reason
        if dtype not in op.cuda_dtypes:
            return f"the CUDA kernel of {op.name} takes {_dtype_list(op.cuda_dtypes)}, not {_dtype_name(dtype)}"
        return ""
    if backend == "triton":
        reason = triton_reason(device_type)
        if reason:
            return reason
        if dtype not in op.triton_dtypes:
            return f"the Triton kernel of {op.name} takes {_dtype_list(op.triton_dtypes)}, not {_dtype_name(dtype)}"
        return ""
    raise ValueError(f"unknown backend {backend!r}")


def auto_order(device_type: str) -> Sequence[str]:
    return _AUTO_ORDER.get(device_type, ("reference",))


def resolve(op: OpSupport, tensor: torch.Tensor, explicit: str | None = None) -> str:
    """The concrete backend that runs ``op`` on ``tensor``'s device and dtype."""
    device_type, dtype = tensor.device.type, tensor.dtype
    request = requested(explicit)
    if request != "auto":
        reason = unavailable_reason(op, request, device_type, dtype)
        if reason:
            raise BackendUnavailable(
                f"{op.name}: backend {request!r} is not supported for {device_type} {_dtype_name(dtype)} "
                f"inputs because {reason}. Use backend='auto' to fall back, or see utilgen.ops.info()."
            )
        return request
    skipped = []
    for candidate in auto_order(device_type):
        reason = unavailable_reason(op, candidate, device_type, dtype)
        if not reason:
            if skipped:
                _log_fallback_once(op.name, device_type, dtype, candidate, skipped)
            return candidate
        skipped.append(f"{candidate}: {reason}")
    return "reference"


def _log_fallback_once(name: str, device_type: str, dtype: torch.dtype, chosen: str, skipped: list[str]) -> None:
    key = (name, device_type, dtype, chosen)
    if key in _fallbacks_logged:
        return
    _fallbacks_logged.add(key)
    log.info("%s on %s %s uses %s (%s)", name, device_type, _dtype_name(dtype), chosen, "; ".join(skipped))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_list(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(_dtype_name(d) for d in dtypes)
