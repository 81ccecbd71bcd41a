"""The bad-input corpus: every fault a user has met, run through the real command line (README, "Exit status").

Each case asserts its exit status, that the message names the file or key and says what to do, and:
- exit 2: nothing was written (no run directory; an existing one byte for byte as it was);
- exit 1, 130, 143: the finished stages are intact, and ``--resume`` (with the fix) ends with exactly
  the results of an uninterrupted run.

Status-2 cases call ``utilgen.run.main`` in this process (the entry point itself, minus the interpreter
start). Faults that need a process of their own (signals, a file-size limit) run ``python -m utilgen.run``.
The late faults start from a copy of the shared smoke run (``smoke_run``) with one stage's output removed,
so only that stage and what follows it run again: the corpus costs about two minutes on two cores.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from utilgen import run as cli
from utilgen.data.fashion_mnist import CLASS_NAMES

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
FOLDER_NAMES = [name.replace("/", "_") for name in CLASS_NAMES]  # "t-shirt/top" -> "t-shirt_top"


# ------------------------------------------------------------------------------------------ inputs


def image_folder(root: Path, names=FOLDER_NAMES, per_class: int = 28) -> Path:
    """Random 16x16 gray images, ``per_class`` in each class folder: enough for the smoke preset's splits."""
    rng = np.random.default_rng(0)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def corrupt_file(root: Path) -> None:
    (root / "bag" / "7.png").write_bytes(b"not a png")


def empty_class(root: Path) -> None:
    for file in (root / "coat").iterdir():
        file.unlink()


def link_out_of_class(root: Path) -> None:
    (root / "bag" / "loop").symlink_to("..")


def same_image_in_two_classes(root: Path) -> None:
    shutil.copy(root / "bag" / "3.png", root / "coat" / "copy.png")


def three_classes(root: Path) -> None:
    for name in FOLDER_NAMES[3:]:
        shutil.rmtree(root / name)


def digit_classes(root: Path) -> None:
    for k, name in enumerate(FOLDER_NAMES):
        (root / name).rename(root / f"digit-{k}")


def stable_diffusion_with_corrupt_weights(workspace: Path) -> Path:
    pytest.importorskip("transformers")
    from _generator_models import save_tiny_stable_diffusion

    directory = save_tiny_stable_diffusion(workspace / "sd")
    weights = directory / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # cut short, not an LFS pointer
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------ status 2: new runs


@dataclasses.dataclass(frozen=True)
class Case:
    """A command line that must be refused before anything is written. ``says``: fragments of the message
    (what is wrong, where, and what to do). ``data``: build an ImageFolder first, then damage it with this."""

    id: str
    args: tuple[str, ...]
    says: tuple[str, ...]
    data: Callable[[Path], None] | None = None


NEW_RUN_CASES = [
    Case("unknown key", ("--set", "mlco.roundz=2"), ("unknown config key mlco.roundz", "the keys of [mlco] are")),
    Case("wrong type", ("--set", "mlco.rounds=two"), ("mlco.rounds", "expected an integer, got 'two'")),
    Case("unknown choice", ("--set", "ilpo.noise_strategy=magic"), ("ilpo.noise_strategy must be one of",)),
    Case("negative count", ("--set", "mlco.rounds=-1"), ("mlco.rounds must be >= 0",)),
    Case("negative lr", ("--set", "valuation.inner_lr=-1"), ("valuation.inner_lr", "> 0")),
    Case("lr beyond float32", ("--set", "tokens.lr=1e300"), ("tokens.lr",)),
    Case("zero lr", ("--set", "tokens.lr=0"), ("tokens.lr must be > 0",)),
    Case("negative guidance", ("--set", "generator.guidance_scale=-5"), ("generator.guidance_scale", ">= 1")),
    Case("zero threads", ("--set", "run.threads=0"), ("run.threads must be >= 1",)),
    Case("rgb embedded", ("--set", "data.channels=3"), ("data.channels must be 1", "--data PATH")),
    Case("unknown classifier", ("--set", "evaluation.classifier=vgg"), ("evaluation.classifier='vgg'", "choose")),
    Case("unknown strategy", ("--set", "valuation.strategy=hessian"), ("valuation.strategy='hessian'", "choose")),
    Case("unknown backend", ("--set", "ilpo.backend=cdua"), ("ilpo.backend='cdua' is not a backend",)),
    Case("backend off device", ("--set", "ilpo.backend=cuda", "--device", "cpu"), ("ilpo.backend='cuda' cannot",)),
    Case("clip without model", ("--set", "ilpo.clip_weight=1"), ("ilpo.clip_weight > 0", "leave it at 0")),
    Case("too few images", ("--set", "data.shots_per_class=400"), ("too few images", "lower shots_per_class")),
    Case("device tpu", ("--device", "tpu"), ("run.device='tpu' is not a device", "use auto, cpu")),
    Case("device meta", ("--device", "meta"), ("run.device='meta'", "utilgen runs on cpu or cuda")),
    Case("missing data", ("--data", "/nonexistent/images"), ("/nonexistent/images", "does not exist")),
    Case("missing generator", ("--generator", "/nonexistent/sd"), ("/nonexistent/sd", "not a directory")),
    Case("missing config file", ("--config", "/nonexistent/run.toml"), ("/nonexistent/run.toml", "does not exist")),
    Case("sd21 without inputs", ("--preset", "sd21"), ("--generator PATH",)),
    Case("corrupt image", ("--data", "{data}"), ("bag/7.png", "not an image", "Fix or remove"), corrupt_file),
    Case("empty class", ("--data", "{data}"), ("coat", "class has no loadable images"), empty_class),
    Case("link out of class", ("--data", "{data}"), ("bag/loop", "outside its class folder"), link_out_of_class),
    Case(
        "one image two labels",
        ("--data", "{data}"),
        ("coat/copy.png", "bag/3.png", "cannot have two labels"),
        same_image_in_two_classes,
    ),
    Case("classes not the generator's", ("--data", "{data}"), ("'digit-0'", "Rename the folders"), digit_classes),
    Case("three classes", ("--data", "{data}"), ("Fashion-MNIST's 10 classes", "--generator PATH"), three_classes),
    Case(
        "generator missing files",
        ("--generator", "{data}"),
        ("missing unet/config.json", "saved in the diffusers layout"),
    ),
    Case("out inside data", ("--data", "{data}", "--out", "{data}/run"), ("inside the data", "outside the data")),
]


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory) -> Path:
    return image_folder(tmp_path_factory.mktemp("corpus") / "data")


def _main(*args: str) -> int:
    return cli.main(["--preset", "smoke", "--quiet", *args] if "--preset" not in args else ["--quiet", *args])


@pytest.mark.parametrize("case", NEW_RUN_CASES, ids=lambda case: case.id)
def test_refused_before_anything_is_written(case, clean_folder, tmp_path, capsys):
    data = tmp_path / "data"
    if "{data}" in " ".join(case.args):
        shutil.copytree(clean_folder, data, symlinks=True)
        if case.data:
            case.data(data)
    before = snapshot(data) if data.exists() else {}
    args = [arg.format(data=data) for arg in case.args]
    out = Path(args[args.index("--out") + 1]) if "--out" in args else tmp_path / "run"
    status = _main(*args, *([] if "--out" in args else ["--out", str(out)]))
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("utilgen: error: "), err
    assert "Traceback" not in err
    for fragment in case.says:
        assert fragment in err, f"{fragment!r} not in: {err}"
    assert not out.exists()
    assert (snapshot(data) if data.exists() else {}) == before


def test_refused_config_files_are_named(tmp_path, capsys):
    for text, says in (
        ("[mlcoo]\nrounds = 2\n", "unknown config section 'mlcoo'"),
        ("[mlco]\nrounds = \n", "does not parse: Invalid value (at line 2"),
    ):
        path = tmp_path / "run.toml"
        path.write_text(text)
        assert _main("--config", str(path), "--out", str(tmp_path / "run")) == 2
        err = capsys.readouterr().err
        assert f"config file {path}" in err or str(path) in err
        assert says in err
        assert not (tmp_path / "run").exists()


def test_corrupt_stable_diffusion_weights_are_named(tmp_path, capsys):
    directory = stable_diffusion_with_corrupt_weights(tmp_path)
    data = image_folder(tmp_path / "data")
    out = tmp_path / "run"
    status = _main("--generator", str(directory), "--data", str(data), "--set", "data.channels=3", "--out", str(out))
    err = capsys.readouterr().err
    assert status == 2
    assert "unet/diffusion_pytorch_model.safetensors is truncated" in err
    assert "download or copy it again" in err
    assert not out.exists()


def test_an_unwritable_out_names_the_directory_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import tempfile

    def read_only(*args, **kwargs):  # as root, chmod cannot make a directory read-only: the file system is
        raise OSError(errno.EROFS, "Read-only file system", "/somewhere/.config.json.tmp")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    out = tmp_path / "run"
    assert _main("--out", str(out)) == 2
    err = capsys.readouterr().err
    assert f"cannot write the run directory {out}: Read-only file system" in err
    assert "choose a writable --out" in err
    assert ".tmp" not in err
    assert not out.exists()


def test_not_enough_disk_space_states_both_numbers(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("utilgen.preflight.free_bytes", lambda path: 1024)
    assert _main("--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err
    assert "MiB are free" in err
    assert not (tmp_path / "run").exists()


def test_the_disk_check_fits_a_smoke_run_on_a_small_volume(tmp_path):
    from utilgen.config import build_config
    from utilgen.data import load_embedded
    from utilgen.preflight import planned_bytes

    planned = planned_bytes(build_config("smoke", None, []), load_embedded(16))
    assert planned < 8 * 2**20  # a smoke run writes about 2 MiB: no flat 64 MiB allowance on top


# ------------------------------------------------------------------------------------------ status 2: resumes


def resumable(smoke_run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(smoke_run, copy, symlinks=True)
    return copy


RESUME_CASES = [
    ("manifest stages a list", "manifest.json", lambda t: t.replace('"stages": {', '"stages": [], "x": {', 1)),
    ("manifest truncated", "manifest.json", lambda t: t[: len(t) // 2]),
    ("config truncated", "config.json", lambda t: t[: len(t) // 2]),
]


@pytest.mark.parametrize(("name", "record", "damage"), RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_a_damaged_record_is_named_with_its_recovery(name, record, damage, smoke_run, tmp_path, capsys):
    run = resumable(smoke_run, tmp_path)
    (run / record).write_text(damage((run / record).read_text()))
    before = snapshot(run)
    assert cli.main(["--quiet", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / record}" in err
    assert f"python -m utilgen.run --resume {run} --recover" in err
    assert "Traceback" not in err
    assert snapshot(run) == before


def test_recover_puts_the_backup_back_and_reuses_every_stage(smoke_run, tmp_path):
    run = resumable(smoke_run, tmp_path)
    manifest = (run / "manifest.json").read_text()
    (run / "manifest.json").write_text(manifest[:100])
    (run / "config.json").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "utilgen.run", "--quiet", "--resume", str(run), "--recover"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "manifest.json replaced by its backup" in result.stderr
    assert (run / "manifest.json.damaged").read_text() == manifest[:100]
    assert json.loads((run / "manifest.json").read_text())["stages"] == json.loads(manifest)["stages"]  # no rerun


def test_changed_data_is_refused_on_resume_naming_the_images(clean_folder, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(clean_folder, data)
    run = tmp_path / "run"
    # a run that stops right after its splits: runaway class tokens (exit 1)
    assert _main("--data", str(data), "--out", str(run), "--set", "tokens.lr=1e9") == 1
    capsys.readouterr()
    test_images = json.loads((run / "splits.json").read_text())["sources"]["test"]
    for path in test_images[:3]:
        ImageOps.invert(Image.open(path)).save(path)  # same names, other pixels
    before = snapshot(run)
    assert cli.main(["--quiet", "--resume", str(run), "--set", "tokens.lr=0.005"]) == 2
    err = capsys.readouterr().err
    assert "the data changed since the run split it: 3 of" in err
    assert test_images[0] in err
    assert "restore the data the run used" in err
    assert snapshot(run) == before


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from utilgen.rundir import RunLock
lock = RunLock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(300)
"""


def test_a_locked_run_is_refused_naming_the_holder(smoke_run, tmp_path, capsys):
    run = resumable(smoke_run, tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline() == "locked\n"
        before = snapshot(run)
        assert cli.main(["--quiet", "--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid}" in err
        assert "Wait for it to finish" in err
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------------------------------ status 1, 130, 143


def run_cli(*args: str, limit_bytes: int | None = None) -> subprocess.CompletedProcess:
    def file_size_limit():  # the child only; Python ignores SIGXFSZ, so a write past it fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    return subprocess.run(
        [sys.executable, "-m", "utilgen.run", "--quiet", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        preexec_fn=file_size_limit if limit_bytes else None,
    )


def stages(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())["stages"]


def assert_resumes_to_the_uninterrupted_result(run: Path, smoke_run: Path, kept: list[str], *fix: str) -> None:
    finished = stages(run)
    result = run_cli("--resume", str(run), *fix)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in kept:  # reused, not run again
        assert stages(run)[name]["finished"] == finished[name]["finished"], name
    assert (run / "evaluation.json").read_bytes() == (smoke_run / "evaluation.json").read_bytes()
    assert not list(run.rglob("*.partial*"))


def test_runaway_class_tokens_stop_the_stage_naming_the_knob(tmp_path):
    run = tmp_path / "run"
    result = run_cli("--preset", "smoke", "--out", str(run), "--set", "tokens.lr=1e9")
    assert result.returncode == 1
    assert "textual inversion diverged" in result.stderr
    assert "tokens.lr" in result.stderr
    assert f"--resume {run}" in result.stderr
    assert "Traceback" not in result.stderr
    assert stages(run)["splits"]["status"] == "done"
    assert stages(run)["tokens"]["status"] == "failed"


def test_runaway_dpo_stops_the_round_and_resume_with_the_fix_matches(smoke_run, tmp_path):
    run = resumable(smoke_run, tmp_path)
    lr = json.loads((run / "config.json").read_text())["mlco"]["lr"]
    result = run_cli("--resume", str(run), "--set", "mlco.lr=1e3")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "mlco.lr" in result.stderr
    assert "Traceback" not in result.stderr
    assert stages(run)["mlco-1"]["status"] == "failed"
    assert (run / "mlco" / "round-1.partial.safetensors").exists()
    assert_resumes_to_the_uninterrupted_result(run, smoke_run, ["tokens", "valuation"], "--set", f"mlco.lr={lr}")


def test_a_full_disk_stops_the_stage_and_resume_after_freeing_space_matches(smoke_run, tmp_path):
    run = resumable(smoke_run, tmp_path)
    shutil.rmtree(run / "pools" / "utilgen")  # ILPO runs again and writes its 82 KB tensor file
    result = run_cli("--resume", str(run), limit_bytes=40_000)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "stage ilpo could not write" in result.stderr
    assert "pools/utilgen" in result.stderr
    assert "size limit" in result.stderr
    assert "raise the limit" in result.stderr
    assert "Traceback" not in result.stderr
    assert stages(run)["ilpo"]["status"] == "failed"
    assert not list((run / "pools").glob(".utilgen*"))  # no half-written pool left behind
    assert_resumes_to_the_uninterrupted_result(run, smoke_run, ["tokens", "valuation", "mlco-1"])


@pytest.mark.parametrize(
    ("sig", "status", "says"), [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated (SIGTERM)")]
)
def test_a_signal_stops_with_its_status_and_resume_matches(sig, status, says, smoke_run, tmp_path):
    run = resumable(smoke_run, tmp_path)
    shutil.rmtree(run / "pools" / "utilgen")
    process = subprocess.Popen(
        [sys.executable, "-m", "utilgen.run", "--quiet", "--resume", str(run)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT ignored (as
        # `nohup` users want): give the child the default, so the test does not depend on how CI was started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        finished_before = stages(run)["ilpo"]["finished"]
        deadline = time.monotonic() + 240
        while stages(run)["ilpo"]["finished"] == finished_before:  # until ILPO is done again: stop the rest
            assert process.poll() is None, "the run ended before ILPO was done again"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(sig)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == status, err[-3000:]
    assert says in err
    assert f"continue with: python -m utilgen.run --resume {run}" in err
    assert "Traceback" not in err
    assert_resumes_to_the_uninterrupted_result(run, smoke_run, ["tokens", "valuation", "mlco-1", "ilpo"])
