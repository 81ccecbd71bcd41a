"""``LabelledImages``: the one in-memory form of an image classification set, and the shared resize.

Every loader (embedded Fashion-MNIST, Debian files, ImageFolder, synthetic
pool) returns the same thing: float32 images in [0, 1] of shape (N, C, H, W),
int64 labels in [0, K) and the frozen class list. Every loader also resizes
through ``resize_uint8``, so a Fashion-MNIST image exported to PNG and read
back through ``load_image_folder`` gives the very same pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from utilgen._describe import describe

# Pillow's resize widens the filter support by the reduction factor, so every
# filter antialiases on downscaling (28 -> 16 does not alias). BICUBIC keeps
# edges sharper than BILINEAR (which blurs a 1.75x reduction noticeably) and
# rings less than LANCZOS; its small overshoot is clipped by the uint8 output.
RESIZE_FILTER = Image.Resampling.BICUBIC
RESIZE_FILTER_NAME = "bicubic (Pillow, antialiased)"


def resize_pil(image: Image.Image, size: int) -> Image.Image:
    """Resize an 8-bit L or RGB Pillow image to ``size`` x ``size``.

    The aspect ratio is not kept: a crop could cut off the object that defines the class.
    """
    if image.size == (size, size):
        return image
    return image.resize((size, size), RESIZE_FILTER)


def resize_uint8(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 images (N, H, W) or (N, H, W, C) with C in {1, 3} to (N, size, size[, C]) uint8."""
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"expected uint8 images (N, H, W) or (N, H, W, C), got {images.dtype} {images.shape}")
    if images.shape[1:3] == (size, size):
        return images
    squeeze = images.ndim == 4 and images.shape[3] == 1
    frames = images[..., 0] if squeeze else images
    out = np.stack([np.asarray(resize_pil(Image.fromarray(frame), size)) for frame in frames])
    return out[..., None] if squeeze else out


def resize_images(images: Tensor, size: int) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C, size, size), antialiased bilinear (generators may render larger)."""
    if images.shape[-2:] == (size, size):
        return images
    import torch.nn.functional as F

    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return resized.clamp(0, 1)


def uint8_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float32 (N, C, H, W) in [0, 1]."""
    if images.ndim == 3:
        images = images[..., None]
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div_(255.0)


def tensor_to_uint8(images: Tensor) -> np.ndarray:
    """float (N, C, H, W) in [0, 1] -> uint8 (N, H, W, C), rounded to nearest (error at most 0.5/255)."""
    scaled = images.detach().to("cpu", torch.float32).clamp(0.0, 1.0).mul(255.0).round_()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def subset_index(indices: Sequence[int] | Tensor | np.ndarray, count: int) -> Tensor:
    """(M,) int64 CPU tensor of ``indices`` into ``count`` images, checked; negative ones count from the end.

    The one index check of every ``subset`` (``LabelledImages``, ``SyntheticPool``).
    """
    index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    if index.dim() != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < -count or int(index.max()) >= count):
        raise IndexError(f"indices out of range for {count} images")
    return index


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """A labelled image set.

    images: (N, C, H, W) float32 in [0, 1]
    labels: (N,) int64 in [0, K), K = len(class_names)
    class_names: index = label; frozen with the run so labels mean the same thing on resume
    sources: where each image came from ("fashion-mnist:test:<index>", a file path, ...), or None
    """

    images: Tensor
    labels: Tensor
    class_names: tuple[str, ...]
    sources: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        images, labels = self.images, self.labels
        if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype != torch.float32:
            raise ValueError(f"images must be a float32 tensor (N, C, H, W), got {describe(images)}")
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"labels must be an int64 tensor (N,), got {describe(labels)}")
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        object.__setattr__(self, "class_names", tuple(self.class_names))
        names = self.class_names
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"class_names must be distinct non-empty strings, got {names}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
            raise ValueError(
                f"labels must lie in [0, {len(names)}) for {len(names)} classes, "
                f"got [{int(labels.min())}, {int(labels.max())}]"
            )
        if images.numel() and not (float(images.min()) >= 0.0 and float(images.max()) <= 1.0):  # NaN fails too
            raise ValueError(
                f"images must lie in [0, 1], got [{float(images.min())}, {float(images.max())}] (NaN counts as outside)"
            )
        if self.sources is not None:
            object.__setattr__(self, "sources", tuple(self.sources))
            if len(self.sources) != images.shape[0]:
                raise ValueError(f"{len(self.sources)} sources for {images.shape[0]} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __repr__(self) -> str:
        return (
            f"LabelledImages(n={len(self)}, image_shape={tuple(self.image_shape)}, "
            f"classes={len(self.class_names)}, per_class={self.class_counts()})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def class_counts(self) -> list[int]:
        """Images per class, (K,) as a list; index = label."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def indices_of_class(self, label: int) -> Tensor:
        """(n_k,) int64 positions of the images of class ``label``, ascending."""
        return torch.nonzero(self.labels == label, as_tuple=True)[0]

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> LabelledImages:
        """The images at ``indices`` (in that order), same class list."""
        index = subset_index(indices, len(self))
        sources = None if self.sources is None else tuple(self.sources[i] for i in index.tolist())
        return LabelledImages(self.images[index], self.labels[index], self.class_names, sources)

    def concat(self, other: LabelledImages) -> LabelledImages:
        """``self`` followed by ``other``; both must share the class list and image shape."""
        if other.class_names != self.class_names:
            raise ValueError(f"cannot concat sets with different classes: {self.class_names} vs {other.class_names}")
        if other.image_shape != self.image_shape:
            raise ValueError(f"cannot concat image shapes {self.image_shape} and {other.image_shape}")
        sources = None
        if self.sources is not None and other.sources is not None:
            sources = self.sources + other.sources
        return LabelledImages(
            torch.cat([self.images, other.images]), torch.cat([self.labels, other.labels]), self.class_names, sources
        )
