"""The synthetic pool D_g: generated images and everything needed to remake, value and audit each one.

On disk (``SyntheticPool.save``)::

    <dir>/images/<k>_<safe class name>/<index>-r<round>-<stage>-s<seed>.png   8-bit PNG, an ImageFolder tree
    <dir>/tensors.safetensors   prompt_embeds (N, L, D), noises (N, C', H', W') when present;
                                header metadata: format, class list, count, image shape
    <dir>/metadata.jsonl        one row per image, in pool order:
                                file, label, class_name, seed, round, stage, utility (null = not valued)

The class folders are numbered with zero padding, so their sorted order is
label order and ``load_image_folder`` reads the tree with the same labels.
Class names longer than 100 characters are cut in the folder name and get a
hash of the full name (a file name holds at most 255 bytes); ``metadata.jsonl``
and the header keep the full name.

Atomicity: the pool is written into a hidden sibling folder, every file through
``utilgen.io`` (temp file + fsync + rename), ``metadata.jsonl`` last; only then
is the folder renamed into place (a previous pool there is moved aside first and
deleted after). A save that fails or is killed therefore never leaves a
``<dir>`` that looks complete, and never damages the complete pool it replaces.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor

from utilgen._describe import describe
from utilgen.data.images import LabelledImages, subset_index, tensor_to_uint8, uint8_to_tensor
from utilgen.io import atomic_write_bytes, atomic_write_jsonl, safetensors_bytes

METADATA_FILE = "metadata.jsonl"
TENSORS_FILE = "tensors.safetensors"
IMAGES_DIR = "images"
_FORMAT = "utilgen.synthetic_pool/1"
_MODES = {1: "L", 3: "RGB"}
_STAGE_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # stages become part of file names
_ROW_FIELDS = ("file", "label", "class_name", "seed", "round", "stage", "utility")
# A class folder name is "<k>_<name>" and must fit the 255-byte limit of a file name: names longer
# than this are cut and get a hash of the full name (which stays in metadata.jsonl and the header).
_MAX_FOLDER_CLASS_CHARS = 100


class SyntheticPoolError(ValueError):
    """A pool directory is incomplete or its files disagree with each other."""


@dataclass(eq=False)
class SyntheticPool:
    """N synthetic images with their provenance and utility.

    images: (N, C, H, W) float32 in [0, 1], C in {1, 3}
    labels: (N,) int64 in [0, K)
    class_names: (K,) index = label
    seeds: (N,) int64, the sampler seed of each image (its identity across processes)
    rounds: (N,) int64, the UtilGen round that produced it (0 = the first pool D_g0)
    stages: N strings, e.g. "initial", "mlco", "ilpo" (letters, digits, "_", "-")
    utilities: (N,) float32, NaN = not valued yet
    prompt_embeds: (N, L, D) or None, the conditioning that made each image
    noises: (N, C', H', W') or None, the initial latent noise
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    seeds: Tensor
    rounds: Tensor
    stages: list[str]
    utilities: Tensor
    prompt_embeds: Tensor | None = None
    noises: Tensor | None = None

    def __post_init__(self) -> None:
        self.class_names = tuple(self.class_names)
        self.stages = list(self.stages)
        self.validate()

    @classmethod
    def create(
        cls,
        images: Tensor,
        labels: Tensor,
        class_names: Sequence[str],
        seeds: Tensor,
        *,
        round: int,
        stage: str,
        prompt_embeds: Tensor | None = None,
        noises: Tensor | None = None,
    ) -> SyntheticPool:
        """A freshly generated batch: one round and stage for all, utilities not valued yet (NaN)."""
        n = images.shape[0]
        return cls(
            images=images,
            labels=labels,
            class_names=tuple(class_names),
            seeds=seeds,
            rounds=torch.full((n,), round, dtype=torch.int64),
            stages=[stage] * n,
            utilities=torch.full((n,), math.nan, dtype=torch.float32),
            prompt_embeds=prompt_embeds,
            noises=noises,
        )

    def validate(self) -> None:
        """Raise ValueError on inconsistent shapes, dtypes, labels, image range or stage names."""
        images = self.images
        if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype != torch.float32:
            raise ValueError(f"images must be float32 (N, C, H, W), got {describe(images)}")
        n = images.shape[0]
        if images.shape[1] not in _MODES:
            raise ValueError(f"images must have 1 or 3 channels (saved as 8-bit L or RGB PNG), got {images.shape[1]}")
        for name, dtype in (
            ("labels", torch.int64),
            ("seeds", torch.int64),
            ("rounds", torch.int64),
            ("utilities", torch.float32),
        ):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.shape != (n,) or value.dtype != dtype:
                raise ValueError(f"{name} must be {dtype} of shape ({n},), got {describe(value)}")
        for name in ("prompt_embeds", "noises"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] != n):
                raise ValueError(f"{name} must be None or a tensor with {n} rows, got {describe(value)}")
        if len(self.stages) != n:
            raise ValueError(f"{len(self.stages)} stages for {n} images")
        bad_stages = sorted({s for s in self.stages if not isinstance(s, str) or not _STAGE_PATTERN.match(s)})
        if bad_stages:
            raise ValueError(f"stage names may hold only letters, digits, '_' and '-': {bad_stages}")
        names = self.class_names
        if not names or len(set(names)) != len(names):
            raise ValueError(f"class_names must be distinct and non-empty, got {names}")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(names)):
            raise ValueError(f"labels must lie in [0, {len(names)})")
        if n and not (float(images.min()) >= 0.0 and float(images.max()) <= 1.0):
            raise ValueError("images must lie in [0, 1] (NaN counts as outside)")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        valued = int((~torch.isnan(self.utilities)).sum())
        return (
            f"SyntheticPool(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, "
            f"classes={len(self.class_names)}, "
            f"rounds={sorted(set(self.rounds.tolist()))}, stages={sorted(set(self.stages))}, valued={valued})"
        )

    def ids(self) -> list[str]:
        """A readable identity per image: r<round>-<stage>-c<label>-s<seed>."""
        return [
            f"r{r}-{stage}-c{label}-s{seed}"
            for r, stage, label, seed in zip(
                self.rounds.tolist(), self.stages, self.labels.tolist(), self.seeds.tolist(), strict=True
            )
        ]

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> SyntheticPool:
        """The images at ``indices``, in that order, with all their fields."""
        index = subset_index(indices, len(self))

        def pick(value: Tensor | None) -> Tensor | None:
            return None if value is None else value[index.to(value.device)]

        return SyntheticPool(
            images=pick(self.images),
            labels=pick(self.labels),
            class_names=self.class_names,
            seeds=pick(self.seeds),
            rounds=pick(self.rounds),
            stages=[self.stages[i] for i in index.tolist()],
            utilities=pick(self.utilities),
            prompt_embeds=pick(self.prompt_embeds),
            noises=pick(self.noises),
        )

    def concat(self, other: SyntheticPool) -> SyntheticPool:
        """``self`` followed by ``other`` (same classes, image shape, and the same optional tensors present)."""
        if other.class_names != self.class_names:
            raise ValueError(f"cannot concat pools with different classes: {self.class_names} vs {other.class_names}")
        if other.images.shape[1:] != self.images.shape[1:]:
            raise ValueError(
                f"cannot concat image shapes {tuple(self.images.shape[1:])} and {tuple(other.images.shape[1:])}"
            )
        joined = {}
        for name in ("prompt_embeds", "noises"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if (mine is None) != (theirs is None):
                raise ValueError(f"cannot concat a pool with {name} and one without")
            if mine is not None and mine.shape[1:] != theirs.shape[1:]:
                raise ValueError(
                    f"cannot concat {name} of shapes {tuple(mine.shape[1:])} and {tuple(theirs.shape[1:])}"
                )
            joined[name] = None if mine is None else torch.cat([mine, theirs.to(mine.device)])
        return SyntheticPool(
            images=torch.cat([self.images, other.images.to(self.images.device)]),
            labels=torch.cat([self.labels, other.labels.to(self.labels.device)]),
            class_names=self.class_names,
            seeds=torch.cat([self.seeds, other.seeds.to(self.seeds.device)]),
            rounds=torch.cat([self.rounds, other.rounds.to(self.rounds.device)]),
            stages=self.stages + other.stages,
            utilities=torch.cat([self.utilities, other.utilities.to(self.utilities.device)]),
            **joined,
        )

    append = concat  # the loop reads better as pool = pool.append(new)

    def with_utilities(self, utilities: Tensor) -> SyntheticPool:
        """A copy sharing every tensor except the utilities (N,) float32."""
        return SyntheticPool(**{**self._fields(), "utilities": utilities.to(torch.float32)})

    def to_labelled(self) -> LabelledImages:
        """The images and labels for training; ``sources`` = "synthetic:<id>"."""
        return LabelledImages(
            self.images.float(), self.labels, self.class_names, tuple(f"synthetic:{i}" for i in self.ids())
        )

    def _fields(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    # ------------------------------------------------------------------ disk

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the pool to ``directory`` (see the module docstring); replaces a pool saved there before.

        Refuses to replace a non-empty folder that is not a synthetic pool.
        """
        self.validate()
        directory = Path(directory)
        _check_replaceable(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_siblings(directory, "saving")
        staging = directory.parent / f".{directory.name}.saving-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        try:
            self._write(staging)
            _swap_into_place(staging, directory)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return directory

    def _write(self, target: Path) -> None:
        n = len(self)
        width = max(6, len(str(max(n - 1, 0))))
        folders = class_folder_names(self.class_names)
        pixels = tensor_to_uint8(self.images)  # (N, H, W, C) uint8
        rows = []
        labels, seeds, rounds = self.labels.tolist(), self.seeds.tolist(), self.rounds.tolist()
        utilities = self.utilities.tolist()
        for i in range(n):
            relative = f"{IMAGES_DIR}/{folders[labels[i]]}/{i:0{width}d}-r{rounds[i]}-{self.stages[i]}-s{seeds[i]}.png"
            atomic_write_bytes(target / relative, _png_bytes(pixels[i]))
            rows.append(
                {
                    "file": relative,
                    "label": labels[i],
                    "class_name": self.class_names[labels[i]],
                    "seed": seeds[i],
                    "round": rounds[i],
                    "stage": self.stages[i],
                    "utility": None if math.isnan(utilities[i]) else utilities[i],
                }
            )
        tensors = {name: value for name in ("prompt_embeds", "noises") if (value := getattr(self, name)) is not None}
        header = {
            "format": _FORMAT,
            "class_names": json.dumps(list(self.class_names)),
            "count": str(n),
            "image_shape": json.dumps(list(self.images.shape[1:])),
        }
        atomic_write_bytes(target / TENSORS_FILE, safetensors_bytes(tensors, metadata=header))
        atomic_write_jsonl(target / METADATA_FILE, rows)  # last: its presence marks a complete pool
        for folder in [*sorted({Path(row["file"]).parent for row in rows}), Path(IMAGES_DIR), Path(".")]:
            if (target / folder).is_dir():
                _fsync_directory(target / folder)  # the renames into these folders survive a power cut

    @classmethod
    def load(cls, directory: str | os.PathLike) -> SyntheticPool:
        """Read a pool written by ``save``; raises ``SyntheticPoolError`` naming what is missing or inconsistent."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(
                f"no synthetic pool at {directory}: the folder does not exist{_swap_hint(directory)}"
            )
        metadata_path, tensors_path = directory / METADATA_FILE, directory / TENSORS_FILE
        if not metadata_path.exists():
            raise SyntheticPoolError(
                f"{directory} is not a complete synthetic pool: {METADATA_FILE} is missing "
                f"(it is written last, so the save was interrupted or this is another kind of folder)"
            )
        if not tensors_path.exists():
            raise SyntheticPoolError(f"synthetic pool {directory} is damaged: {TENSORS_FILE} is missing")
        rows = _read_rows(metadata_path)
        with safe_open(str(tensors_path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if header.get("format") != _FORMAT:
            raise SyntheticPoolError(f"{tensors_path} is not a utilgen pool file (format {header.get('format')!r})")
        class_names = tuple(json.loads(header["class_names"]))
        channels, height, width = json.loads(header["image_shape"])
        if int(header["count"]) != len(rows):
            raise SyntheticPoolError(
                f"synthetic pool {directory} is inconsistent: {TENSORS_FILE} records {header['count']} images, "
                f"{METADATA_FILE} has {len(rows)} rows"
            )
        for name, value in tensors.items():
            if value.shape[0] != len(rows):
                raise SyntheticPoolError(f"{TENSORS_FILE}: {name} has {value.shape[0]} rows for {len(rows)} images")
        missing = [row["file"] for row in rows if not (directory / row["file"]).is_file()]
        if missing:
            listed = "\n  ".join(missing[:20]) + (f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else "")
            raise SyntheticPoolError(f"synthetic pool {directory} is missing {len(missing)} image file(s):\n  {listed}")
        for line, row in enumerate(rows, start=1):
            label = row["label"]
            if (
                not (isinstance(label, int) and 0 <= label < len(class_names))
                or class_names[label] != row["class_name"]
            ):
                raise SyntheticPoolError(
                    f"{metadata_path} line {line}: label {label!r} / class {row['class_name']!r} do not match the "
                    f"class list {list(class_names)}"
                )

        pixels = np.zeros((len(rows), height, width, channels), dtype=np.uint8)  # (N, H, W, C)
        for i, row in enumerate(rows):
            pixels[i] = _read_png(directory / row["file"], channels, height, width)
        return cls(
            images=uint8_to_tensor(pixels),
            labels=torch.tensor([row["label"] for row in rows], dtype=torch.int64),
            class_names=class_names,
            seeds=torch.tensor([row["seed"] for row in rows], dtype=torch.int64),
            rounds=torch.tensor([row["round"] for row in rows], dtype=torch.int64),
            stages=[row["stage"] for row in rows],
            utilities=torch.tensor(
                [math.nan if row["utility"] is None else row["utility"] for row in rows], dtype=torch.float32
            ),
            prompt_embeds=tensors.get("prompt_embeds"),
            noises=tensors.get("noises"),
        )


def class_folder_names(class_names: Sequence[str]) -> list[str]:
    """Folder per class: zero-padded label + the name with unsafe characters as "_" ("0_t-shirt_top").

    The label prefix keeps folders distinct when two names map to the same safe name.
    """
    width = len(str(len(class_names) - 1))
    return [f"{k:0{width}d}_{_safe_class_name(name)}" for k, name in enumerate(class_names)]


def _safe_class_name(name: str) -> str:
    """ASCII letters, digits, ".", "_" and "-" only; long names cut to a prefix + 8 hex digits of their hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    if len(safe) <= _MAX_FOLDER_CLASS_CHARS:
        return safe
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]
    return f"{safe[: _MAX_FOLDER_CLASS_CHARS - 9]}-{digest}"


def _png_bytes(pixels: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> PNG bytes (mode L for C=1, RGB for C=3)."""
    image = Image.fromarray(pixels[..., 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _read_png(path: Path, channels: int, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 from one pool image; raises SyntheticPoolError when it does not decode or has the wrong size."""
    try:
        with Image.open(path) as image:
            image.load()
            pixels = np.asarray(image.convert(_MODES[channels]))
    except Exception as error:
        raise SyntheticPoolError(f"pool image {path} does not decode: {error}") from error
    if pixels.shape[:2] != (height, width):
        raise SyntheticPoolError(f"pool image {path} is {pixels.shape[1]}x{pixels.shape[0]}, expected {width}x{height}")
    return pixels.reshape(height, width, channels)


def _read_rows(path: Path) -> list[dict]:
    rows = []
    for line, text in enumerate(path.read_text().splitlines(), start=1):
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            raise SyntheticPoolError(f"{path} line {line} is not valid JSON: {error}") from error
        missing = [name for name in _ROW_FIELDS if name not in row]
        if missing:
            raise SyntheticPoolError(f"{path} line {line} lacks the fields {missing}")
        rows.append(row)
    return rows


def _check_replaceable(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"cannot save a synthetic pool to {directory}: it is a file")
    if directory.is_dir() and not (directory / METADATA_FILE).exists() and any(directory.iterdir()):
        raise FileExistsError(
            f"refusing to replace {directory}: it is not empty and holds no synthetic pool ({METADATA_FILE}); "
            "choose another folder or empty it"
        )


def _swap_into_place(staging: Path, directory: Path) -> None:
    """Rename ``staging`` to ``directory``; a pool already there is moved aside first and removed after."""
    replaced = None
    if directory.exists():
        replaced = directory.parent / f".{directory.name}.replaced-{uuid.uuid4().hex[:8]}"
        os.rename(directory, replaced)
    os.rename(staging, directory)
    _fsync_directory(directory.parent)
    if replaced is not None:
        shutil.rmtree(replaced)
    _remove_stale_siblings(directory, "replaced")  # older pools a killed swap left aside: superseded now


def _remove_stale_siblings(directory: Path, kind: str) -> None:
    """Delete ``.<name>.<kind>-*`` folders left by a save that was killed (one that fails cleans up itself).

    Two processes saving the same pool folder at once is unsupported (each pool has one writer).
    """
    for stale in directory.parent.glob(f".{directory.name}.{kind}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _swap_hint(directory: Path) -> str:
    aside = sorted(directory.parent.glob(f".{directory.name}.replaced-*")) if directory.parent.is_dir() else []
    if aside:
        return f"; a save was killed while swapping folders, the previous complete pool is in {aside[-1]}"
    return ""


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
