"""Write the Fashion-MNIST subset shipped inside utilgen (``utilgen/data/assets/``).

Takes the first ``--per-class`` images of every class, in file order, from the
Debian package's *test* file (``dataset-fashion-mnist``,
``/usr/share/datasets/fashion-mnist/``). File order rather than a random draw:
the choice is then reproducible without depending on a random generator's
stream staying the same across numpy versions (the test file is already in a
shuffled order). The embedded generator is pretrained on the *train* file, so
the default task's images (drawn from this subset) are never seen by it.

Outputs:
  fashion_mnist_subset.npz       np.savez_compressed: images uint8 (N, 28, 28),
                                 labels uint8 (N,), indices int32 (N,) into the test file
  LICENSE-fashion-mnist.txt      the MIT notice (Zalando SE) and where the data came from

Usage: python scripts/make_fashion_mnist_subset.py [--per-class 300] [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from utilgen.data.fashion_mnist import CLASS_NAMES, DEBIAN_DIR, load_debian
from utilgen.io import atomic_write_bytes, atomic_write_text

ASSETS = Path(__file__).resolve().parents[1] / "utilgen" / "data" / "assets"

LICENSE = """\
Fashion-MNIST subset shipped with utilgen
=========================================

fashion_mnist_subset.npz holds {count} images ({per_class} per class, the first of
each class in file order) of the Fashion-MNIST *test* set, with their labels and
their indices in that file. It was written by scripts/make_fashion_mnist_subset.py
from the Debian package `dataset-fashion-mnist` (t10k-images-idx3-ubyte.gz,
t10k-labels-idx1-ubyte.gz). The images are unchanged (28x28, 8-bit grayscale).

Source: https://github.com/zalandoresearch/fashion-mnist
Paper:  Han Xiao, Kashif Rasul, Roland Vollgraf. Fashion-MNIST: a Novel Image
        Dataset for Benchmarking Machine Learning Algorithms. arXiv:1708.07747, 2017.

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """(K * per_class,) ascending indices: the first ``per_class`` images of each class in file order."""
    chosen = []
    for label in range(len(CLASS_NAMES)):
        of_class = np.flatnonzero(labels == label)
        if len(of_class) < per_class:
            raise SystemExit(f"class {label} ({CLASS_NAMES[label]}) has {len(of_class)} images, asked for {per_class}")
        chosen.append(of_class[:per_class])
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR, help="folder with the Debian idx .gz files")
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()

    images, labels = load_debian("test", args.source)  # (10000, 28, 28) uint8, (10000,) int64
    indices = first_per_class(labels, args.per_class)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, images=images[indices], labels=labels[indices].astype(np.uint8), indices=indices.astype(np.int32)
    )
    npz = atomic_write_bytes(args.out / "fashion_mnist_subset.npz", buffer.getvalue())
    atomic_write_text(
        args.out / "LICENSE-fashion-mnist.txt", LICENSE.format(count=len(indices), per_class=args.per_class)
    )
    print(f"wrote {npz} ({npz.stat().st_size / 1e6:.2f} MB, {len(indices)} images) and the licence notice")


if __name__ == "__main__":
    main()
