"""The README's promises, checked against what the code does.

CI runs the README's test command line, the config keys, presets, extras,
environment switches and command-line flags it names exist, its examples run,
and its run-directory table is what a run writes.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from utilgen import config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
pytestmark = pytest.mark.skipif(not README.exists(), reason="runs from a source checkout only")


def _text() -> str:
    return README.read_text()


def _fenced_blocks(language: str | None = None) -> list[str]:
    """Fenced code blocks, of one ``language`` ("" for blocks without one) or all."""
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", _text(), flags=re.S | re.M)
    return [body for lang, body in blocks if language is None or lang == language]


def _inline_code() -> list[str]:
    prose = re.sub(r"^```.*?^```", "", _text(), flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def _commands(line: str) -> list[list[str]]:
    """A shell line as its commands joined by ``&&``, each split into words."""
    return [shlex.split(part) for part in line.strip().replace("\\\n", " ").split("&&")]


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", _text(), flags=re.S | re.M)
    assert match, f"the README has no section {title!r}"
    return match.group(1)


def _readme_test_command() -> list[list[str]]:
    candidates = [_commands(b) for b in _fenced_blocks("bash") if _commands(b)[-1] == ["pytest"]]
    assert len(candidates) == 1, "the README should have exactly one test command (a bash block ending in pytest)"
    return candidates[0]


# --------------------------------------------------------------------------------------------- commands


@pytest.mark.skipif(not (ROOT / ".ci" / "run").exists(), reason="runs from a source checkout only")
def test_ci_runs_exactly_the_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    ci_commands = [_commands(line) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert _readme_test_command() in ci_commands  # the whole line, word for word: no extra pytest options


def test_readme_run_command_installs_like_the_test_command_and_runs_utilgen():
    test = _readme_test_command()
    runs = [_commands(b) for b in _fenced_blocks("bash") if _commands(b)[-1][:3] == ["python", "-m", "utilgen.run"]]
    assert len(runs) == 1
    run = runs[0]
    assert run[-1] == ["python", "-m", "utilgen.run"]  # no arguments: the default experiment
    # the same venv and torch install; only the package's extra differs
    assert run[:-2] == test[:-2]
    assert [w for w in run[-2] if not w.startswith(".[")] == [w for w in test[-2] if not w.startswith(".[")]


def test_every_extra_the_readme_installs_exists():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = set(pyproject["project"]["optional-dependencies"])
    named = {e for group in re.findall(r"\.\[([\w,-]+)\]", _text()) for e in group.split(",")}
    assert named, "the README installs no extra"
    assert named <= extras, named - extras


def test_every_environment_switch_the_readme_names_is_read_by_the_build_or_the_code():
    sources = (ROOT / "pyproject.toml").read_text() + (ROOT / "CMakeLists.txt").read_text()
    sources += "".join(p.read_text() for p in (ROOT / "utilgen").rglob("*.py"))
    named = set(re.findall(r"\bUTILGEN_[A-Z_]+\b", _text()))
    assert named, "the README names no UTILGEN_ switch"
    assert {name for name in named if name not in sources} == set()


# --------------------------------------------------------------------------------------------- command line


def _help_flags() -> set[str]:
    """The flags of ``python -m utilgen.run`` and of every ``python -m utilgen.experiment`` study."""
    commands = [["utilgen.run"], *(["utilgen.experiment", study] for study in ("tokens", "mlco", "protocol"))]
    flags = set()
    for command in commands:
        result = subprocess.run(
            [sys.executable, "-m", *command, "--help"], capture_output=True, text=True, timeout=120, check=True
        )
        flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", result.stdout))
    return flags


def _readme_cli_flags() -> set[str]:
    """Flags in the README's ``python -m utilgen.run`` commands and in inline code made of flags."""
    lines = [line for block in _fenced_blocks() for line in block.replace("\\\n", " ").splitlines()]
    spans = lines + _inline_code()
    flags = set()
    for span in spans:
        if "utilgen.run" in span or "utilgen.experiment" in span:
            span = span[span.index("utilgen.") :]
        elif not span.startswith("--"):
            continue  # pip, pytest or anything else: not ours
        flags |= set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", span))
    return flags


def test_every_command_line_flag_the_readme_names_is_accepted():
    readme = _readme_cli_flags()
    assert {"--preset", "--set", "--resume"} <= readme  # the parser above found the commands
    assert readme - _help_flags() == set()


def test_every_preset_the_readme_names_exists_and_each_is_named():
    named = set()
    for choices in re.findall(r"--preset ([\w|-]+)", _text()):
        named |= set(choices.split("|"))
    assert named == set(config.PRESETS)


# --------------------------------------------------------------------------------------------- configuration


def _toml_blocks() -> list[dict]:
    """The README's TOML config examples (fenced blocks without a language that parse as sections)."""
    examples = []
    for block in _fenced_blocks(""):
        try:
            value = tomllib.loads(block)
        except tomllib.TOMLDecodeError:
            continue
        if value and all(isinstance(section, dict) for section in value.values()):
            examples.append(value)
    return examples


def _readme_overrides() -> list[str]:
    """Every ``--set key=value`` the README shows, but the syntax line's ``section.key=value``."""
    overrides = re.findall(r"--set ([\w.]+=[^\s`]+)", _text())
    return [o for o in overrides if not o.endswith("=value")]


def test_every_config_key_the_readme_names_exists():
    keys = set(config.valid_keys())
    sections = {key.split(".")[0] for key in keys}
    named = {override.split("=")[0] for override in _readme_overrides()}
    files = {"toml", "yaml", "yml", "json", "jsonl", "log", "py", "md", "png", "safetensors"}  # run.toml: a file
    dotted = [s for s in _inline_code() if re.fullmatch(r"[a-z_]+\.[a-z_]+", s) and s.split(".")[1] not in files]
    named |= {span for span in dotted if span.split(".")[0] in sections}
    examples = _toml_blocks()
    assert examples, "the README's run.toml example was not found"
    named |= {f"{section}.{key}" for example in examples for section, values in example.items() for key in values}
    assert named - keys == set()


def test_readme_config_examples_build_a_valid_config():
    """Values too: the run.toml example with the --set it is used with, and every --set the README shows."""
    overrides = _readme_overrides()
    assert overrides
    for example in _toml_blocks():
        config.build_config("default", example, overrides)
    for override in overrides:
        config.build_config("default", None, [override])


# --------------------------------------------------------------------------------------------- run directory


def _run_directory_table() -> list[tuple[list[str], str]]:
    """(entries, description) per row of the README's run-directory table; ``<x>`` placeholders become ``*``."""
    rows = []
    for line in _section("The run directory").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 2 or not cells[0].startswith("`"):
            continue
        entries = [re.sub(r"<[^>]+>", "*", e).rstrip("/") for e in re.findall(r"`([^`]+)`", cells[0])]
        rows.append((entries, cells[1]))
    assert rows, "the README's run-directory table was not found"
    return rows


def test_the_run_directory_table_is_what_a_smoke_run_writes(smoke_run):
    documented = set()
    for entries, description in _run_directory_table():
        documented |= {entry.split("/")[0] for entry in entries}
        if description.startswith("only "):  # e.g. the *.partial* files after a stopped stage
            assert not [p for e in entries for p in smoke_run.rglob(e)], entries
            continue
        for entry in entries:
            found = list(smoke_run.glob(entry))
            assert found, f"the README lists {entry} but the run wrote no such thing"
            for inner in re.findall(r"`([^`]+)`", description):
                inner = re.sub(r"<[^>]+>", "*", inner)
                if "/" not in inner and "." not in inner:  # a value of the entry's placeholder, e.g. a pool's name
                    assert list(smoke_run.glob(entry.replace("*", inner, 1))), (entry, inner)
                else:  # a file inside each entry
                    for directory in found:
                        assert list(directory.glob(inner)), f"{directory.relative_to(smoke_run)} has no {inner}"
    written = {p.name for p in smoke_run.iterdir()}
    undocumented = {name for name in written if not any(fnmatch.fnmatchcase(name, d) for d in documented)}
    assert undocumented == set(), "the run writes files the README's table does not list"


# --------------------------------------------------------------------------------------------- examples


def test_readme_python_example_runs():
    blocks = _fenced_blocks("python")
    assert blocks, "the README has no Python example"
    code = "\n".join(blocks) + (
        "\nassert images.shape == (8, 1, 16, 16) and 0 <= images.min() and images.max() <= 1"
        "\nassert utilities.shape == (8,) and 0 <= utilities.min() and utilities.max() <= 1\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
