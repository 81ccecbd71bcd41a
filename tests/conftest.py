"""Test session setup.

- OMP_WAIT_POLICY=PASSIVE before torch loads (spinning threads made steps
  10-30x slower on the 2-core machines; docs/design.md, "Machine facts").
- Without a GPU, TRITON_INTERPRET=1 before any Triton kernel is imported, so
  the CPU suite runs the Triton kernels for real in the interpreter.
- ``backend_params()`` lists the kernel backends the op tests must exercise.
- ``smoke_run``: one finished smoke-preset run, made once per session.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from utilgen.ops import _backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend_params(op: _backend.OpSupport, device: str = DEVICE):
    """pytest params for every backend of ``op`` on ``device``; unavailable ones skip with the reason.

    Under CI (UTILGEN_REQUIRE_EXTENSION=1) the C++ backend may not be skipped on
    CPU: a missing extension fails instead of silently testing the reference.
    """
    params = []
    for backend in _backend.BACKENDS:
        reason = _backend.unavailable_reason(op, backend, device, torch.float32)
        must_run = backend == "cpp" and device == "cpu" and os.environ.get("UTILGEN_REQUIRE_EXTENSION") == "1"
        marks = [pytest.mark.skip(reason=f"{backend}: {reason}")] if reason and not must_run else []
        params.append(pytest.param(backend, id=backend, marks=marks))
    return params


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One finished ``python -m utilgen.run --preset smoke`` run directory (~30 s), shared by the tests that read it."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    command = [sys.executable, "-m", "utilgen.run", "--preset", "smoke", "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out
