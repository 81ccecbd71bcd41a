"""Fashion-MNIST (Zalando, MIT licence): the Debian files and the subset shipped with utilgen.

- ``load_debian(split)`` reads the full idx files of the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist/``): 60k
  train, 10k test, 28x28 uint8. The embedded generator is pretrained on the
  *train* file, so it never sees an image of the default task.
- The default task draws its few-shot, meta and test images from the subset
  of the *test* file shipped inside the package (``assets/``).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from utilgen.data.images import LabelledImages, resize_uint8, uint8_to_tensor

CLASS_NAMES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# The coarse knowledge of the default generator (docs/method.md, "The regime"): it was trained on
# these three groups only, so it knows "footwear", not "sandal" vs "sneaker", as Stable Diffusion knows
# "aircraft" and not the variant. Each fine class's token starts from its group's token.
COARSE_GROUPS = {
    "tops": ("t-shirt/top", "pullover", "coat", "shirt"),
    "footwear": ("sandal", "sneaker", "ankle boot"),
    "other": ("trouser", "dress", "bag"),
}
COARSE_NAMES = tuple(COARSE_GROUPS)
PARENT = {fine: group for group, members in COARSE_GROUPS.items() for fine in members}
COARSE_OF = np.array([COARSE_NAMES.index(PARENT[name]) for name in CLASS_NAMES], dtype=np.int64)  # fine -> coarse

# The validation set: the first 600 images of each class of the Debian *train* file, in file order. The
# default (coarse) generator was trained without them and no test read touches them: settings are tuned here.
VALIDATION_PER_CLASS = 600

DEBIAN_DIR = Path(os.environ.get("UTILGEN_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_FILE = ASSETS_DIR / "fashion_mnist_subset.npz"  # written by scripts/make_fashion_mnist_subset.py
VALIDATION_FILE = ASSETS_DIR / "fashion_mnist_validation.npz"  # likewise
LICENSE_FILE = ASSETS_DIR / "LICENSE-fashion-mnist.txt"


class FashionMNISTUnavailable(FileNotFoundError):
    """The full Debian files are not installed."""


_REINSTALL = "reinstall the Debian package `dataset-fashion-mnist` (apt-get install --reinstall dataset-fashion-mnist)"


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Decode a gzipped idx file of unsigned bytes; damaged files raise ValueError naming the file and the fix."""
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except (EOFError, OSError) as error:  # a cut-off download ends the gzip stream early (EOFError)
        raise ValueError(f"{path} is not a readable gzip file ({error}); {_REINSTALL}") from error
    if len(data) < 4 or len(data) < 4 + 4 * data[3]:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its idx header; {_REINSTALL}")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise ValueError(f"{path} is not an idx file of unsigned bytes with {expected_dims} dimensions")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} bytes of data for shape {shape}; {_REINSTALL}")
    return array.reshape(shape)


def load_debian(split: str, directory: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 28, 28) uint8, labels (N,) int64) of the full ``split`` ("train" or "test")."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(directory) if directory is not None else DEBIAN_DIR
    image_file, label_file = (directory / name for name in _FILES[split])
    missing = [str(p) for p in (image_file, label_file) if not p.exists()]
    if missing:
        raise FashionMNISTUnavailable(
            f"the full Fashion-MNIST files are missing ({', '.join(missing)}); install the Debian package "
            "`dataset-fashion-mnist` (apt-get install dataset-fashion-mnist) or point "
            "UTILGEN_FASHION_MNIST_DIR at a folder with the four idx .gz files"
        )
    images = _read_idx(image_file, 3)
    labels = _read_idx(label_file, 1).astype(np.int64)
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ValueError(f"{label_file} has label {labels.max()}, Fashion-MNIST has {len(CLASS_NAMES)} classes")
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    return images, labels


def load_debian_images(split: str, image_size: int = 16, directory: Path | None = None) -> LabelledImages:
    """The full Debian ``split`` as ``LabelledImages``: images (N, 1, image_size, image_size) float32 in [0, 1].

    Raises ``FashionMNISTUnavailable`` (naming the Debian package) when the files are absent.
    """
    images, labels = load_debian(split, directory)  # (N, 28, 28) uint8, (N,) int64
    return LabelledImages(
        images=uint8_to_tensor(resize_uint8(images, image_size)),
        labels=torch.from_numpy(labels),
        class_names=CLASS_NAMES,
        sources=tuple(f"fashion-mnist:{split}:{i}" for i in range(len(labels))),
    )


def load_embedded(image_size: int = 16) -> LabelledImages:
    """The subset shipped with utilgen (300 test-file images per class), resized: the default task's data.

    Returns images (3000, 1, image_size, image_size) float32 in [0, 1], labels (3000,) int64,
    ``sources`` = "fashion-mnist:test:<index in the Debian test file>". Needs no Debian package.
    """
    return _load_shipped(EMBEDDED_FILE, "test", image_size)


def load_validation(image_size: int = 16) -> LabelledImages:
    """The validation set shipped with utilgen: the first 600 train-file images of each class, which the
    default (coarse) generator was trained without. Settings are tuned on it (``data.source=validation``),
    never on the test subset. ``sources`` = "fashion-mnist:train:<index in the Debian train file>"."""
    return _load_shipped(VALIDATION_FILE, "train", image_size)


def _load_shipped(path: Path, split: str, image_size: int) -> LabelledImages:
    if not path.exists():
        raise FileNotFoundError(
            f"the shipped Fashion-MNIST file {path} is missing from this install; reinstall utilgen "
            "or regenerate it with scripts/make_fashion_mnist_subset.py"
        )
    with np.load(path, allow_pickle=False) as archive:
        images = archive["images"]  # (N, 28, 28) uint8
        labels = archive["labels"].astype(np.int64)  # (N,)
        indices = archive["indices"]  # (N,) int32 into the Debian file
    return LabelledImages(
        images=uint8_to_tensor(resize_uint8(images, image_size)),
        labels=torch.from_numpy(labels),
        class_names=CLASS_NAMES,
        sources=tuple(f"fashion-mnist:{split}:{int(i)}" for i in indices),
    )


def validation_indices(labels: np.ndarray, per_class: int = VALIDATION_PER_CLASS) -> np.ndarray:
    """Positions (ascending) of the first ``per_class`` images of each class in ``labels`` (file order)."""
    chosen = [np.flatnonzero(labels == k)[:per_class] for k in range(len(CLASS_NAMES))]
    return np.sort(np.concatenate(chosen))
