"""utilgen.io: byte-stable safetensors files (the same content gives the same bytes in every process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from utilgen.io import safetensors_bytes

# Writes a pool and a many-key safetensors file into argv[1]. Every input is fixed, so only
# per-process state (hash seeds, Rust HashMap seeds) can make two runs differ.
_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    from utilgen.data import SyntheticPool
    from utilgen.io import atomic_write_bytes, safetensors_bytes

    out = Path(sys.argv[1])
    generator = torch.Generator().manual_seed(0)
    pool = SyntheticPool.create(
        torch.rand(4, 1, 6, 5, generator=generator),
        torch.tensor([0, 1, 0, 1]),
        ("cat", "dog"),
        torch.arange(4),
        round=0,
        stage="initial",
        prompt_embeds=torch.randn(4, 3, 8, generator=generator),
        noises=torch.randn(4, 2, 2, 2, generator=generator),
    )
    pool.save(out / "pool")
    metadata = {f"key{i}": str(i) for i in range(12)} | {"name": "Käfer"}
    tensors = {"b": torch.ones(3, dtype=torch.float16), "a": torch.arange(6).reshape(2, 3).t()}
    atomic_write_bytes(out / "many_keys.safetensors", safetensors_bytes(tensors, metadata))
    """
)


def _write_in_subprocess(out: Path, hash_seed: int) -> dict[str, bytes]:
    """{relative path: bytes} of everything the writer script put under ``out``."""
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    subprocess.run([sys.executable, "-c", _WRITER, str(out)], env=env, check=True, timeout=300)
    return {str(path.relative_to(out)): path.read_bytes() for path in sorted(out.rglob("*")) if path.is_file()}


def test_same_content_same_bytes_across_processes(tmp_path):
    # Three processes: with the old writer the 4 pool metadata keys came out in one of 24
    # orders per process, so three equal files by chance was a 1-in-576 event.
    outputs = [_write_in_subprocess(tmp_path / f"run{seed}", seed) for seed in (0, 1, 2)]
    assert "pool/tensors.safetensors" in outputs[0]
    assert "many_keys.safetensors" in outputs[0]
    for other in outputs[1:]:
        assert other.keys() == outputs[0].keys()
        differing = [name for name in outputs[0] if other[name] != outputs[0][name]]
        assert differing == []


def test_safetensors_bytes_round_trips_and_ignores_insertion_order(tmp_path):
    transposed = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # not contiguous
    tensors = {"z": transposed, "a": torch.tensor([1, 2], dtype=torch.int64), "m": torch.ones(1, dtype=torch.float16)}
    metadata = {"format": "x", "count": "3", "class_names": '["é"]'}
    data = safetensors_bytes(tensors, metadata)
    assert data == safetensors_bytes(dict(reversed(tensors.items())), dict(reversed(metadata.items())))
    assert int.from_bytes(data[:8], "little") % 8 == 0  # data section stays 8-byte aligned
    loaded = load(data)
    assert loaded.keys() == tensors.keys()
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value)
        assert loaded[name].dtype == value.dtype
    path = tmp_path / "file.safetensors"
    path.write_bytes(data)
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == metadata


def test_safetensors_bytes_without_metadata():
    data = safetensors_bytes({"w": torch.zeros(2, 2)})
    assert torch.equal(load(data)["w"], torch.zeros(2, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU tensor")
def test_safetensors_bytes_moves_tensors_to_cpu():
    on_gpu = torch.arange(4.0, device="cuda")
    assert safetensors_bytes({"w": on_gpu}) == safetensors_bytes({"w": on_gpu.cpu()})
