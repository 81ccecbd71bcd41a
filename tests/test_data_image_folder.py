"""load_image_folder: decoding, conversion, resizing, ignored entries and every kind of bad input."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utilgen.data import ImageFolderError, load_embedded, load_image_folder, make_splits
from utilgen.data.images import resize_uint8


def _save(path: Path, array: np.ndarray, fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    """root/cat: 2 RGB PNG (12x20, 16x16) + 1 grey JPEG; root/dog: 2 grey PNG; hidden entries everywhere."""
    rng = np.random.default_rng(0)
    root = tmp_path / "root"
    _save(root / "cat" / "a.png", rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
    _save(root / "cat" / "b.png", np.full((16, 16, 3), (255, 0, 0), dtype=np.uint8))
    _save(root / "cat" / "sub" / "c.jpg", np.full((30, 30), 128, dtype=np.uint8), fmt="JPEG")
    _save(root / "dog" / "a.png", np.full((8, 8), 200, dtype=np.uint8))
    _save(root / "dog" / "b.png", np.zeros((8, 8), dtype=np.uint8))
    (root / "dog" / ".DS_Store").write_bytes(b"not an image")
    (root / "dog" / ".cache").mkdir()
    (root / "dog" / ".cache" / "junk.txt").write_text("junk")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / "README.txt").write_text("a stray file at the root")
    return root


def test_rgb_folder_resized(folder):
    data, report = load_image_folder(folder, image_size=10, channels=3)
    assert data.class_names == ("cat", "dog")  # sorted; .git ignored
    assert data.images.shape == (5, 3, 10, 10)
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert report.counts == {"cat": 3, "dog": 2}
    assert report.num_skipped == 0
    assert report.ignored_root_files == [str(folder / "README.txt")]
    red = data.images[1]  # cat/b.png, pure red, resize keeps it pure
    assert torch.allclose(red[0], torch.ones(10, 10))
    assert float(red[1:].abs().max()) == 0.0
    grey_jpeg = data.images[2]  # grey in, three equal channels out
    assert torch.equal(grey_jpeg[0], grey_jpeg[1])
    assert abs(float(grey_jpeg.mean()) - 128 / 255) < 2 / 255
    assert data.sources[2].endswith("cat/sub/c.jpg")


def test_grayscale_folder(folder):
    data, report = load_image_folder(folder, image_size=8, channels=1)
    assert data.images.shape == (5, 1, 8, 8)
    assert torch.allclose(data.images[3], torch.full((1, 8, 8), 200 / 255))  # 8x8 already the target size
    assert report.to_dict()["resize_filter"].startswith("bicubic")


def test_folder_export_of_fashion_mnist_reads_back_identically(tmp_path):
    """ImageFolder and the embedded loader resize the same way: same pixels from the same source."""
    native = load_embedded(image_size=28).subset(range(0, 3000, 300))  # 10 images
    for i, (image, label) in enumerate(zip(native.images, native.labels.tolist(), strict=True)):
        pixels = (image[0] * 255).round().to(torch.uint8).numpy()
        _save(tmp_path / f"class{label}" / f"{i:02d}.png", pixels)
    data, _ = load_image_folder(tmp_path, image_size=16, channels=1)
    expected = resize_uint8((native.images[:, 0] * 255).round().to(torch.uint8).numpy(), 16)
    order = np.argsort([int(Path(s).stem) for s in data.sources])
    assert np.array_equal((data.images[order, 0] * 255).round().to(torch.uint8).numpy(), expected)


def test_sixteen_bit_and_transparent_images(tmp_path):
    _save(tmp_path / "a" / "deep.png", np.full((4, 4), 65535, dtype=np.uint16))
    transparent = np.zeros((4, 4, 4), dtype=np.uint8)  # black, fully transparent -> shown as white
    _save(tmp_path / "b" / "alpha.png", transparent)
    data, _ = load_image_folder(tmp_path, image_size=4, channels=1)
    assert torch.allclose(data.images, torch.ones(2, 1, 4, 4))  # 16-bit white stays white (convert("L") clips)


def test_bad_files_are_listed(folder):
    (folder / "dog" / "notes.jpg").write_text("hello")  # an image extension: it must decode
    (folder / "dog" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    full = _png_bytes(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    (folder / "cat" / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "cat" / "dangling.png").symlink_to(folder / "does-not-exist.png")
    with pytest.raises(ImageFolderError) as info:
        load_image_folder(folder, image_size=8)
    message = str(info.value)
    problems = dict(info.value.problems)
    assert set(problems) == {
        str(folder / p) for p in ("dog/notes.jpg", "dog/corrupt.png", "cat/truncated.png", "cat/dangling.png")
    }
    assert "not an image" in problems[str(folder / "dog" / "notes.jpg")]
    assert "unreadable" in problems[str(folder / "cat" / "dangling.png")]
    for path in problems:
        assert path in message
    assert "from Python, load_image_folder(..., on_error='skip')" in message  # the CLI has no such option
    assert "4 problem(s)" in message


def test_problem_count_includes_empty_classes(folder):
    (folder / "empty").mkdir()
    with pytest.raises(ImageFolderError, match=r"1 problem\(s\)") as info:
        load_image_folder(folder, image_size=8)
    assert info.value.problems == [(str(folder / "empty"), "class has no loadable images")]


def test_non_image_files_are_ignored_and_counted(folder, caplog):
    strays = [folder / "cat" / "README.txt", folder / "cat" / "sub" / "Thumbs.db", folder / "dog" / "LICENSE"]
    for stray in strays:
        stray.write_text("not an image")
    _save(folder / "dog" / "upper.PNG", np.full((8, 8), 50, dtype=np.uint8))  # extensions match in any case
    with caplog.at_level("WARNING", logger="utilgen.data.image_folder"):
        _, report = load_image_folder(folder, image_size=8)
    assert report.counts == {"cat": 3, "dog": 3}
    assert sorted(report.ignored_files) == sorted(str(path) for path in strays)
    assert report.to_dict()["ignored_files"] == report.ignored_files
    assert report.num_skipped == 0
    assert "ignored 3 file(s)" in caplog.text


def test_class_with_only_non_image_files_is_empty(folder):
    (folder / "notes").mkdir()
    (folder / "notes" / "README.md").write_text("# notes")
    with pytest.raises(ImageFolderError, match="class has no loadable images"):
        load_image_folder(folder, image_size=8)


def test_bad_checksum_is_caught_by_verify(tmp_path):
    """A flipped CRC decodes without complaint under load(); only verify() notices it."""
    data = bytearray(_png_bytes(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)))
    at = data.find(b"IDAT")
    length = int.from_bytes(data[at - 4 : at], "big")
    data[at + 4 + length] ^= 0xFF  # first byte of the IDAT chunk's CRC
    _save(tmp_path / "a" / "good.png", np.zeros((8, 8), dtype=np.uint8))
    (tmp_path / "a" / "bad-crc.png").write_bytes(bytes(data))
    with pytest.raises(ImageFolderError, match=r"bad-crc\.png: corrupt image.*checksum"):
        load_image_folder(tmp_path, image_size=8)


def test_skip_counts_bad_files_and_drops_empty_classes(folder):
    (folder / "dog" / "notes.gif").write_text("hello")
    full = _png_bytes(np.zeros((32, 32), dtype=np.uint8))
    (folder / "cat" / "truncated.png").write_bytes(full[:-30])
    (folder / "empty").mkdir()
    (folder / "only-junk").mkdir()
    (folder / "only-junk" / "x.bmp").write_text("x")
    data, report = load_image_folder(folder, image_size=8, on_error="skip")
    assert data.class_names == ("cat", "dog")
    assert len(data) == 5
    assert report.num_skipped == 3  # notes.gif, truncated.png, x.bmp
    assert {Path(p).name for p, _ in report.skipped_files} == {"notes.gif", "truncated.png", "x.bmp"}
    assert report.dropped_classes == ["empty", "only-junk"]
    assert report.to_dict()["skipped_files"][0].keys() == {"path", "reason"}


def test_empty_class_is_an_error(folder):
    (folder / "empty").mkdir()
    (folder / "empty" / ".hidden.png").write_bytes(b"")
    with pytest.raises(ImageFolderError, match="class has no loadable images") as info:
        load_image_folder(folder, image_size=8)
    assert str(folder / "empty") in str(info.value)


def test_missing_root_and_no_classes(tmp_path):
    with pytest.raises(ImageFolderError, match="does not exist"):
        load_image_folder(tmp_path / "nope", image_size=8)
    (tmp_path / "flat.png").write_bytes(_png_bytes(np.zeros((4, 4), dtype=np.uint8)))
    with pytest.raises(ImageFolderError, match="no class folders"):
        load_image_folder(tmp_path, image_size=8)
    with pytest.raises(ImageFolderError, match="not a folder"):
        load_image_folder(tmp_path / "flat.png", image_size=8)


def test_frozen_class_list(folder):
    data, _ = load_image_folder(folder, image_size=8, class_names=("dog", "cat"))
    assert data.class_names == ("dog", "cat")
    assert data.labels.tolist() == [0, 0, 1, 1, 1]
    with pytest.raises(ImageFolderError, match=r"missing folders \['bird'\]"):
        load_image_folder(folder, image_size=8, class_names=("bird", "cat", "dog"))


def test_bad_arguments(folder):
    with pytest.raises(ValueError, match="on_error"):
        load_image_folder(folder, image_size=8, on_error="ignore")
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(folder, image_size=8, channels=4)


# ---------------------------------------------------------------------------------- symlinks and duplicates


def _outside_class(link: Path) -> str:
    return f"symlink leads outside its class folder to {os.path.realpath(link)}; replace it with a copy or remove it"


@pytest.mark.parametrize("target", ["..", "../..", "../cat"])  # the root, above the root, another class's folder
def test_folder_link_out_of_its_class_is_refused_not_followed(folder, target):
    loop = folder / "dog" / "loop"
    loop.symlink_to(target)  # the bug report's bag/loop -> .. gave bag every image of every class
    with pytest.raises(ImageFolderError, match=r"1 problem\(s\)") as info:
        load_image_folder(folder, image_size=8)
    assert info.value.problems == [(str(loop), _outside_class(loop))]
    assert str(loop) in str(info.value)

    data, report = load_image_folder(folder, image_size=8, on_error="skip")
    assert report.counts == {"cat": 3, "dog": 2}  # dog keeps only its own two images
    assert [Path(s).relative_to(folder).as_posix() for s in data.sources[3:]] == ["dog/a.png", "dog/b.png"]
    assert report.skipped_files == [(str(loop), _outside_class(loop))]


def test_file_link_into_another_class_is_refused(folder):
    link = folder / "dog" / "c.png"
    link.symlink_to(folder / "cat" / "b.png")
    with pytest.raises(ImageFolderError) as info:
        load_image_folder(folder, image_size=8)
    assert info.value.problems == [(str(link), _outside_class(link))]
    assert str(folder / "cat" / "b.png") in info.value.problems[0][1]
    _, report = load_image_folder(folder, image_size=8, on_error="skip")
    assert report.counts == {"cat": 3, "dog": 2}
    assert report.num_skipped == 1


def test_links_inside_the_class_or_out_of_the_root_are_followed(folder, tmp_path):
    rng = np.random.default_rng(5)
    full = tmp_path / "full"  # a full copy elsewhere; the data root is a subset made of links into it
    outside_file = _save(full / "cat" / "x.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    for i in range(2):
        _save(full / "bird" / f"{i}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    (folder / "cat" / "x.png").symlink_to(outside_file)
    (folder / "bird").symlink_to(full / "bird")  # a class folder that is itself a link
    (folder / "cat" / "again").symlink_to("sub")  # inside the class: fine, and sub is still read once
    (folder / "cat" / "self").symlink_to(".")  # a loop inside the class: read once
    data, report = load_image_folder(folder, image_size=8)
    assert report.counts == {"bird": 2, "cat": 4, "dog": 2}
    assert report.num_skipped == 0
    assert str(folder / "cat" / "x.png") in data.sources
    assert sum(source.endswith("c.jpg") for source in data.sources) == 1

    loop = full / "bird" / "loop"  # in a class folder that lies outside the root: still its class folder
    loop.symlink_to("..")
    with pytest.raises(ImageFolderError) as info:
        load_image_folder(folder, image_size=8)
    assert info.value.problems == [(str(folder / "bird" / "loop"), _outside_class(loop))]


def test_identical_copies_within_a_class_load_once(folder, caplog):
    shutil.copyfile(folder / "cat" / "a.png", folder / "cat" / "z.png")
    (folder / "cat" / "sub" / "linked.png").symlink_to(folder / "cat" / "a.png")
    with caplog.at_level("WARNING", logger="utilgen.data.image_folder"):
        data, report = load_image_folder(folder, image_size=8)
    assert report.counts == {"cat": 3, "dog": 2}
    kept = str(folder / "cat" / "a.png")
    assert report.duplicate_files == [
        (str(folder / "cat" / "sub" / "linked.png"), kept),
        (str(folder / "cat" / "z.png"), kept),
    ]
    assert report.to_dict()["duplicate_files"][1] == {"path": str(folder / "cat" / "z.png"), "duplicate_of": kept}
    assert report.num_skipped == 0
    assert data.sources.count(kept) == 1
    assert "2 byte-identical duplicate file(s)" in caplog.text


def test_identical_copy_in_another_class_is_refused(folder):
    copy = folder / "dog" / "c.png"
    shutil.copyfile(folder / "cat" / "a.png", copy)
    reason = f"same content as {folder / 'cat' / 'a.png'} in class cat: one image cannot have two labels"
    with pytest.raises(ImageFolderError, match=r"1 problem\(s\)") as info:
        load_image_folder(folder, image_size=8)
    assert info.value.problems == [(str(copy), reason)]
    assert str(copy) in str(info.value)
    assert str(folder / "cat" / "a.png") in str(info.value)
    data, report = load_image_folder(folder, image_size=8, on_error="skip")
    assert report.counts == {"cat": 3, "dog": 2}  # the later class loses it
    assert report.skipped_files == [(str(copy), reason)]
    assert str(copy) not in data.sources


def test_duplicate_links_cannot_put_one_image_in_two_splits(tmp_path):
    rng = np.random.default_rng(3)
    for name in ("cat", "dog"):
        for i in range(6):
            _save(tmp_path / name / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
            (tmp_path / name / f"{i}-again.png").symlink_to(f"{i}.png")  # each image listed twice
    data, report = load_image_folder(tmp_path, image_size=8, channels=1)
    assert report.counts == {"cat": 6, "dog": 6}
    assert len(report.duplicate_files) == 12
    splits = make_splits(data, shots_per_class=2, meta_per_class=2, test_per_class=None, seed=0)
    split_of: dict[bytes, str] = {}
    for name in ("train", "meta", "test"):
        for image in getattr(splits, name).images:
            pixels = (image * 255).round().to(torch.uint8).numpy().tobytes()
            assert split_of.setdefault(pixels, name) == name, f"one image in both {split_of[pixels]} and {name}"
    assert len(split_of) == 12
