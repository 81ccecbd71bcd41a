"""LabelledImages validation and the shared resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utilgen.data import LabelledImages, resize_uint8
from utilgen.data.images import tensor_to_uint8, uint8_to_tensor

CLASSES = ("a", "b", "c")


def _images(n: int = 6) -> LabelledImages:
    labels = torch.tensor([0, 1, 2, 0, 1, 2][:n])
    return LabelledImages(torch.rand(n, 1, 4, 4), labels, CLASSES, tuple(f"src{i}" for i in range(n)))


def test_counts_subset_concat():
    data = _images()
    assert len(data) == 6
    assert data.image_shape == (1, 4, 4)
    assert data.class_counts() == [2, 2, 2]
    part = data.subset([5, 0])
    assert part.labels.tolist() == [2, 0]
    assert part.sources == ("src5", "src0")
    assert torch.equal(part.images[1], data.images[0])
    both = data.concat(part)
    assert len(both) == 8
    assert both.class_counts() == [3, 2, 3]
    assert both.sources[-1] == "src0"
    assert data.indices_of_class(1).tolist() == [1, 4]


@pytest.mark.parametrize(
    ("images", "labels", "names", "match"),
    [
        (torch.rand(2, 4, 4), torch.tensor([0, 1]), CLASSES, "float32 tensor"),
        (torch.rand(2, 1, 4, 4).double(), torch.tensor([0, 1]), CLASSES, "float32 tensor"),
        (torch.rand(2, 1, 4, 4), torch.tensor([0, 1], dtype=torch.int32), CLASSES, "int64"),
        (torch.rand(2, 1, 4, 4), torch.tensor([0, 3]), CLASSES, r"\[0, 3\)"),
        (torch.rand(2, 1, 4, 4), torch.tensor([0, -1]), CLASSES, r"\[0, 3\)"),
        (torch.rand(3, 1, 4, 4), torch.tensor([0, 1]), CLASSES, "3 images but 2 labels"),
        (torch.rand(2, 1, 4, 4) * 2, torch.tensor([0, 1]), CLASSES, r"\[0, 1\]"),
        (torch.full((2, 1, 4, 4), float("nan")), torch.tensor([0, 1]), CLASSES, "NaN"),
        (torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), ("a", "a"), "distinct"),
    ],
)
def test_invalid_sets_are_rejected(images, labels, names, match):
    with pytest.raises(ValueError, match=match):
        LabelledImages(images, labels, names)


def test_concat_needs_same_classes_and_shape():
    data = _images()
    with pytest.raises(ValueError, match="different classes"):
        data.concat(LabelledImages(data.images, data.labels, ("x", "y", "z")))
    with pytest.raises(ValueError, match="image shapes"):
        data.concat(LabelledImages(torch.rand(6, 3, 4, 4), data.labels, CLASSES))
    assert data.concat(LabelledImages(data.images, data.labels, CLASSES)).sources is None


def test_subset_out_of_range():
    with pytest.raises(IndexError):
        _images().subset([6])


def test_resize_and_round_trip():
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    small = resize_uint8(pixels, 16)
    assert small.shape == (3, 16, 16)
    assert small.dtype == np.uint8
    flat = np.full((1, 28, 28), 77, dtype=np.uint8)
    assert (resize_uint8(flat, 16) == 77).all()  # a resize filter must preserve a constant image
    checkerboard = (np.indices((28, 28)).sum(0) % 2 * 255).astype(np.uint8)[None]
    assert np.abs(resize_uint8(checkerboard, 16).astype(int) - 128).max() < 16  # antialiased: no aliasing stripes
    rgb = np.random.default_rng(1).integers(0, 256, size=(2, 10, 12, 3), dtype=np.uint8)
    assert resize_uint8(rgb, 8).shape == (2, 8, 8, 3)
    tensor = uint8_to_tensor(small)
    assert tensor.shape == (3, 1, 16, 16)
    assert tensor.dtype == torch.float32
    assert np.array_equal(tensor_to_uint8(tensor)[..., 0], small)
