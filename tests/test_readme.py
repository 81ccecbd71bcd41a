"""The README's test command is what CI runs (.ci/run), word for word."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks]


@pytest.mark.skipif(not (ROOT / ".ci" / "run").exists(), reason="runs from a source checkout only")
def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in _readme_commands() if c.endswith("&& pytest"))
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


@pytest.mark.skipif(not (ROOT / "README.md").exists(), reason="runs from a source checkout only")
def test_readme_run_command_runs_utilgen():
    assert any("python -m utilgen.run" in c and c.startswith("python3 -m venv") for c in _readme_commands())


@pytest.mark.skipif(not (ROOT / "README.md").exists(), reason="runs from a source checkout only")
def test_readme_python_example_runs():
    import subprocess
    import sys

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    assert blocks, "the README has no Python example"
    code = "\n".join(blocks) + (
        "\nassert images.shape == (8, 1, 16, 16) and 0 <= images.min() and images.max() <= 1"
        "\nassert utilities.shape == (8,) and 0 <= utilities.min() and utilities.max() <= 1\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
