"""The run directory: the saved config, the manifest of stages, and what makes a run resumable.

``manifest.json`` lists, per stage: its status ("done" or "failed"), its key, its wall time, and
the SHA-256 of every file it wrote. A stage counts as done only when its status is "done",
its key matches the key the current config gives it, and every output still hashes to what
was recorded; otherwise it (and, through the keys, everything after it) runs again. A stage's
key is a hash of the config sections it reads chained with the key of the stage before, so
``--resume DIR --set mlco.lr=5e-5`` reruns MLCO and what follows, and nothing before it.

Writes are atomic (``utilgen.io``); the manifest is rewritten after each stage, so a run
killed at any moment shows exactly the stages that finished.

One process at a time: the command line opens or creates the directory with ``lock=True``, which
holds an exclusive ``fcntl.flock`` on ``.lock`` for the life of the run (``RunLock``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

from utilgen.io import atomic_write_json, file_sha256

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CONFIG = "config.json"
LOCK = ".lock"  # hidden: directory digests skip dot-files, and an otherwise empty directory still counts as empty
_FORMAT = "utilgen.run/1"


class RunDirectoryError(ValueError):
    """The directory is not a usable run directory (missing, not a run, or holding another run)."""


class RunDirectoryLocked(RunDirectoryError):
    """Another process holds the run directory's lock."""


class RunLock:
    """An exclusive ``flock`` on ``DIR/.lock``, held for as long as this object keeps the file open.

    The kernel drops a flock when its holder dies, however it dies, so a lock file left behind never
    blocks a later run; the file itself is never deleted, because deleting it would let two processes
    lock two different files of the same name. The file holds the holder's pid, host, start time and
    command, for the message the next process prints. In a multi-process run only rank 0 takes the
    lock (the other ranks would conflict with it); it covers the whole run because rank 0 outlives it.
    """

    def __init__(self, directory: Path):
        self.path = directory / LOCK
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            raise RunDirectoryLocked(locked_message(directory)) from None
        except BaseException:
            os.close(self._fd)
            raise
        self._write_holder()

    def _write_holder(self) -> None:
        # In place, not an atomic replace: a new inode would not carry the lock.
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": shlex.join([sys.executable, *sys.argv]),
        }
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(holder).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def is_locked(directory: Path) -> bool:
    """True while a live process holds ``directory``'s lock (probed with a lock taken and dropped at once)."""
    try:
        fd = os.open(directory / LOCK, os.O_RDONLY)  # read-only: the probe must not touch the holder's record
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def describe_holder(directory: Path) -> str:
    try:
        holder = json.loads((directory / LOCK).read_text())
        return (
            f"pid {holder['pid']} on host {holder['host']}, started {holder['started']}, running: {holder['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):  # caught between its truncate and its write
        return "another process (it has not recorded itself yet)"


def locked_message(directory: Path) -> str:
    return (
        f"run directory {directory} is in use by {describe_holder(directory)}; two processes on one run "
        "directory overwrite each other's stages. Wait for it to finish (or stop it) and then --resume, "
        "or give this run another --out"
    )


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

    def __init__(self, path: str | os.PathLike, lock: RunLock | None = None):
        self.path = Path(path)
        self.lock = lock
        self.manifest = self._read_manifest()  # read under the lock, so no other process is rewriting it

    def release(self) -> None:
        """Let another process open the directory (also happens when this process ends)."""
        if self.lock is not None:
            self.lock.release()

    # ------------------------------------------------------------------ creating and opening

    @classmethod
    def create(cls, path: str | os.PathLike, config: dict, *, lock: bool = False) -> RunDirectory:
        """A new run directory at ``path`` (absent or empty) holding ``config.json`` and an empty manifest.

        ``lock=True``: hold the directory's ``RunLock`` (see ``RunLock``) until ``release()`` or exit.
        """
        path = Path(path)
        check_empty(path)  # before mkdir: a refused directory is left as it was
        created = not path.exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            held = RunLock(path) if lock else None
        except OSError as error:
            raise unwritable(path, error) from None
        try:
            check_empty(path)  # again under the lock: another process may have started a run here meanwhile
            _write_with_backup(path / CONFIG, config)
            _write_with_backup(path / MANIFEST, {"format": _FORMAT, "stages": {}})
        except BaseException as error:
            if held is not None:
                held.release()
            if created and not isinstance(error, RunDirectoryLocked):  # nothing written: leave no directory
                shutil.rmtree(path, ignore_errors=True)
            if isinstance(error, OSError):
                raise unwritable(path, error) from None
            raise
        return cls(path, held)

    @classmethod
    def open(cls, path: str | os.PathLike, *, lock: bool = False) -> RunDirectory:
        """An existing run directory; ``lock=True`` as in ``create``."""
        path = Path(path)
        if not (path / CONFIG).is_file() and not backup_of(path / CONFIG).is_file():
            raise RunDirectoryError(
                f"{path} is not a utilgen run directory (it has no {CONFIG}); "
                "--resume takes the --out directory of an earlier run"
            )
        held = RunLock(path) if lock else None
        try:
            return cls(path, held)
        except BaseException:
            if held is not None:
                held.release()
            raise

    def read_config(self) -> dict:
        return read_config(self.path / CONFIG)

    def write_config(self, config: dict) -> None:
        _write_with_backup(self.path / CONFIG, config)

    def _read_manifest(self) -> dict:
        return read_manifest(self.path / MANIFEST)

    # ------------------------------------------------------------------ stages

    def is_done(self, name: str, key: str) -> bool:
        """True when the stage finished with this key and its outputs are intact."""
        entry = self.manifest["stages"].get(name)
        if not entry or entry.get("status") != "done" or entry.get("key") != key:
            return False
        for relative, digest in entry["outputs"].items():
            path = self.path / relative
            if not path.exists() or output_digest(path) != digest:
                state = "is missing" if not path.exists() else "changed since the stage wrote it"
                log.warning("stage %s runs again: its output %s %s", name, relative, state)
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
        _write_with_backup(self.path / MANIFEST, self.manifest)

    def mark_failed(self, name: str, key: str, message: str, seconds: float) -> None:
        self.manifest["stages"][name] = {
            "status": "failed",
            "key": key,
            "seconds": round(seconds, 3),
            "error": message,
            "outputs": {},
        }
        _write_with_backup(self.path / MANIFEST, self.manifest)

    def adopt_stages(self, source: Path, names: tuple[str, ...], files: tuple[str, ...] = ()) -> list[str]:
        """Copy the finished stages ``names`` of the run in ``source`` (their outputs and manifest records) and
        its ``files`` into this run; the stages adopted.

        A stage runs again all the same when its key here differs (its settings differ, or a stage before it
        was not adopted): the key, not the copy, decides. An adopted record took no time in this run
        (``seconds`` 0) and names where it came from (``adopted_from``)."""
        stages = json.loads((source / MANIFEST).read_text())["stages"]
        adopted = []
        for name in names:
            entry = stages.get(name)
            if not entry or entry.get("status") != "done" or not all((source / o).exists() for o in entry["outputs"]):
                break  # unfinished or damaged; the stages after it would run again anyway
            for relative in entry["outputs"]:
                target = self.path / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                if (source / relative).is_dir():
                    shutil.copytree(source / relative, target)
                else:
                    shutil.copy2(source / relative, target)
            self.manifest["stages"][name] = {**entry, "seconds": 0.0, "adopted_from": str(source)}
            adopted.append(name)
        for relative in files:
            if (source / relative).exists():
                shutil.copy2(source / relative, self.path / relative)
        _write_with_backup(self.path / MANIFEST, self.manifest)
        return adopted

    def seconds(self) -> dict[str, float]:
        return {name: entry["seconds"] for name, entry in self.manifest["stages"].items() if entry["status"] == "done"}


def check_empty(path: Path) -> None:
    """``path`` is absent or an empty directory (a lock file alone counts as empty), else RunDirectoryError."""
    if not path.exists():
        return
    if path.is_dir() and all(entry.name == LOCK for entry in path.iterdir()):
        return
    if path.is_dir() and is_locked(path):
        raise RunDirectoryLocked(locked_message(path))
    hint = " (it holds a run: continue it with --resume)" if (path / MANIFEST).exists() else ""
    raise RunDirectoryError(f"output directory {path} exists and is not empty{hint}; choose another --out")


def unwritable(directory: Path, error: OSError) -> RunDirectoryError:
    """A run directory that cannot be created or written, named as the user gave it (not a temporary file)."""
    where = f" ({error.filename})" if error.filename and Path(error.filename) != directory else ""
    return RunDirectoryError(
        f"cannot write the run directory {directory}: {error.strerror or error}{where}; choose a writable --out"
    )


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


# ---------------------------------------------------------------------------------- the two records, checked

# Each record is written twice, the file and then a hidden backup, both atomically. Atomic writes never
# leave a half-written file, but a record can still be damaged from outside (a copy cut short, an edit,
# a full disk under another tool): then ``--resume DIR --recover`` puts the backup back, and every stage
# whose outputs still hash to what the backup recorded is reused.
RECOVER_HINT = "python -m utilgen.run --resume {directory} --recover"


def backup_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.backup")


def _write_with_backup(path: Path, value: dict) -> None:
    atomic_write_json(path, value)
    atomic_write_json(backup_of(path), value)


class DamagedRecordError(RunDirectoryError):
    """``config.json`` or ``manifest.json`` cannot be read as utilgen wrote it; ``--recover`` may restore it."""


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DamagedRecordError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise DamagedRecordError(f"{path} holds a JSON {type(value).__name__}, not an object")
    return value


def read_config(path: Path) -> dict:
    """The run's saved config (a JSON object; its keys and values are checked by ``config_from_dict``)."""
    try:
        return _read_json_object(path)
    except FileNotFoundError:
        raise DamagedRecordError(f"{path} is missing") from None
    except DamagedRecordError as error:
        raise DamagedRecordError(f"{error}. {_recovery(path)}") from None


def read_manifest(path: Path) -> dict:
    """The manifest, with its shape checked: a hand-edited or damaged one is refused, never half-trusted."""
    try:
        manifest = _read_json_object(path)
        _check_manifest(path, manifest)
    except FileNotFoundError:
        raise DamagedRecordError(f"{path} is missing. {_recovery(path)}") from None
    except DamagedRecordError as error:
        raise DamagedRecordError(f"{error}. {_recovery(path)}") from None
    return manifest


def _check_manifest(path: Path, manifest: dict) -> None:
    if manifest.get("format") != _FORMAT:
        raise DamagedRecordError(f"{path} has format {manifest.get('format')!r}, expected {_FORMAT!r}")
    stages = manifest.get("stages")
    if not isinstance(stages, dict):
        raise DamagedRecordError(f"{path}: 'stages' is a {type(stages).__name__}, expected an object of stages")
    for name, entry in stages.items():
        if not (
            isinstance(entry, dict)
            and entry.get("status") in ("done", "failed")
            and isinstance(entry.get("key"), str)
            and isinstance(entry.get("seconds"), int | float)
            and isinstance(entry.get("outputs"), dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in entry["outputs"].items())
        ):
            raise DamagedRecordError(f"{path}: stage {name!r} lacks its status, key, seconds or output digests")


def _recovery(path: Path) -> str:
    command = RECOVER_HINT.format(directory=shlex.quote(str(path.parent)))
    if path.name == CONFIG:
        fallback = "without a backup the run's config is lost: start a new run with --out"
    else:
        fallback = "without a backup every stage runs again"
    return (
        f"utilgen writes it atomically, so it was changed from outside. Recover with: {command} "
        f"(it restores {backup_of(path).name}, the copy written with it; {fallback})"
    )


def recover(directory: Path) -> list[str]:
    """Put back the backup of a damaged ``config.json`` or ``manifest.json`` in ``directory``; what was done.

    The damaged file is kept beside it as ``<name>.damaged``. A manifest without a usable backup starts
    empty (every stage runs again); a config without one cannot be guessed, so that raises.
    """
    done = []
    for name, read in ((CONFIG, read_config), (MANIFEST, read_manifest)):
        path = directory / name
        try:
            read(path)
            continue
        except DamagedRecordError:
            pass
        backup = backup_of(path)
        try:
            value = read(backup)
        except DamagedRecordError:
            if name == CONFIG:
                raise DamagedRecordError(
                    f"{path} is damaged and its backup {backup.name} is missing or damaged too: the run's config "
                    "cannot be recovered; start a new run with --out"
                ) from None
            value, source = {"format": _FORMAT, "stages": {}}, "an empty manifest (every stage runs again)"
        else:
            source = f"its backup {backup.name}"
        kept = ""
        if path.exists():
            os.replace(path, path.with_name(f"{name}.damaged"))
            kept = f"; the damaged file is kept as {name}.damaged"
        _write_with_backup(path, value)
        done.append(f"{path} replaced by {source}{kept}")
    return done
