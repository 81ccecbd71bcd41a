"""The run directory: manifest bookkeeping, output digests, stage keys."""

from __future__ import annotations

import json

import pytest

from utilgen.rundir import RunDirectory, RunDirectoryError, output_digest, stage_key


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
