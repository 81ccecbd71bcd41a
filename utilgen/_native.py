"""Loading of the compiled extension `utilgen._C` and the facts kernels need.

The extension does not link libtorch: op modules hand it raw data pointers,
sizes, a dtype code, the thread count and (for CUDA) the current stream. Only
the op modules in `utilgen.ops` talk to it (docs/design.md, "Layers").

Set UTILGEN_REQUIRE_EXTENSION=1 (CI does) to turn a missing or broken
extension into an ImportError instead of a fallback to the PyTorch references.
"""

from __future__ import annotations

import functools
import importlib
import os
from pathlib import Path
from types import ModuleType

import torch


@functools.cache
def _load() -> tuple[ModuleType | None, str]:
    try:
        module = importlib.import_module("utilgen._C")
    except ImportError as error:
        reason = f"utilgen._C did not import ({error}); " + _install_hint()
        if os.environ.get("UTILGEN_REQUIRE_EXTENSION") == "1":
            raise ImportError(f"UTILGEN_REQUIRE_EXTENSION=1 but {reason}") from error
        return None, reason
    return module, ""


def _install_hint() -> str:
    package_dir = Path(__file__).resolve().parent
    if (package_dir.parent / "CMakeLists.txt").exists():
        # Imported from a source checkout: either never built here, or a
        # non-editable install is shadowed by the checkout on sys.path.
        return (
            f"utilgen was imported from the source checkout {package_dir.parent}; build it in place with "
            "`pip install -e .` (a non-editable install is shadowed when you run from the checkout)"
        )
    return "reinstall utilgen with `pip install .` so the extension is built (see README)"


def extension() -> ModuleType | None:
    """The compiled module, or None when it is missing (see `extension_reason`)."""
    return _load()[0]


def extension_reason() -> str:
    """Why the extension is unavailable ('' when it loaded)."""
    return _load()[1]


@functools.cache
def cuda_kernels_reason() -> str:
    """'' when `_C` can run its CUDA kernels here, else why not.

    Calls into the CUDA runtime, so only call it when a CUDA tensor is at hand
    or `--info` asks: `import utilgen` must not initialise CUDA.
    """
    module = extension()
    if module is None:
        return extension_reason()
    if not module.cuda_built:
        return "utilgen._C was built without CUDA kernels (no CUDA compiler at build time, or UTILGEN_CUDA=OFF)"
    if module.cuda_device_count() == 0:
        return f"utilgen._C has CUDA kernels but sees no device ({module.cuda_last_error()})"
    return ""


def ptr(tensor: torch.Tensor | None) -> int:
    """Data pointer for the extension (0 for an absent optional tensor)."""
    return 0 if tensor is None else tensor.data_ptr()


def dtype_code(tensor: torch.Tensor) -> int:
    """The extension's code for the tensor's dtype (``_C.DType``, defined once in csrc/common.h)."""
    return getattr(extension().DType, str(tensor.dtype).removeprefix("torch.")).value


def cpu_threads() -> int:
    """Threads the C++ kernels use: torch's own intra-op count, so both agree."""
    return torch.get_num_threads()


def cuda_stream(tensor: torch.Tensor) -> int:
    """Raw handle of the current stream on the tensor's device."""
    return torch.cuda.current_stream(tensor.device).cuda_stream
