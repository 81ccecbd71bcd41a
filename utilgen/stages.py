"""Skip-or-run bookkeeping of the loop's stages against the run directory's manifest (layer 5).

``Stages.stage(name, settings, outputs)`` is a context manager that yields whether the stage
must run. A stage is skipped when the manifest marks it done under the same key (its settings
chained with the key of the stage before it, ``rundir.stage_key``) and its outputs still hash
to what was recorded. Once one stage runs, every later one runs too: its inputs may have
changed. Before a stage runs, its old outputs are cleared and torch is seeded from the run
seed and the stage's name, so a stage computes the same thing whether the run was resumed or not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import logging
import time
from collections.abc import Iterator

import torch

from utilgen.rundir import RunDirectory, free_bytes, stage_key

log = logging.getLogger(__name__)


class StageError(RuntimeError):
    """A stage stopped (a non-finite loss, runaway training, a full disk); what finished before it is kept and
    the run can be resumed."""


def stage_seed(seed: int, name: str) -> int:
    """The torch seed of stage ``name`` in a run seeded ``seed``."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:7], "little")


class Stages:
    """The chained stage keys, timing, the manifest and the per-stage torch seeds of one run."""

    def __init__(self, directory: RunDirectory, seed: int, *, planned_bytes: int | None = None):
        self.directory, self.seed, self.key = directory, seed, "start"
        self.planned_bytes = planned_bytes  # what the whole run writes (preflight's estimate), for a full disk
        self.rerun = False  # once a stage runs, every later one does: its inputs may have changed

    @contextlib.contextmanager
    def stage(self, name: str, settings: list, outputs: list[str]) -> Iterator[bool]:
        """Yield True when stage ``name`` must run (then mark it done), False when its outputs are reused."""
        self.key = stage_key(self.key, [_plain(s) for s in settings])
        if not self.rerun and self.directory.is_done(name, self.key):
            log.info("stage %s: done earlier, reusing its outputs", name)
            yield False
            return
        self.rerun = True
        self.directory.clear(outputs)
        torch.manual_seed(stage_seed(self.seed, name))
        log.info("stage %s: running", name)
        start = time.perf_counter()
        try:
            yield True
        except StageError as error:
            self.directory.mark_failed(name, self.key, str(error), time.perf_counter() - start)
            raise
        except OSError as error:
            if error.errno not in OUT_OF_SPACE:
                raise
            message = out_of_space_message(name, outputs, error, self.directory.path, self.planned_bytes)
            with contextlib.suppress(OSError):  # the manifest may not fit either; the stage then just runs again
                self.directory.mark_failed(name, self.key, message, time.perf_counter() - start)
            raise StageError(message) from error
        seconds = time.perf_counter() - start
        self.directory.mark_done(name, self.key, outputs, seconds)
        log.info("stage %s: done in %.1f s", name, seconds)


# A full disk, a full quota, a file over the process's size limit (ulimit -f; Python ignores SIGXFSZ, so
# the write fails with EFBIG): the stage stops like one with a non-finite loss, and resumes once there is room.
OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def out_of_space_message(stage: str, outputs: list[str], error: OSError, directory, planned_bytes: int | None) -> str:
    what = "a file reached the size limit (ulimit -f)" if error.errno == errno.EFBIG else "the disk is full"
    free = free_bytes(directory) / 2**20
    planned = f"the run writes about {planned_bytes / 2**20:.1f} MiB in all; " if planned_bytes else ""
    fix = "raise the limit (ulimit -f)" if error.errno == errno.EFBIG else "free some space"
    return (
        f"stage {stage} could not write its outputs ({', '.join(outputs)}) in {directory}: {what} "
        f"({error.strerror}: {error.filename}). {planned}{free:.1f} MiB are free there. The stages before it are "
        f"kept: {fix}, then resume (--resume DIR)"
    )


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
