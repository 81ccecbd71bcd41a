"""``python -m utilgen.run`` end to end: the smoke preset, the run directory, SIGKILL + resume, bad input.

The end-to-end tests run the real entry point in a subprocess (docs/design.md, "Tests and benchmarks") on the
``smoke`` preset: every stage, at toy scale.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utilgen import run as cli

STAGES = ["splits", "tokens", "pool0", "plain", "valuation", "mlco-1", "ilpo", "evaluate", "report"]
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def _command(*args: str) -> list[str]:
    preset = [] if "--resume" in args else ["--preset", "smoke"]  # a resumed run keeps its saved preset
    return [sys.executable, "-m", "utilgen.run", *preset, "--quiet", *args]


def _done_stages(run_dir: Path) -> list[str]:
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [name for name, entry in manifest["stages"].items() if entry["status"] == "done"]


# smoke_run (tests/conftest.py): one finished smoke run, shared with tests/test_readme.py.


def test_smoke_run_writes_the_documented_run_directory(smoke_run):
    assert set(_done_stages(smoke_run)) == set(STAGES)
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["preset"] == "smoke"
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert set(metrics["accuracy"]) == {
        "real-only",
        "plain synthetic-only",
        "plain joint",
        "utilgen synthetic-only",
        "utilgen joint",
    }
    for result in metrics["accuracy"].values():
        assert 0.0 <= result["mean"] <= 1.0
        assert len(result["accuracies"]) == 1
    compared = {(c["a"], c["b"]): c for c in metrics["comparisons"]}
    assert set(compared) == {
        ("utilgen synthetic-only", "plain synthetic-only"),
        ("utilgen joint", "plain joint"),
        ("utilgen joint", "real-only"),
    }
    for comparison in compared.values():  # one evaluation seed in the smoke preset: no interval
        assert comparison["seeds"] == 1
        assert comparison["ci95_points"] is None
    assert metrics["valuation"]["curve"]["loss"]
    assert metrics["mlco"][0]["round"] == 1
    report = (smoke_run / "report.md").read_text()
    assert "plain synthetic-only" in report
    assert "plots/" in report
    # synthetic data: an ImageFolder tree plus metadata.jsonl, one row per image
    pool = smoke_run / "pools" / "utilgen"
    rows = [json.loads(line) for line in (pool / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 10 * 4
    assert {"file", "label", "class_name", "seed", "round", "utility"} <= set(rows[0])
    first = Image.open(pool / rows[0]["file"])
    assert first.size == (16, 16)
    # weights as safetensors only: nothing pickled anywhere in the run
    suffixes = {p.suffix for p in smoke_run.rglob("*") if p.is_file()}
    assert not suffixes & {".pt", ".pth", ".pkl", ".bin", ".ckpt"}
    assert (smoke_run / "mlco" / "round-1" / "adapters.safetensors").exists()
    assert not list(smoke_run.rglob("*.tmp"))


def _kill_after(out: Path, stage: str, *args: str) -> None:
    """Start the run, SIGKILL it as soon as ``stage`` is marked done."""
    process = subprocess.Popen(_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.monotonic() + 240
        while stage not in _done_stages(out):
            assert process.poll() is None, f"the run ended (status {process.returncode}) before {stage} was done"
            assert time.monotonic() < deadline, f"{stage} not done in time"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()


def _safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        return handle.metadata(), {name: handle.get_tensor(name).tobytes() for name in handle.keys()}


def test_sigkill_then_resume_matches_an_uninterrupted_run(smoke_run, tmp_path):
    out = tmp_path / "run"
    _kill_after(out, "pool0", "--out", str(out))
    done = _done_stages(out)
    assert "pool0" in done
    assert "report" not in done
    _kill_after(out, "mlco-1", "--resume", str(out))  # a second kill, later in the loop
    assert "report" not in _done_stages(out)
    result = subprocess.run(_command("--resume", str(out)), capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(_done_stages(out)) == set(STAGES)
    for relative in (
        "evaluation.json",
        "tokens.safetensors",
        "valuation/valuation.safetensors",
        "ilpo.json",
        "pools/utilgen/metadata.jsonl",
        "pools/plain/metadata.jsonl",
        "mlco/round-1/adapters.safetensors",
        "pools/utilgen/tensors.safetensors",
    ):
        if relative.endswith(".safetensors"):  # the header's key order is not fixed across processes
            assert _safetensors(out / relative) == _safetensors(smoke_run / relative), relative
        else:
            assert (out / relative).read_bytes() == (smoke_run / relative).read_bytes(), relative
    for relative in sorted(p.relative_to(smoke_run) for p in (smoke_run / "pools").rglob("*.png")):
        assert (out / relative).read_bytes() == (smoke_run / relative).read_bytes(), relative


def test_resume_of_a_finished_run_recomputes_nothing(smoke_run, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(smoke_run), str(copy)], check=True)
    before = json.loads((copy / "manifest.json").read_text())
    result = subprocess.run(_command("--resume", str(copy)), capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((copy / "manifest.json").read_text())["stages"] == before["stages"]


# ------------------------------------------------------------------------------------------ bad input


def _main(capsys, *args: str) -> tuple[int, str]:
    status = cli.main(["--preset", "smoke", "--quiet", *args])
    return status, capsys.readouterr().err


def _image_folder(root: Path, classes: int = 10, per_class: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for k in range(classes):
        folder = root / f"class{k}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_an_existing_run_directory_is_not_overwritten(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status, err = _main(capsys, "--out", str(out))
    assert status == 2
    assert "not empty" in err
    assert (out / "keep.txt").read_text() == "mine"


def test_an_earlier_run_is_not_resumed_or_overwritten_by_out(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "manifest.json").write_text('{"format": "utilgen.run/1", "stages": {}}')
    status, err = _main(capsys, "--out", str(out), "--set", "mlco.rounds=2")
    assert status == 2
    assert "--resume" in err
    assert (out / "config.json").read_text() == "{}"


def test_exit_status_2_from_the_real_entry_point(tmp_path):
    result = subprocess.run(
        _command("--set", "mlco.rounds=-1", "--out", str(tmp_path / "run")),
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
    )
    assert result.returncode == 2
    assert "mlco.rounds must be >= 0" in result.stderr


def test_list_keys_names_every_key(capsys):
    assert cli.main(["--list-keys"]) == 0
    out = capsys.readouterr().out
    assert "mlco.rounds = 2" in out
    assert "evaluation.seeds = (0, 1, 2)" in out
    assert "ilpo.prompt_steps = 4" in out


def test_non_finite_loss_stops_the_stage_and_resume_with_a_fix_finishes(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        _command("--out", str(out), "--set", "valuation.inner_lr=1e30"),
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 1
    assert "TODV" in result.stderr
    assert f"--resume {out}" in result.stderr
    manifest = json.loads((out / "manifest.json").read_text())["stages"]
    assert manifest["valuation"]["status"] == "failed"
    assert "nan" in manifest["valuation"]["error"]
    assert {name for name, e in manifest.items() if e["status"] == "done"} == {"splits", "tokens", "pool0", "plain"}
    assert (out / "valuation.partial" / "valuation.safetensors").exists()  # what was done so far, kept
    # the fix, plus the ablation pools (evaluation.ablation), which the uninterrupted smoke run does not cover
    fix = ["--set", "valuation.inner_lr=0.05", "--set", "evaluation.ablation=true", "--set", "ilpo.repair_quantile=0.5"]
    result = subprocess.run(_command("--resume", str(out), *fix), capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = json.loads((out / "manifest.json").read_text())["stages"]
    assert set(_done_stages(out)) == set(STAGES) | {"ablation"}
    accuracy = json.loads((out / "metrics.json").read_text())["accuracy"]
    assert {"+mlco synthetic-only", "+prompt synthetic-only", "+noise synthetic-only"} <= set(accuracy)
    for name in ("splits", "tokens", "pool0", "plain"):  # reused, not recomputed
        assert resumed[name]["finished"] == manifest[name]["finished"]
    assert json.loads((out / "config.json").read_text())["valuation"]["inner_lr"] == 0.05
    assert not (out / "valuation.partial").exists()  # it described the failure; the stage has since succeeded


def test_config_file_may_name_the_preset(capsys, tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "execute", lambda config, directory, **_: seen.setdefault("config", config) and 0)
    (tmp_path / "run.yaml").write_text("preset: smoke\nmlco:\n  rounds: 2\n")
    assert cli.main(["--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run")]) == 0
    assert seen["config"].preset == "smoke"
    assert seen["config"].mlco.rounds == 2
    status = cli.main(["--preset", "default", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "r")])
    assert status == 2
    assert "names preset 'smoke'" in capsys.readouterr().err


def test_stable_diffusion_backend_on_an_image_folder_end_to_end(tmp_path):
    """--generator (a tiny random SD directory, 32 px) with --data (an RGB ImageFolder at 16 px): every stage runs."""
    pytest.importorskip("transformers")
    from _generator_models import save_tiny_stable_diffusion

    sd = save_tiny_stable_diffusion(tmp_path / "sd")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "fox"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(28):  # smoke: 4 shots + 3 meta + 20 test per class, and one to spare
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
                tmp_path / "data" / name / f"{i}.png"
            )
    out = tmp_path / "run"
    command = _command(
        "--generator", str(sd), "--data", str(tmp_path / "data"), "--set", "data.channels=3", "--out", str(out)
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(_done_stages(out)) == set(STAGES)
    assert json.loads((out / "config.json").read_text())["generator"]["kind"] == "stable-diffusion"
    rows = [json.loads(line) for line in (out / "pools/utilgen/metadata.jsonl").read_text().splitlines()]
    assert {row["class_name"] for row in rows} == {"cat", "dog", "fox"}
    image = Image.open(out / "pools/utilgen" / rows[0]["file"])
    assert image.size == (16, 16)
    assert image.mode == "RGB"


# ------------------------------------------------------------------------------------------ issue 12


def _smoke_run_directory(path: Path, *overrides: str) -> Path:
    """A run directory holding a smoke config and no finished stage: what --resume accepts."""
    from utilgen.config import build_config
    from utilgen.rundir import RunDirectory

    RunDirectory.create(path, build_config("smoke", None, list(overrides)).to_dict())
    return path


_HOLD_LOCK = """
import sys, time
from utilgen.rundir import RunDirectory
RunDirectory.open(sys.argv[1], lock=True)
print("locked", flush=True)
time.sleep(300)
"""


def test_a_second_process_on_a_locked_run_directory_gets_status_2_naming_the_holder(capsys, tmp_path):
    out = _smoke_run_directory(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline() == "locked\n"
        manifest = (out / "manifest.json").read_text()
        status, err = cli.main(["--quiet", "--resume", str(out)]), capsys.readouterr().err
        assert status == 2
        assert f"is in use by pid {holder.pid} on host " in err
        assert "Wait for it to finish" in err
        status, err = _main(capsys, "--out", str(out))  # --out on it: the holder too, not "not empty"
        assert status == 2
        assert f"pid {holder.pid}" in err
        assert (out / "manifest.json").read_text() == manifest  # neither touched the holder's run
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_run_directory_inside_the_data_is_refused_before_anything_is_written(capsys, tmp_path):
    data = _image_folder(tmp_path / "data", per_class=2)
    (tmp_path / "link").symlink_to(data)
    for out in (data / "run", tmp_path / "link" / "run", tmp_path / "elsewhere" / ".." / "data" / "run"):
        status, err = _main(capsys, "--data", str(out.parent), "--out", str(out))
        assert status == 2, err
        assert f"--out {out}" in err
        assert f"--data {out.parent.absolute()}" in err
        assert not out.exists()
    # the real paths differ from the given ones: --data through the link, --out directly
    status, err = _main(capsys, "--data", str(tmp_path / "link"), "--out", str(data / "run"))
    assert status == 2
    assert "inside the data directory" in err
    # --resume of a run someone put inside its data
    run = _smoke_run_directory(data / "run", f"data.source={data}")
    status, err = cli.main(["--quiet", "--resume", str(run)]), capsys.readouterr().err
    assert status == 2
    assert f"--resume {run}" in err
    assert not (run / ".lock").exists()  # refused before the run directory was locked


def test_quiet_keeps_the_terminal_quiet_and_run_log_complete(smoke_run):
    log_text = (smoke_run / "run.log").read_text()  # the shared smoke run ran with --quiet
    for stage in STAGES:
        assert f"stage {stage}: done in" in log_text  # INFO lines reach the file whatever the terminal shows
