"""The run directory: manifest bookkeeping, output digests, stage keys, the lock."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from utilgen.rundir import (
    DamagedRecordError,
    RunDirectory,
    RunDirectoryError,
    RunDirectoryLocked,
    output_digest,
    recover,
    stage_key,
)


def test_create_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="not empty"):
        RunDirectory.create(tmp_path, {"a": 1})


def test_create_on_an_existing_run_points_to_resume(tmp_path):
    RunDirectory.create(tmp_path / "run", {"a": 1})
    with pytest.raises(RunDirectoryError, match="--resume"):
        RunDirectory.create(tmp_path / "run", {"a": 1})


def test_open_needs_a_run_directory(tmp_path):
    with pytest.raises(RunDirectoryError, match="not a utilgen run directory"):
        RunDirectory.open(tmp_path)


def test_done_needs_status_key_and_intact_outputs(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {"a": 1})
    (run.path / "pool").mkdir()
    (run.path / "pool" / "x.png").write_bytes(b"123")
    (run.path / "out.json").write_text("{}")
    assert not run.is_done("stage", "k1")
    run.mark_done("stage", "k1", ["pool", "out.json"], 1.5)
    reopened = RunDirectory.open(run.path)
    assert reopened.is_done("stage", "k1")
    assert not reopened.is_done("stage", "k2")  # the config changed
    (run.path / "pool" / "x.png").write_bytes(b"124")  # an output changed underneath
    assert not reopened.is_done("stage", "k1")
    (run.path / "pool" / "x.png").write_bytes(b"123")
    (run.path / "pool" / "y.png").write_bytes(b"")  # an extra file is a different output too
    assert not reopened.is_done("stage", "k1")


def test_adopted_stages_are_done_under_their_key_and_stop_at_the_first_unfinished(tmp_path):
    source = RunDirectory.create(tmp_path / "main", {"a": 1})
    (source.path / "pools" / "p").mkdir(parents=True)
    (source.path / "pools" / "p" / "x.png").write_bytes(b"123")
    (source.path / "one.json").write_text("{}")
    (source.path / "log.json").write_text("[1]")
    source.mark_done("one", "k1", ["one.json"], 2.0)
    source.mark_done("two", "k2", ["pools/p"], 3.0)
    source.mark_failed("three", "k3", "stopped", 1.0)
    source.mark_done("four", "k4", ["one.json"], 1.0)  # after an unfinished stage: not adopted
    run = RunDirectory.create(tmp_path / "variant", {"a": 2})
    adopted = run.adopt_stages(source.path, ("one", "two", "three", "four"), files=("log.json", "absent.json"))
    assert adopted == ["one", "two"]
    reopened = RunDirectory.open(run.path)
    assert reopened.is_done("one", "k1")
    assert reopened.is_done("two", "k2")  # the copied outputs hash as the source's did
    assert not reopened.is_done("two", "other key")  # the key decides, not the copy
    assert not reopened.is_done("four", "k4")
    assert reopened.seconds() == {"one": 0.0, "two": 0.0}  # no time spent in this run
    assert reopened.manifest["stages"]["one"]["adopted_from"] == str(source.path)
    assert (run.path / "log.json").read_text() == "[1]"
    assert not (run.path / "absent.json").exists()
    shutil.rmtree(source.path / "pools")  # a finished stage whose output is gone is not adopted
    damaged = RunDirectory.create(tmp_path / "damaged", {"a": 3})
    assert damaged.adopt_stages(source.path, ("one", "two")) == ["one"]


def test_a_rerun_for_a_changed_output_is_logged_naming_it(tmp_path, caplog):
    run = RunDirectory.create(tmp_path / "run", {"a": 1})
    (run.path / "out.json").write_text("{}")
    run.mark_done("stage", "k1", ["out.json"], 1.5)
    (run.path / "out.json").write_text('{"edited": true}')
    with caplog.at_level("WARNING", logger="utilgen.rundir"):
        assert not run.is_done("stage", "k1")
    assert "stage stage runs again: its output out.json changed since the stage wrote it" in caplog.text
    (run.path / "out.json").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="utilgen.rundir"):
        assert not run.is_done("stage", "k1")
    assert "out.json is missing" in caplog.text


def test_failed_stage_is_not_done_and_keeps_its_message(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {})
    run.mark_failed("valuation", "k", "loss is nan", 2.0)
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["stages"]["valuation"]["status"] == "failed"
    assert manifest["stages"]["valuation"]["error"] == "loss is nan"
    assert not run.is_done("valuation", "k")


def test_mark_done_fails_for_a_missing_output(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {})
    with pytest.raises(FileNotFoundError, match="was not written"):
        run.mark_done("stage", "k", ["missing"], 0.0)


def test_clear_removes_files_and_directories(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {})
    (run.path / "d").mkdir()
    (run.path / "d" / "f").write_text("x")
    (run.path / "f").write_text("x")
    run.clear(["d", "f", "absent"])
    assert not (run.path / "d").exists()
    assert not (run.path / "f").exists()


def test_directory_digest_depends_on_names_and_contents(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_bytes(b"1")
    first = output_digest(tmp_path / "a")
    (tmp_path / "a" / "x").rename(tmp_path / "a" / "y")
    assert output_digest(tmp_path / "a") != first


def test_stage_keys_chain():
    first = stage_key("start", [{"steps": 1}])
    assert stage_key("start", [{"steps": 1}]) == first
    assert stage_key("start", [{"steps": 2}]) != first
    assert stage_key(first, []) != stage_key(stage_key("start", [{"steps": 2}]), [])  # upstream changes propagate


def test_foreign_manifest_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RunDirectoryError, match="not valid JSON"):
        RunDirectory.open(tmp_path)


@pytest.mark.parametrize(
    ("stages", "message"),
    [([], "'stages' is a list"), ({"tokens": {"status": "done"}}, "stage 'tokens' lacks its status, key")],
)
def test_a_manifest_of_the_wrong_shape_is_refused_with_the_recovery(tmp_path, stages, message):
    run = RunDirectory.create(tmp_path / "run", {"a": 1})
    (run.path / "manifest.json").write_text(json.dumps({"format": "utilgen.run/1", "stages": stages}))
    with pytest.raises(DamagedRecordError, match=message) as caught:
        RunDirectory.open(run.path)
    assert f"--resume {run.path} --recover" in str(caught.value)


def test_recover_restores_the_backups_and_keeps_the_damaged_files(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {"a": 1})
    (run.path / "out.txt").write_text("x")
    run.mark_done("stage", "k", ["out.txt"], 1.0)
    manifest = (run.path / "manifest.json").read_text()
    (run.path / "manifest.json").write_text(manifest[:10])
    (run.path / "config.json").unlink()
    done = recover(run.path)
    assert len(done) == 2
    assert RunDirectory.open(run.path).is_done("stage", "k")
    assert RunDirectory.open(run.path).read_config() == {"a": 1}
    assert (run.path / "manifest.json.damaged").read_text() == manifest[:10]
    assert recover(run.path) == []  # intact: nothing to do


def test_recover_without_backups(tmp_path):
    run = RunDirectory.create(tmp_path / "run", {"a": 1})
    for name in ("manifest.json", ".manifest.json.backup"):
        (run.path / name).write_text("{")
    assert "an empty manifest (every stage runs again)" in recover(run.path)[0]
    assert RunDirectory.open(run.path).manifest["stages"] == {}
    for name in ("config.json", ".config.json.backup"):
        (run.path / name).unlink()
    with pytest.raises(DamagedRecordError, match="cannot be recovered; start a new run"):
        recover(run.path)


def test_create_leaves_no_directory_when_it_cannot_write(tmp_path, monkeypatch):
    import errno
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", "/x/.config.json.tmp")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(
        RunDirectoryError, match=r"cannot write the run directory .*run: Read-only file system \(.*config.json\)"
    ):
        RunDirectory.create(tmp_path / "run", {"a": 1})
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ the lock

_HOLD = """
import sys, time
from utilgen.rundir import RunDirectory
RunDirectory.open(sys.argv[1], lock=True)
print("locked", flush=True)
time.sleep(300)
"""


def _hold_lock_in_a_subprocess(path: Path) -> subprocess.Popen:
    """A process that holds ``path``'s lock until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_locked_run_directory_refuses_a_second_holder_and_names_the_first(tmp_path):
    first = RunDirectory.create(tmp_path / "run", {"a": 1}, lock=True)
    # a second open file description of the same file conflicts, even within one process
    with pytest.raises(
        RunDirectoryLocked, match=re.escape(f"in use by pid {os.getpid()} on host {socket.gethostname()},")
    ):
        RunDirectory.open(tmp_path / "run", lock=True)
    with pytest.raises(RunDirectoryLocked, match="--resume"):  # --out on it names the holder, not "not empty"
        RunDirectory.create(tmp_path / "run", {"a": 1}, lock=True)
    RunDirectory.open(tmp_path / "run")  # reading without the lock stays possible
    first.release()
    RunDirectory.open(tmp_path / "run", lock=True).release()


def test_a_lock_file_alone_does_not_make_a_directory_non_empty(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text("")  # left by an earlier create that was refused after locking
    RunDirectory.create(tmp_path / "run", {}, lock=True).release()
    assert (tmp_path / "run" / "config.json").exists()


def test_the_lock_dies_with_its_holder(tmp_path):
    RunDirectory.create(tmp_path / "run", {})
    holder = _hold_lock_in_a_subprocess(tmp_path / "run")
    try:
        with pytest.raises(RunDirectoryLocked, match=f"pid {holder.pid} "):
            RunDirectory.open(tmp_path / "run", lock=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / "run" / ".lock").exists()  # the file stays behind, and does not block
    RunDirectory.open(tmp_path / "run", lock=True).release()
