"""Real-data splits: few-shot train (D_r), class-balanced meta set (D_v), held-out test.

Per class k, the images of k are shuffled by their own generator
``numpy.random.default_rng([seed, k])`` (never the global RNG), then cut:

    fixed test size:  [ test | meta | train | unused ]
    test=None:        [ meta | train | test = all the rest ]

So with a fixed test size, the test and meta images of a seed do not depend on
the number of shots, and a larger ``shots_per_class`` gives a superset of the
smaller train split: experiments that vary shots are evaluated on the same
images. ``save_splits`` records the indices (into the source dataset), the
class list and the sources, so a resumed run rebuilds identical splits with
``splits_from_indices`` and notices if the data changed underneath.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from utilgen.data.images import LabelledImages, tensor_to_uint8
from utilgen.io import atomic_write_json

SPLIT_NAMES = ("train", "meta", "test")
_FORMAT = "utilgen.splits/1"


@dataclass(frozen=True, eq=False)
class Splits:
    """train (D_r), meta (D_v), test: disjoint; ``indices[name]`` = positions in the source dataset, ascending."""

    train: LabelledImages
    meta: LabelledImages
    test: LabelledImages
    indices: dict[str, list[int]]
    seed: int | None = None

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.train.class_names


def make_splits(
    data: LabelledImages, *, shots_per_class: int, meta_per_class: int, test_per_class: int | None, seed: int
) -> Splits:
    """Class-balanced, disjoint, deterministic splits of ``data``.

    test_per_class=None puts every image not in train or meta into test (at least one per class).
    A class with too few images raises ValueError naming each such class, its count and what is needed.
    """
    if shots_per_class < 1 or meta_per_class < 0 or (test_per_class is not None and test_per_class < 1):
        raise ValueError(
            f"need shots_per_class >= 1, meta_per_class >= 0, test_per_class >= 1 or None; got "
            f"{shots_per_class}, {meta_per_class}, {test_per_class}"
        )
    needed = shots_per_class + meta_per_class + (test_per_class if test_per_class is not None else 1)
    counts = data.class_counts()
    short = [(name, count) for name, count in zip(data.class_names, counts, strict=True) if count < needed]
    if short:
        listed = ", ".join(f"{name!r} has {count}" for name, count in short)
        test_part = f"{test_per_class} test" if test_per_class is not None else "at least 1 test"
        raise ValueError(
            f"too few images: {listed}; each class needs {needed} "
            f"({shots_per_class} shots + {meta_per_class} meta + {test_part}). "
            "Add images to these classes or lower shots_per_class / meta_per_class / test_per_class."
        )

    chosen: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    labels = data.labels.numpy()
    for label in range(data.num_classes):
        of_class = np.flatnonzero(labels == label)  # ascending, so the shuffle is a function of (seed, label, data)
        order = of_class[np.random.default_rng([seed, label]).permutation(len(of_class))]
        if test_per_class is not None:
            test, rest = order[:test_per_class], order[test_per_class:]
            meta, train = rest[:meta_per_class], rest[meta_per_class : meta_per_class + shots_per_class]
        else:
            meta, train = order[:meta_per_class], order[meta_per_class : meta_per_class + shots_per_class]
            test = order[meta_per_class + shots_per_class :]
        for name, part in zip(SPLIT_NAMES, (train, meta, test), strict=True):
            chosen[name].append(part)

    indices = {name: sorted(int(i) for part in chosen[name] for i in part) for name in SPLIT_NAMES}
    return _build(data, indices, seed)


def save_splits(splits: Splits, path: str | os.PathLike) -> Path:
    """Write the split indices, class list and sources as JSON (atomically)."""
    value = {
        "format": _FORMAT,
        "class_names": list(splits.class_names),
        "seed": splits.seed,
        "indices": {name: list(splits.indices[name]) for name in SPLIT_NAMES},
        "class_counts": {name: getattr(splits, name).class_counts() for name in SPLIT_NAMES},
        "sources": {
            name: list(getattr(splits, name).sources) if getattr(splits, name).sources is not None else None
            for name in SPLIT_NAMES
        },
        "image_digests": {name: image_digests(getattr(splits, name)) for name in SPLIT_NAMES},
    }
    return atomic_write_json(path, value)


def image_digests(images: LabelledImages) -> list[str]:
    """A short SHA-256 of each image's 8-bit pixels and label, as the run sees them (after decoding and
    resizing): a resume checks them, so data changed under the same file names is noticed, not used."""
    pixels = tensor_to_uint8(images.images)
    return [
        hashlib.sha256(pixels[i].tobytes() + label.to_bytes(8, "little")).hexdigest()[:16]
        for i, label in enumerate(images.labels.tolist())
    ]


def load_split_indices(path: str | os.PathLike) -> dict:
    """The JSON written by ``save_splits``: {"class_names", "seed", "indices": {train, meta, test}, ...}."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"split file {path} does not exist") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"split file {path} is not valid JSON: {error}") from error
    if value.get("format") != _FORMAT or not isinstance(value.get("indices"), dict):
        raise ValueError(f"{path} is not a utilgen split file (format {value.get('format')!r}, expected {_FORMAT!r})")
    missing = [name for name in SPLIT_NAMES if name not in value["indices"]]
    if missing:
        raise ValueError(f"split file {path} lacks the splits {missing}")
    return value


def splits_from_indices(data: LabelledImages, saved: dict) -> Splits:
    """Rebuild the splits saved by ``save_splits`` (as returned by ``load_split_indices``) from ``data``.

    Raises ValueError when ``data`` is not the dataset the splits were made from: a different class
    list, indices out of range, or (when both sides know them) different sources.
    """
    if tuple(saved["class_names"]) != data.class_names:
        raise ValueError(
            f"the saved splits were made for classes {saved['class_names']}, the data has {list(data.class_names)}"
        )
    indices = {name: [int(i) for i in saved["indices"][name]] for name in SPLIT_NAMES}
    out_of_range = [i for name in SPLIT_NAMES for i in indices[name] if not 0 <= i < len(data)]
    if out_of_range:
        raise ValueError(f"saved split indices {out_of_range[:10]} are out of range for {len(data)} images")
    splits = _build(data, indices, saved.get("seed"))
    saved_sources = saved.get("sources") or {}
    for name in SPLIT_NAMES:
        expected, actual = saved_sources.get(name), getattr(splits, name).sources
        if expected is not None and actual is not None and list(actual) != list(expected):
            changed = [(e, a) for e, a in zip(expected, actual, strict=False) if e != a][:5]
            raise ValueError(f"the {name} split now holds different images than when saved (saved vs now: {changed})")
    _check_contents(splits, saved.get("image_digests"))
    return splits


def _check_contents(splits: Splits, saved_digests: dict | None) -> None:
    """The images behind the saved indices still have the pixels and labels they had (when the file records them)."""
    if saved_digests is None:  # written before digests were recorded
        return
    for name in SPLIT_NAMES:
        part = getattr(splits, name)
        changed = [i for i, (a, b) in enumerate(zip(image_digests(part), saved_digests[name], strict=True)) if a != b]
        if changed:
            sources = part.sources or [f"image {index}" for index in splits.indices[name]]
            where = [sources[i] for i in changed]
            raise ValueError(
                f"the data changed since the run split it: {len(changed)} of {len(part)} {name} images now have "
                f"other pixels or labels, e.g. {', '.join(map(str, where[:3]))}. Results on them would not be the "
                "run's: restore the data the run used, or start a new run with --out"
            )


def _build(data: LabelledImages, indices: dict[str, list[int]], seed: int | None) -> Splits:
    seen: set[int] = set()
    for name in SPLIT_NAMES:
        overlap = seen.intersection(indices[name])
        if overlap:
            raise ValueError(f"split {name} overlaps an earlier split at indices {sorted(overlap)[:10]}")
        seen.update(indices[name])
    parts = {name: data.subset(indices[name]) for name in SPLIT_NAMES}
    return Splits(train=parts["train"], meta=parts["meta"], test=parts["test"], indices=indices, seed=seed)
