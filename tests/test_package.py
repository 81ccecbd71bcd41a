"""Package-level contracts: lean import, import direction, the command line, the extension."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import utilgen

PACKAGE_DIR = Path(utilgen.__file__).parent


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_import_utilgen_is_lean():
    result = _run_python(
        "import sys, utilgen; "
        "heavy = [m for m in ('torch', 'triton', 'diffusers', 'utilgen._C', 'utilgen.kernels') if m in sys.modules]; "
        "print(heavy)"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_import_ops_does_not_import_triton_or_initialise_cuda():
    result = _run_python("import sys, utilgen.ops, torch; print('triton' in sys.modules, torch.cuda.is_initialized())")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False False"


def test_help_does_not_import_torch():
    result = _run_python(
        "import sys; sys.argv = ['utilgen.run', '--help']\n"
        "import runpy\n"
        "try:\n    runpy.run_module('utilgen.run', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    assert result.returncode == 0, result.stderr
    assert "--info" in result.stdout
    assert result.stdout.strip().endswith("False")


def test_info_reports_extension_and_backends():
    result = subprocess.run(
        [sys.executable, "-m", "utilgen.run", "--info", "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["ops"]) == {"weighted_cross_entropy", "latent_update", "logit_hvp"}
    cpu = report["ops"]["weighted_cross_entropy"]["cpu"]
    assert cpu["backends"]["reference"] == "available"
    assert "CUDA tensors" in cpu["backends"]["cuda"]
    if report["extension"]["loaded"]:
        assert cpu["auto"] == "cpp"
    else:
        assert cpu["auto"] == "reference"
        assert report["extension"]["reason"]


def test_info_text_names_each_op_choice():
    result = subprocess.run(
        [sys.executable, "-m", "utilgen.run", "--info"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    for name in ("weighted_cross_entropy", "latent_update", "logit_hvp"):
        assert f"{name} [cpu, float32]: auto -> " in result.stdout
    assert "utilgen._C:" in result.stdout


@pytest.mark.skipif(os.environ.get("UTILGEN_REQUIRE_EXTENSION") != "1", reason="CI demands the extension")
def test_extension_is_built_and_loaded():
    from utilgen import _native

    module = _native.extension()
    assert module is not None, _native.extension_reason()
    assert module.openmp


# Layers from docs/design.md, "Layers": a module may import only its own layer or below.
LAYERS = {
    "_native": 0,
    "_describe": 0,
    "config": 0,
    "comparison": 0,
    "kernels": 0,
    "io": 0,
    "ops": 1,
    "rundir": 1,
    "data": 2,
    "models": 2,
    "generator": 3,
    "valuation": 3,
    "adaptation": 4,
    "loop": 5,
    "stages": 5,
    "stage_outputs": 5,
    "metrics": 5,
    "preflight": 5,
    "evaluate": 5,
    "report": 5,
    "judge": 5,
    "baselines": 5,
    "run": 6,
    "protocol": 6,
    "pretrain": 6,
    "experiment": 6,
}


def _layer_of(relative: Path) -> int | None:
    top = relative.parts[0].removesuffix(".py")
    return LAYERS.get(top)


def test_every_module_has_a_layer():
    tops = {path.relative_to(PACKAGE_DIR).parts[0].removesuffix(".py") for path in PACKAGE_DIR.rglob("*.py")}
    missing = sorted(top for top in tops - {"__init__", "__main__"} if top not in LAYERS)
    assert not missing, f"give these modules a layer in LAYERS (docs/design.md): {missing}"


def test_imports_point_downward():
    violations = []
    for path in PACKAGE_DIR.rglob("*.py"):
        relative = path.relative_to(PACKAGE_DIR)
        layer = _layer_of(relative)
        if layer is None:
            continue
        for name in _imported_modules(path):
            if not name.startswith("utilgen."):
                continue
            target = _layer_of(Path(name.split(".")[1]))
            if target is not None and target > layer:
                violations.append(f"{relative} (layer {layer}) imports {name} (layer {target})")
    assert not violations, "\n".join(violations)


def _imported_modules(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names.extend(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return names


def test_only_ops_touch_the_extension_and_kernels():
    private = ("utilgen._C", "utilgen.kernels", "utilgen._native")
    offenders = []
    for path in PACKAGE_DIR.rglob("*.py"):
        relative = path.relative_to(PACKAGE_DIR)
        if relative.parts[0] in ("ops", "kernels") or relative.name == "_native.py":
            continue
        for name in _imported_modules(path):
            if name.startswith(private):
                offenders.append(f"{relative} imports {name}")
    assert not offenders, offenders


_BLOCK_EXTENSION = "import sys; sys.modules['utilgen._C'] = None\n"  # makes `import utilgen._C` fail


def test_missing_extension_falls_back_with_a_reason():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            _BLOCK_EXTENSION + "from utilgen import _native, ops\n"
            "print(_native.extension() is None); print(_native.extension_reason()); "
            "print(ops.info()['ops']['weighted_cross_entropy']['cpu']['auto'])",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "UTILGEN_REQUIRE_EXTENSION": "0"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "True"
    assert "utilgen._C did not import" in lines[1]
    assert "pip install" in lines[1]
    assert lines[-1] == "reference"


def test_required_extension_missing_is_an_error():
    result = subprocess.run(
        [sys.executable, "-c", _BLOCK_EXTENSION + "from utilgen import _native\n_native.extension()"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "UTILGEN_REQUIRE_EXTENSION": "1"},
    )
    assert result.returncode != 0
    assert "UTILGEN_REQUIRE_EXTENSION=1 but utilgen._C did not import" in result.stderr


def test_licence_files_are_declared_and_present():
    """pyproject's PEP 639 licence files, which wheels and sdists carry: the Apache 2.0 text and the data's notice."""
    root = PACKAGE_DIR.parent
    if not (root / "pyproject.toml").exists():
        pytest.skip("runs from a source checkout only")
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert [name for name in project["license-files"] if not (root / name).is_file()] == []
    assert "LICENSE" in project["license-files"]
    # The unmodified text of https://www.apache.org/licenses/LICENSE-2.0.txt (Debian: common-licenses/Apache-2.0).
    digest = hashlib.sha256((root / "LICENSE").read_bytes()).hexdigest()
    assert digest == "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
    notice = PACKAGE_DIR / "data" / "assets" / "LICENSE-fashion-mnist.txt"  # the embedded subset's licence
    assert notice.relative_to(root).as_posix() in project["license-files"]
