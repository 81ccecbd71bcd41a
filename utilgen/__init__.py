"""utilgen: utility-centric generative data augmentation (UtilGen, NeurIPS 2025).

`import utilgen` is lean on purpose: it initialises no CUDA and imports neither
triton nor diffusers (a test checks this). Submodules load on first use:
`utilgen.ops` (accelerated ops), `utilgen.run` (the command line).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("ops", "run")


def __getattr__(name: str):
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"utilgen.{name}")
    raise AttributeError(f"module 'utilgen' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY_SUBMODULES]
