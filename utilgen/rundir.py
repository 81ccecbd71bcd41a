"""The run directory: the saved config, the manifest of stages, and what makes a run resumable.

``manifest.json`` lists, per stage: its status ("done" or "failed"), its key, its wall time, and
the SHA-256 of every file it wrote. A stage counts as done only when its status is "done",
its key matches the key the current config gives it, and every output still hashes to what
was recorded; otherwise it (and, through the keys, everything after it) runs again. A stage's
key is a hash of the config sections it reads chained with the key of the stage before, so
``--resume DIR --set mlco.lr=5e-5`` reruns MLCO and what follows, and nothing before it.

Writes are atomic (``utilgen.io``); the manifest is rewritten after each stage, so a run
killed at any moment shows exactly the stages that finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from utilgen.io import atomic_write_json, file_sha256

MANIFEST = "manifest.json"
CONFIG = "config.json"
_FORMAT = "utilgen.run/1"


class RunDirectoryError(ValueError):
    """The directory is not a usable run directory (missing, not a run, or holding another run)."""


def output_digest(path: Path) -> str:
    """SHA-256 of a file, or of a directory's sorted (relative path, file SHA-256) listing."""
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        raise FileNotFoundError(f"stage output {path} was not written")
    listing = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        listing.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\n".encode())
    return listing.hexdigest()


def output_hashes(root: Path, outputs: list[str]) -> dict[str, str]:
    """{output (relative to ``root``): digest} for each output, a file or a directory."""
    return {output: output_digest(root / output) for output in outputs}


def stage_key(previous_key: str, settings: Any) -> str:
    """The key of a stage reading ``settings`` (JSON-able) after the stage keyed ``previous_key``."""
    payload = json.dumps({"previous": previous_key, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class RunDirectory:
    """One run's directory: config, manifest, stage outputs."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = self._read_manifest()

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict) -> RunDirectory:
        """A new run directory at ``path`` (absent or empty) holding ``config.json`` and an empty manifest."""
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            hint = " (it holds a run: continue it with --resume)" if (path / MANIFEST).exists() else ""
            raise RunDirectoryError(f"output directory {path} exists and is not empty{hint}; choose another --out")
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / CONFIG, config)
        atomic_write_json(path / MANIFEST, {"format": _FORMAT, "stages": {}})
        return cls(path)

    @classmethod
    def open(cls, path: str | os.PathLike) -> RunDirectory:
        path = Path(path)
        if not (path / CONFIG).is_file() or not (path / MANIFEST).is_file():
            raise RunDirectoryError(
                f"{path} is not a utilgen run directory (no {CONFIG} and {MANIFEST}); "
                "--resume takes the --out directory of an earlier run"
            )
        return cls(path)

    def read_config(self) -> dict:
        return json.loads((self.path / CONFIG).read_text())

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.path / CONFIG, config)

    def _read_manifest(self) -> dict:
        path = self.path / MANIFEST
        if not path.exists():
            return {"format": _FORMAT, "stages": {}}
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as error:  # atomic writes make this a foreign or hand-edited file
            raise RunDirectoryError(f"{path} is not valid JSON ({error}); it was not written by utilgen") from error
        if manifest.get("format") != _FORMAT:
            raise RunDirectoryError(f"{path} has format {manifest.get('format')!r}, expected {_FORMAT!r}")
        return manifest

    # ------------------------------------------------------------------ stages

    def is_done(self, name: str, key: str) -> bool:
        """True when the stage finished with this key and its outputs are intact."""
        entry = self.manifest["stages"].get(name)
        if not entry or entry.get("status") != "done" or entry.get("key") != key:
            return False
        for relative, digest in entry["outputs"].items():
            path = self.path / relative
            if not path.exists() or output_digest(path) != digest:
                return False
        return True

    def clear(self, outputs: list[str]) -> None:
        """Remove what an unfinished earlier attempt of a stage left, before the stage runs again."""
        for output in outputs:
            path = self.path / output
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def mark_done(self, name: str, key: str, outputs: list[str], seconds: float, info: dict | None = None) -> None:
        self.manifest["stages"][name] = {
            "status": "done",
            "key": key,
            "seconds": round(seconds, 3),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "outputs": output_hashes(self.path, outputs),
            **({"info": info} if info else {}),
        }
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def mark_failed(self, name: str, key: str, message: str, seconds: float) -> None:
        self.manifest["stages"][name] = {
            "status": "failed",
            "key": key,
            "seconds": round(seconds, 3),
            "error": message,
            "outputs": {},
        }
        atomic_write_json(self.path / MANIFEST, self.manifest)

    def seconds(self) -> dict[str, float]:
        return {name: entry["seconds"] for name, entry in self.manifest["stages"].items() if entry["status"] == "done"}


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free
