"""ImageFolder datasets: ``root/<class name>/**/<image>``, decoded with Pillow.

- Classes are the non-hidden sub-folders of ``root``, sorted by name; label =
  position in that list. Pass ``class_names`` (the list saved with a run) to
  demand exactly those folders on resume.
- Hidden files and folders (name starting with ".") are ignored; so are plain
  files directly under ``root`` (listed in the report), and, as torchvision's
  ImageFolder does, files in class folders whose extension is not one Pillow
  opens (``README.txt``, ``Thumbs.db``; listed in the report, their count logged).
- Every file with an image extension must decode: ``verify()`` then a full ``load()``, so a
  truncated file is an error, never a silently grey-padded image (Pillow's
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` must stay False, its default).
- Images are converted to 8-bit L (channels=1) or RGB (channels=3), then
  resized with ``images.RESIZE_FILTER`` (bicubic, antialiased) to
  image_size x image_size.
- Symbolic links are followed only where they cannot move an image to another
  label: into their own class folder, or entirely outside ``root`` (a subset made
  of links into a full copy elsewhere; a class folder that is itself a link).
  A link to another class's folder or file, to ``root``, or to a folder holding
  the class folder or ``root`` (``bag/loop -> ..``) is a problem. A folder
  reached twice (linked twice, a loop) is read once.
- Images are compared by content (SHA-256 of the file's bytes). A byte-identical
  copy within one class is loaded once: the first in listing order (the order of
  ``sources``) is kept, the others are listed in the report's ``duplicate_files``
  and their count is logged. The same bytes in two classes are a problem: one
  image cannot have two labels. So a duplicated file can never put one image in
  two splits.
- Problems (undecodable or truncated image files, unreadable paths, links leading
  out of their class folder, files duplicated across classes, empty classes)
  raise ``ImageFolderError`` listing all of them; with ``on_error="skip"`` the
  bad files are skipped (of a cross-class pair, the one in the later class),
  classes left empty are dropped, and both are counted in the ``ImageFolderReport``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from utilgen.data.images import RESIZE_FILTER_NAME, LabelledImages, resize_pil, uint8_to_tensor

_MODES = {1: "L", 3: "RGB"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_MAX_LISTED = 50  # the exception message lists this many problems; ``problems`` holds them all

log = logging.getLogger(__name__)


class ImageFolderError(ValueError):
    """The folder cannot be loaded as asked. ``problems``: (path, reason) for every offending file or class."""

    def __init__(self, message: str, problems: list[tuple[str, str]] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            listed = "\n".join(f"  {path}: {reason}" for path, reason in self.problems[:_MAX_LISTED])
            more = len(self.problems) - _MAX_LISTED
            message = f"{message}\n{listed}" + (f"\n  ... and {more} more" if more > 0 else "")
        super().__init__(message)


@dataclass
class ImageFolderReport:
    """What ``load_image_folder`` read, skipped and ignored; ``to_dict()`` is JSON-ready for the run directory."""

    root: str
    class_names: tuple[str, ...]
    counts: dict[str, int]  # images loaded per class
    image_size: int
    channels: int
    resize_filter: str = RESIZE_FILTER_NAME
    skipped_files: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    dropped_classes: list[str] = field(default_factory=list)  # empty after skipping (on_error="skip")
    ignored_root_files: list[str] = field(default_factory=list)  # plain files directly under root
    ignored_files: list[str] = field(default_factory=list)  # files in class folders without an image extension
    duplicate_files: list[tuple[str, str]] = field(default_factory=list)  # (dropped path, same bytes kept at path)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)

    def to_dict(self) -> dict:
        return {
            "root": self.root,
            "class_names": list(self.class_names),
            "counts": dict(self.counts),
            "image_size": self.image_size,
            "channels": self.channels,
            "resize_filter": self.resize_filter,
            "skipped_files": [{"path": path, "reason": reason} for path, reason in self.skipped_files],
            "dropped_classes": list(self.dropped_classes),
            "ignored_root_files": list(self.ignored_root_files),
            "ignored_files": list(self.ignored_files),
            "duplicate_files": [{"path": path, "duplicate_of": kept} for path, kept in self.duplicate_files],
        }


def load_image_folder(
    root: str | os.PathLike,
    *,
    image_size: int,
    channels: int = 3,
    on_error: str = "raise",
    class_names: tuple[str, ...] | list[str] | None = None,
) -> tuple[LabelledImages, ImageFolderReport]:
    """Load ``root/<class>/...`` images as (N, channels, image_size, image_size) float32 in [0, 1].

    on_error: "raise" (default) -> ``ImageFolderError`` listing every bad file / empty class;
              "skip" -> skip them and record them in the report.
    class_names: when given, the class folders must be exactly these (the frozen list of a run);
              labels follow this order.
    ``sources`` of the result are the file paths.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if channels not in _MODES:
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    root = Path(root)
    class_dirs, ignored_root_files = _class_folders(root)
    if class_names is not None:
        class_dirs = _match_frozen_classes(root, class_dirs, tuple(class_names))

    problems: list[tuple[str, str]] = []  # (path, reason) of files and folders that failed
    ignored_files: list[str] = []
    files_per_class: dict[str, list[Path]] = {}
    real_root = os.path.realpath(root)
    for name, folder in class_dirs.items():
        files_per_class[name] = _image_files_under(folder, real_root, problems, ignored_files)
    _log_ignored(root, ignored_files)

    decoded = _decode_classes(files_per_class, channels, image_size, problems)
    _log_duplicates(root, decoded.duplicates)
    pixels, kept_names, dropped = decoded.pixels, decoded.class_names, decoded.dropped

    empty = [(str(class_dirs[name]), "class has no loadable images") for name in dropped]
    if (problems or empty) and on_error == "raise":
        # The command line has no skip option, so the message offers it as the Python API's.
        raise ImageFolderError(
            f"ImageFolder {root}: {len(problems) + len(empty)} problem(s). Fix or remove these files and folders "
            "(from Python, load_image_folder(..., on_error='skip') skips them and counts them in its report):",
            problems + empty,
        )
    if class_names is not None and dropped:
        raise ImageFolderError(f"ImageFolder {root}: classes of the saved class list have no images: {dropped}")
    if not kept_names:
        raise ImageFolderError(f"ImageFolder {root}: no class has a loadable image", problems + empty)

    images = uint8_to_tensor(np.stack(pixels))  # (N, C, S, S)
    labels = torch.tensor(decoded.labels, dtype=torch.int64)
    data = LabelledImages(images, labels, tuple(kept_names), tuple(decoded.sources))
    report = ImageFolderReport(
        root=str(root),
        class_names=tuple(kept_names),
        counts=decoded.counts,
        image_size=image_size,
        channels=channels,
        skipped_files=problems,
        dropped_classes=dropped,
        ignored_root_files=ignored_root_files,
        ignored_files=ignored_files,
        duplicate_files=decoded.duplicates,
    )
    return data, report


def _class_folders(root: Path) -> tuple[dict[str, Path], list[str]]:
    """{class name: folder} sorted by name, and the plain files found directly under root."""
    if not root.exists():
        raise ImageFolderError(f"ImageFolder root {root} does not exist")
    if not root.is_dir():
        raise ImageFolderError(f"ImageFolder root {root} is not a folder")
    try:
        entries = sorted(os.scandir(root), key=lambda entry: entry.name)
    except OSError as error:
        raise ImageFolderError(f"ImageFolder root {root} cannot be listed: {error}") from error
    folders = {e.name: Path(e.path) for e in entries if not e.name.startswith(".") and e.is_dir()}
    stray = [e.path for e in entries if not e.name.startswith(".") and not e.is_dir()]
    if not folders:
        raise ImageFolderError(
            f"ImageFolder root {root} has no class folders: put the images of each class in their own "
            "sub-folder (root/<class name>/<image>)"
        )
    return folders, stray


def _match_frozen_classes(root: Path, found: dict[str, Path], expected: tuple[str, ...]) -> dict[str, Path]:
    missing = [name for name in expected if name not in found]
    extra = [name for name in found if name not in expected]
    if missing or extra:
        raise ImageFolderError(
            f"ImageFolder {root} does not match the saved class list {list(expected)}: "
            f"missing folders {missing}, unexpected folders {extra}"
        )
    return {name: found[name] for name in expected}


@functools.cache
def _image_extensions() -> frozenset[str]:
    """Lower-case extensions (".png") of the formats Pillow can open (not the save-only ones such as ".pdf")."""
    Image.init()  # registers every plugin, not only the few Pillow imports up front
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _log_ignored(root: Path, ignored_files: list[str]) -> None:
    if ignored_files:
        log.warning(
            "ImageFolder %s: ignored %d file(s) without an image extension Pillow opens, e.g. %s",
            root,
            len(ignored_files),
            ignored_files[0],
        )


def _log_duplicates(root: Path, duplicates: list[tuple[str, str]]) -> None:
    if duplicates:
        log.warning(
            "ImageFolder %s: loaded %d byte-identical duplicate file(s) only once (kept the first of its class), "
            "e.g. %s is the same as %s",
            root,
            len(duplicates),
            *duplicates[0],
        )


def _image_files_under(folder: Path, real_root: str, problems: list[tuple[str, str]], ignored: list[str]) -> list[Path]:
    """Non-hidden image files below ``folder`` (recursively, symlinks followed once), sorted.

    Files without an image extension go to ``ignored``; listing errors and links leading out of the class
    folder (``_link_escape``) to ``problems``. ``real_root``: the real path of the data root.
    """
    files: list[Path] = []
    seen_dirs: set[str] = set()
    real_folder = os.path.realpath(folder)

    def walk(directory: Path) -> None:
        real = os.path.realpath(directory)
        if real in seen_dirs:  # a symlink loop or a folder linked twice
            return
        seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            problems.append((str(directory), f"cannot list folder: {error.strerror or error}"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            is_dir = entry.is_dir()
            if not is_dir and os.path.splitext(entry.name)[1].lower() not in _image_extensions():
                ignored.append(entry.path)  # never read, so where a link leads does not matter
                continue
            escape = _link_escape(entry.path, real_folder, real_root) if entry.is_symlink() else None
            if escape is not None:
                reason = f"symlink leads outside its class folder to {escape}; replace it with a copy or remove it"
                problems.append((entry.path, reason))
            elif is_dir:
                walk(Path(entry.path))
            else:
                files.append(Path(entry.path))  # dangling links too: they fail to open and get reported

    walk(folder)
    return files


def _is_within(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or lies below it; both real (resolved, absolute) paths."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_escape(link: str, real_class_folder: str, real_root: str) -> str | None:
    """The real target of ``link`` when following it could give images of other classes this label, else None.

    Escapes: a target under the root but outside the class folder (another class, the root itself), and a folder
    holding the class folder or the root (``bag/loop -> ..``), whose walk would reach the other classes.
    Fine: a target in the class folder, and one entirely outside the root (a subset dataset made of links into a
    full copy elsewhere). A dangling link is not judged here: it fails to open and is reported as unreadable.
    """
    if not os.path.exists(link):
        return None
    target = os.path.realpath(link)
    if _is_within(target, real_class_folder):
        return None
    if _is_within(target, real_root) or _is_within(real_class_folder, target) or _is_within(real_root, target):
        return target
    return None


@dataclass
class _Decoded:
    """The images of every class, in label order, and the byte-identical files dropped within a class."""

    pixels: list[np.ndarray] = field(default_factory=list)  # each (image_size, image_size[, 3]) uint8
    labels: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)  # classes with at least one image; label = position
    dropped: list[str] = field(default_factory=list)  # classes left without an image
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (dropped path, kept path), same class


def _decode_classes(
    files_per_class: dict[str, list[Path]], channels: int, image_size: int, problems: list[tuple[str, str]]
) -> _Decoded:
    """Read, hash and decode every file; failures and cross-class duplicates go to ``problems``."""
    decoded = _Decoded()
    first_with_content: dict[bytes, tuple[str, str]] = {}  # SHA-256 of a loaded file -> (its path, its class)
    for name, files in files_per_class.items():
        count = 0
        for path in files:
            try:
                content = path.read_bytes()  # read once: hashed here, decoded from memory
            except Exception as error:
                problems.append((str(path), _reason(error)))
                continue
            digest = hashlib.sha256(content).digest()
            if digest in first_with_content:
                kept_path, kept_class = first_with_content[digest]
                if kept_class == name:  # same image, same label: harmless, but it must count once
                    decoded.duplicates.append((str(path), kept_path))
                else:
                    reason = f"same content as {kept_path} in class {kept_class}: one image cannot have two labels"
                    problems.append((str(path), reason))
                continue
            try:
                decoded.pixels.append(_decode(content, channels, image_size))
            except Exception as error:
                problems.append((str(path), _reason(error)))
                continue
            first_with_content[digest] = (str(path), name)  # only loaded files: a broken copy is reported as broken
            decoded.labels.append(len(decoded.class_names))
            decoded.sources.append(str(path))
            count += 1
        if count == 0:
            decoded.dropped.append(name)
            continue
        decoded.class_names.append(name)
        decoded.counts[name] = count
    return decoded


def _decode(content: bytes, channels: int, image_size: int) -> np.ndarray:
    """One file's bytes -> (image_size, image_size) or (image_size, image_size, 3) uint8; raises on any defect."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; utilgen needs it False to detect truncation")
    with Image.open(io.BytesIO(content)) as probe:
        probe.verify()  # structure and checksums (PNG CRCs); the image is unusable afterwards
    with Image.open(io.BytesIO(content)) as image:
        image.load()  # full decode: a truncated file raises here
        image = ImageOps.exif_transpose(image)  # photos stored rotated with an EXIF flag
        image = _to_8bit(image, _MODES[channels])
        return np.asarray(resize_pil(image, image_size))


def _to_8bit(image: Image.Image, mode: str) -> Image.Image:
    """Convert to 8-bit ``mode``; 16-bit grey is scaled (Pillow's convert would clip it), alpha is put on white."""
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image, dtype=np.float64)
        scaled = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255
        image = Image.fromarray(scaled, mode="L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # What a viewer shows, not the arbitrary colour stored under alpha = 0.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image if image.mode == mode else image.convert(mode)


def _reason(error: Exception) -> str:
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image Pillow can decode"
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"unreadable: {error.strerror or error}"
    message = str(error)
    if "truncated" in message.lower():
        return f"truncated image: {message}"
    return f"corrupt image ({type(error).__name__}: {message})"
