"""Pre-run checks (utilgen.preflight): an ImageFolder's classes meet the embedded generator's by name."""

from __future__ import annotations

import pytest
import torch

from utilgen.config import ConfigError, build_config
from utilgen.data import LabelledImages
from utilgen.data.fashion_mnist import CLASS_NAMES
from utilgen.preflight import in_generator_class_order

FOLDERS = (  # sorted as an ImageFolder sorts them: not Fashion-MNIST's order
    "Ankle_Boot",
    "Bag",
    "Coat",
    "Dress",
    "Pullover",
    "Sandal",
    "Shirt",
    "Sneaker",
    "T-shirt",
    "Trouser",
)


def _folder_data(names: tuple[str, ...]) -> LabelledImages:
    labels = torch.arange(len(names)).repeat_interleave(2)  # (2K,): two images per folder
    images = labels.view(-1, 1, 1, 1).float().expand(-1, 1, 4, 4).contiguous() / 10  # image value = folder
    return LabelledImages(images, labels, names, tuple(f"{names[k]}/{i}.png" for i, k in enumerate(labels.tolist())))


def test_folders_are_relabelled_to_the_generators_classes_by_name():
    data = in_generator_class_order(build_config(), _folder_data(FOLDERS))
    assert [name.lower().replace("_", " ") for name in data.class_names] == [
        "t-shirt",
        "trouser",
        "pullover",
        "dress",
        "coat",
        "sandal",
        "shirt",
        "sneaker",
        "bag",
        "ankle boot",
    ]
    for label in range(len(CLASS_NAMES)):  # every image of generator class k came from the folder named k
        folder = FOLDERS.index(data.class_names[label])
        assert torch.all(data.images[data.labels == label] == folder / 10)
    assert data.sources[0].startswith("Ankle_Boot/")  # images and their sources stay in place


def test_folders_already_in_order_are_returned_as_they_are():
    data = _folder_data(CLASS_NAMES)
    assert in_generator_class_order(build_config(), data) is data


@pytest.mark.parametrize(
    ("names", "named"),
    [
        (tuple(str(d) for d in range(10)), "'0'"),  # ten gray digit classes: the right count, not these classes
        ((*FOLDERS[:-1], "trousers"), "'trousers'"),
        ((*FOLDERS[:-1], "tshirt/top"), "'Ankle_Boot'"),  # two folders for one class
    ],
)
def test_classes_the_generator_does_not_make_are_refused(names, named):
    with pytest.raises(ConfigError, match="do not name them one to one") as info:
        in_generator_class_order(build_config(), _folder_data(names))
    assert named in str(info.value)


def test_stable_diffusion_keeps_the_folder_order():
    data = _folder_data(tuple(str(d) for d in range(10)))
    config = build_config(overrides=["generator.kind=stable-diffusion"])
    assert in_generator_class_order(config, data) is data
