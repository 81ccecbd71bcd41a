"""Real and synthetic data: loaders, splits and the synthetic pool (layer 2: imports io, ops, torch, numpy, Pillow).

- ``LabelledImages``: images (N, C, H, W) float32 in [0, 1], labels (N,) int64, the frozen class list.
- Fashion-MNIST: ``load_embedded`` (the subset shipped in the package, the default task),
  ``load_debian`` / ``load_debian_images`` (the full Debian files, when installed).
- ``load_image_folder``: root/<class>/<image> folders, with an ``ImageFolderReport``.
- ``make_splits`` / ``save_splits`` / ``load_split_indices`` / ``splits_from_indices``: few-shot
  train, meta (D_v) and test splits, deterministic per seed.
- ``SyntheticPool``: generated images with seed, round, stage, utility, prompt embedding and noise,
  saved atomically as an ImageFolder tree plus metadata.jsonl.
"""

from utilgen.data.fashion_mnist import (
    CLASS_NAMES as FASHION_MNIST_CLASSES,
)
from utilgen.data.fashion_mnist import (
    FashionMNISTUnavailable,
    load_debian,
    load_debian_images,
    load_embedded,
)
from utilgen.data.image_folder import ImageFolderError, ImageFolderReport, load_image_folder
from utilgen.data.images import LabelledImages, resize_images, resize_uint8
from utilgen.data.pool import SyntheticPool, SyntheticPoolError
from utilgen.data.splits import Splits, load_split_indices, make_splits, save_splits, splits_from_indices

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FashionMNISTUnavailable",
    "ImageFolderError",
    "ImageFolderReport",
    "LabelledImages",
    "Splits",
    "SyntheticPool",
    "SyntheticPoolError",
    "load_debian",
    "load_debian_images",
    "load_embedded",
    "load_image_folder",
    "load_split_indices",
    "make_splits",
    "resize_images",
    "resize_uint8",
    "save_splits",
    "splits_from_indices",
]
