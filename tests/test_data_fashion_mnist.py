"""Fashion-MNIST: the embedded subset, the Debian files (skipped when absent) and fake idx files."""

from __future__ import annotations

import gzip
import runpy
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utilgen.data import fashion_mnist
from utilgen.data.fashion_mnist import CLASS_NAMES, FashionMNISTUnavailable, load_debian, load_embedded

REPO = Path(__file__).resolve().parents[1]
DEBIAN_PRESENT = all(
    (fashion_mnist.DEBIAN_DIR / name).exists() for pair in fashion_mnist._FILES.values() for name in pair
)
needs_debian = pytest.mark.skipif(not DEBIAN_PRESENT, reason="Debian package dataset-fashion-mnist not installed")


def _idx_bytes(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_fake_split(directory: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    image_name, label_name = fashion_mnist._FILES[split]
    (directory / image_name).write_bytes(gzip.compress(_idx_bytes(images)))
    (directory / label_name).write_bytes(gzip.compress(_idx_bytes(labels.astype(np.uint8))))


@pytest.fixture
def fake_debian(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.tile(np.arange(10), 4)  # 4 per class
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    _write_fake_split(tmp_path, "test", images, labels)
    _write_fake_split(tmp_path, "train", images[:20], labels[:20])
    return tmp_path, images, labels


def test_embedded_subset_shape_range_balance():
    data = load_embedded()
    assert data.images.shape == (3000, 1, 16, 16)
    assert data.images.dtype == torch.float32
    assert 0.0 <= float(data.images.min())
    assert float(data.images.max()) <= 1.0
    assert float(data.images.max()) > 0.9
    assert float(data.images.std()) > 0.1
    assert data.class_counts() == [300] * 10
    assert data.class_names == CLASS_NAMES
    indices = [int(s.split(":")[-1]) for s in data.sources]
    assert all(s.startswith("fashion-mnist:test:") for s in data.sources)
    assert len(set(indices)) == 3000
    assert max(indices) < 10000


def test_embedded_subset_native_size_is_the_stored_pixels():
    data = load_embedded(image_size=28)
    with np.load(fashion_mnist.EMBEDDED_FILE, allow_pickle=False) as archive:
        stored = archive["images"]
    assert data.images.shape == (3000, 1, 28, 28)
    assert np.array_equal((data.images[:, 0] * 255).round().to(torch.uint8).numpy(), stored)


def test_licence_notice_ships_with_the_subset():
    text = fashion_mnist.LICENSE_FILE.read_text()
    assert "MIT License" in text
    assert "Zalando SE" in text
    assert "github.com/zalandoresearch/fashion-mnist" in text
    assert "Permission is hereby granted" in text
    assert "3000 images" in text
    assert fashion_mnist.EMBEDDED_FILE.stat().st_size < 1.5e6


@needs_debian
def test_embedded_subset_equals_the_debian_test_images():
    images, labels = load_debian("test")
    with np.load(fashion_mnist.EMBEDDED_FILE, allow_pickle=False) as archive:
        indices, stored, stored_labels = archive["indices"], archive["images"], archive["labels"]
    assert np.array_equal(images[indices], stored)
    assert np.array_equal(labels[indices], stored_labels)


@needs_debian
def test_debian_files_load():
    images, labels = load_debian("test")
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [1000] * 10


def test_fake_debian_directory(fake_debian):
    directory, images, labels = fake_debian
    got_images, got_labels = load_debian("test", directory)
    assert np.array_equal(got_images, images)
    assert np.array_equal(got_labels, labels)
    data = fashion_mnist.load_debian_images("train", image_size=8, directory=directory)
    assert data.images.shape == (20, 1, 8, 8)
    assert data.sources[3] == "fashion-mnist:train:3"


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(FashionMNISTUnavailable, match="dataset-fashion-mnist") as info:
        load_debian("train", tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(info.value)


def test_truncated_idx_file_is_a_clear_error(fake_debian):
    directory, _, _ = fake_debian
    image_file = directory / fashion_mnist._FILES["test"][0]
    payload = gzip.decompress(image_file.read_bytes())
    image_file.write_bytes(gzip.compress(payload[: len(payload) - 100]))  # valid gzip, short idx payload
    with pytest.raises(ValueError, match=r"truncated.*dataset-fashion-mnist"):
        load_debian("test", directory)
    image_file.write_bytes(gzip.compress(payload)[:500])  # a download cut off mid gzip stream
    with pytest.raises(ValueError, match=r"not a readable gzip file.*dataset-fashion-mnist"):
        load_debian("test", directory)


def test_subset_script_writes_a_loadable_asset(fake_debian, tmp_path, monkeypatch):
    directory, images, labels = fake_debian
    out = tmp_path / "assets"
    script = REPO / "scripts" / "make_fashion_mnist_subset.py"
    argv = [str(script), "--per-class", "2", "--validation-per-class", "1", "--source", str(directory)]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])
    runpy.run_path(str(script), run_name="__main__")
    with np.load(out / "fashion_mnist_subset.npz", allow_pickle=False) as archive:
        chosen, stored, stored_labels = archive["indices"], archive["images"], archive["labels"]
    assert chosen.tolist() == list(range(20))  # the first 2 of each class in file order: indices 0..19
    assert np.array_equal(stored, images[chosen])
    assert np.array_equal(stored_labels, labels[chosen])
    with np.load(out / "fashion_mnist_validation.npz", allow_pickle=False) as archive:
        assert archive["indices"].tolist() == list(range(10))  # the train file's first image of each class
        assert np.array_equal(archive["images"], images[:10])
    notice = (out / "LICENSE-fashion-mnist.txt").read_text()
    assert "20 images (2 per class" in notice
    assert "10\nimages (1 per class" in notice or "10 images (1 per class" in notice.replace("\n", " ")


def test_validation_set_is_the_first_600_train_images_of_each_class():
    data = fashion_mnist.load_validation(16)
    assert data.class_counts() == [600] * 10
    assert all(source.startswith("fashion-mnist:train:") for source in data.sources)
    indices = [int(source.rsplit(":", 1)[1]) for source in data.sources]
    assert indices == sorted(indices)
    test = set(fashion_mnist.load_embedded(16).sources)
    assert not test & set(data.sources)  # another file altogether: nothing shared with the task's images


@needs_debian
def test_validation_set_equals_the_debian_train_images():
    images, labels = load_debian("train")
    chosen = fashion_mnist.validation_indices(labels)
    assert len(chosen) == 6000
    data = fashion_mnist.load_validation(28)
    assert np.array_equal((data.images[:, 0].numpy() * 255).round().astype(np.uint8), images[chosen])
    for k in range(10):  # the first 600 of each class in file order
        assert chosen[labels[chosen] == k].tolist() == np.flatnonzero(labels == k)[:600].tolist()


def test_coarse_groups_cover_every_class_once():
    members = [name for group in fashion_mnist.COARSE_GROUPS.values() for name in group]
    assert sorted(members) == sorted(CLASS_NAMES)
    assert fashion_mnist.COARSE_OF.tolist() == [0, 2, 0, 2, 0, 1, 0, 1, 2, 1]
