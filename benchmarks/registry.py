"""The shared benchmark registry: providers x shapes per op, machine facts, timing helpers.

Every ``bench_<op>.py`` takes its shapes and providers from here, so a result
file always says the same thing for the same name. The first provider of each
op is the baseline; ``conftest.py`` reports every other provider as a ratio
against it, measured in the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault(
    "OMP_WAIT_POLICY", "PASSIVE"
)  # before torch: busy-waiting OpenMP threads cost 10-30x on 2 cores (docs/design.md, "Machine facts")

import importlib.metadata
import platform
import socket
from collections.abc import Callable

import torch

from utilgen import _native
from utilgen.ops import _backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Providers: "eager" (the PyTorch reference / idiomatic torch), "compile"
# (torch.compile of the same), and the kernel backends.
KERNEL_PROVIDERS = ("cpp", "cuda", "triton")

SHAPES: dict[str, list[dict]] = {
    "weighted_cross_entropy": [
        {"N": 37, "K": 123},
        {"N": 8192, "K": 100},
        {"N": 8192, "K": 1000},
        # bandwidth-bound on GPU: N*K*4 bytes >= 64 MB
        *([{"N": 16384, "K": 1024}, {"N": 32768, "K": 2048}] if DEVICE == "cuda" else []),
    ],
    "latent_update": [
        {"N": 8, "C": 4, "H": 64, "W": 64, "L": 77, "D": 1024},
        {"N": 256, "C": 4, "H": 64, "W": 64, "L": 77, "D": 1024},
    ],
    "logit_hvp": [
        {"N": 37, "K": 123},
        {"N": 8192, "K": 1000},
    ],
}


def provider_skip_reason(op: _backend.OpSupport, provider: str, dtype: torch.dtype = torch.float32) -> str:
    """'' when ``provider`` can be timed here, else why not (shown as the skip reason)."""
    if provider in ("eager",):
        return ""
    if provider == "compile":
        return ""
    if provider == "triton" and DEVICE == "cpu":
        return "the Triton interpreter on CPU is a correctness vehicle, not a performance backend"
    return _backend.unavailable_reason(op, provider, DEVICE, dtype)


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def synced(fn: Callable[[], object]) -> Callable[[], object]:
    """The timed callable: runs ``fn`` and waits for the device to finish."""

    def run() -> object:
        out = fn()
        synchronize()
        return out

    return run


def peak_memory_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch while ``fn`` runs, above what was live before.

    CUDA: the caching allocator's peak counter. CPU: torch has no peak counter,
    so the profiler's allocation events are replayed to find the high-water mark.
    """
    if DEVICE == "cuda":
        synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Replay every allocation and free in time order. The raw kineto events are
    # needed: prof.events() folds the allocations made inside an op into that
    # op's (inclusive) memory column and keeps only the rest as "[memory]"
    # events, so replaying those alone saw almost nothing (0 bytes for a
    # backward pass).
    events = sorted(
        ((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda event: event[0],  # stable: same-time events keep their recorded order
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def machine_info() -> dict:
    """What a result file must name: machine, device, threads, versions."""
    info = {
        "host": socket.gethostname(),
        "device": torch.cuda.get_device_name(0)
        if DEVICE == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "torch": torch.__version__,
        "utilgen_extension": _native.extension() is not None,
    }
    for package in ("triton", "utilgen"):
        try:
            info[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


def record(
    benchmark, *, provider: str, shape: dict, bytes_moved: int | None = None, peak_bytes: int | None = None
) -> None:
    """Fill ``benchmark.extra_info`` (GB/s is computed after timing in conftest)."""
    benchmark.extra_info.update(
        {
            "provider": provider,
            "shape": shape,
            "device": DEVICE,
            "threads": torch.get_num_threads(),
            "bytes_moved": bytes_moved,
            "peak_memory_bytes": peak_bytes,
        }
    )


def sd21_unet():
    """A randomly initialised UNet of Stable Diffusion 2.1's size, built from its config (no hub)."""
    from diffusers import UNet2DConditionModel

    # stabilityai/stable-diffusion-2-1 unet/config.json (the fields that set its size and attention).
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
