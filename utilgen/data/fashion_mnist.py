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

CLASS_NAMES = (
    "t-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip

DEBIAN_DIR = Path(os.environ.get("UTILGEN_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class FashionMNISTUnavailable(FileNotFoundError):
    """The full Debian files are not installed."""


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or dims != expected_dims:
        raise ValueError(f"{path} is not an idx file of unsigned bytes with {expected_dims} dimensions")
    shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} is truncated: {array.size} bytes of data for shape {shape}")
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
    if len(images) != len(labels):
        raise ValueError(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels")
    return images, labels
