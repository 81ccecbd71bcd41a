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
  fashion_mnist_validation.npz   the validation set, the same fields: the first 600 images of
                                 each class of the *train* file, which the default (coarse)
                                 generator was trained without (``python -m utilgen.pretrain``
                                 leaves them out)
  LICENSE-fashion-mnist.txt      the MIT notice (Zalando SE) and where the data came from

Usage: python scripts/make_fashion_mnist_subset.py [--per-class 300] [--validation-per-class 600]
       [--source DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np

from utilgen.data.fashion_mnist import CLASS_NAMES, DEBIAN_DIR, VALIDATION_PER_CLASS, load_debian, validation_indices
from utilgen.io import atomic_write_bytes, atomic_write_text

ASSETS = Path(__file__).resolve().parents[1] / "utilgen" / "data" / "assets"

LICENSE = """\
Fashion-MNIST subset shipped with utilgen
=========================================

fashion_mnist_subset.npz holds {count} images ({per_class} per class, the first of
each class in file order) of the Fashion-MNIST *test* set, with their labels and
their indices in that file. fashion_mnist_validation.npz holds {validation_count}
images ({validation_per_class} per class, the first of each class in file order) of
the Fashion-MNIST *training* set, likewise. Both were written by
scripts/make_fashion_mnist_subset.py from the Debian package `dataset-fashion-mnist`
(t10k-*.gz and train-*.gz). The images are unchanged (28x28, 8-bit grayscale).

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=300)
    parser.add_argument("--validation-per-class", type=int, default=VALIDATION_PER_CLASS)
    parser.add_argument("--source", type=Path, default=DEBIAN_DIR, help="folder with the Debian idx .gz files")
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args()

    counts = {}
    for split, name, per_class in (
        ("test", "fashion_mnist_subset.npz", args.per_class),
        ("train", "fashion_mnist_validation.npz", args.validation_per_class),
    ):
        images, labels = load_debian(split, args.source)  # (N, 28, 28) uint8, (N,) int64
        indices = validation_indices(labels, per_class)  # the first per_class of each class, in file order
        if len(indices) != per_class * len(CLASS_NAMES):
            raise SystemExit(f"the {split} file has fewer than {per_class} images of some class")
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, images=images[indices], labels=labels[indices].astype(np.uint8), indices=indices.astype(np.int32)
        )
        npz = atomic_write_bytes(args.out / name, buffer.getvalue())
        counts[split] = len(indices)
        print(f"wrote {npz} ({npz.stat().st_size / 1e6:.2f} MB, {len(indices)} images of the {split} file)")
    notice = LICENSE.format(
        count=counts["test"],
        per_class=args.per_class,
        validation_count=counts["train"],
        validation_per_class=args.validation_per_class,
    )
    atomic_write_text(args.out / "LICENSE-fashion-mnist.txt", notice)


if __name__ == "__main__":
    main()
