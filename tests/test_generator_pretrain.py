"""``python -m utilgen.pretrain`` end to end on the tiny config (subprocess), and the package boundaries."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from utilgen.data.fashion_mnist import DEBIAN_DIR


def test_importing_the_generators_does_not_import_diffusers_or_transformers():
    code = (
        "import sys, utilgen.generator, utilgen.generator.stable_diffusion; "
        "print([m for m in ('diffusers', 'transformers') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(
    not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").exists(), reason="Debian Fashion-MNIST files absent"
)
def test_pretrain_smoke_run_writes_loadable_verified_weights(tmp_path):
    out = tmp_path / "weights"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "utilgen.pretrain",
            "--tiny",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--evaluate",
            "--eval-samples",
            "10",
            "--probe-steps",
            "2",
            "--sampling-steps",
            "2",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["steps"] == 2
    assert report["config"] == "tiny"
    assert 0 <= report["evaluation"]["probe_accuracy_on_samples"] <= 1
    assert report["evaluation"]["sampling_images_per_s"] > 0

    from utilgen.generator import load_weights

    generator = load_weights(out)
    images = generator.sample(generator.class_prompt_embeds([0, 1]), generator.initial_noise([0, 1]), steps=2)
    assert images.shape == (2, 1, 8, 8)


def test_info_reports_the_generator_attention():
    result = subprocess.run(
        [sys.executable, "-m", "utilgen.run", "--info", "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["generator"]["attention"]
    assert report["auto"] in ("sdpa", "xformers")
    assert report["reason"].startswith("auto: ")
