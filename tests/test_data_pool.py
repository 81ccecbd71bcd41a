"""SyntheticPool: in-memory operations, save/load round trip, atomic saves, damaged pools."""

from __future__ import annotations

import json
import math

import pytest
import torch

from utilgen.data import LabelledImages, SyntheticPool, SyntheticPoolError, load_image_folder
from utilgen.data import pool as pool_module

CLASSES = ("t-shirt/top", "trouser", "bag")


def _pool(n: int = 7, channels: int = 1, round: int = 0, stage: str = "initial", seed0: int = 0) -> SyntheticPool:
    generator = torch.Generator().manual_seed(seed0)
    return SyntheticPool.create(
        torch.rand(n, channels, 6, 5, generator=generator),
        torch.arange(n) % len(CLASSES),
        CLASSES,
        torch.arange(seed0, seed0 + n),
        round=round,
        stage=stage,
        prompt_embeds=torch.randn(n, 3, 8, generator=generator),
        noises=torch.randn(n, 4, 2, 2, generator=generator),
    )


def test_create_concat_subset_to_labelled():
    first, second = _pool(4), _pool(3, round=1, stage="mlco", seed0=100)
    assert torch.isnan(first.utilities).all()
    assert first.stages == ["initial"] * 4
    both = first.append(second)
    assert len(both) == 7
    assert both.rounds.tolist() == [0] * 4 + [1] * 3
    assert both.stages[-1] == "mlco"
    assert torch.equal(both.prompt_embeds[4:], second.prompt_embeds)
    picked = both.subset([6, 0])
    assert picked.seeds.tolist() == [102, 0]
    assert torch.equal(picked.noises[0], second.noises[2])
    valued = picked.with_utilities(torch.tensor([0.5, -1.0]))
    assert valued.utilities.tolist() == [0.5, -1.0]
    assert torch.isnan(picked.utilities).all()
    labelled = valued.to_labelled()
    assert isinstance(labelled, LabelledImages)
    assert labelled.sources == (
        "synthetic:r1-mlco-c2-s102",
        "synthetic:r0-initial-c0-s0",
    )


def test_invalid_pools_and_concats():
    good = _pool(3)
    with pytest.raises(ValueError, match="stage names"):
        SyntheticPool.create(good.images, good.labels, CLASSES, good.seeds, round=0, stage="bad/stage")
    with pytest.raises(ValueError, match="seeds must be"):
        SyntheticPool.create(good.images, good.labels, CLASSES, good.seeds.int(), round=0, stage="x")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        SyntheticPool.create(torch.rand(3, 2, 4, 4), good.labels, CLASSES, good.seeds, round=0, stage="x")
    with pytest.raises(ValueError, match="prompt_embeds"):
        SyntheticPool.create(
            good.images, good.labels, CLASSES, good.seeds, round=0, stage="x", prompt_embeds=torch.rand(2, 3, 4)
        )
    bare = SyntheticPool.create(good.images, good.labels, CLASSES, good.seeds, round=0, stage="x")
    with pytest.raises(ValueError, match="one without"):
        good.concat(bare)


@pytest.mark.parametrize("channels", [1, 3])
def test_save_load_round_trip(tmp_path, channels):
    pool = _pool(7, channels=channels).with_utilities(torch.tensor([0.1, -2.0, math.nan, 3.5, 0.0, 1e-8, 7.0]))
    pool.save(tmp_path / "pool")
    loaded = SyntheticPool.load(tmp_path / "pool")
    assert loaded.images.shape == pool.images.shape
    assert float((loaded.images - pool.images).abs().max()) <= 0.5 / 255 + 1e-6  # 8-bit PNG, rounded
    assert torch.equal(loaded.labels, pool.labels)
    assert torch.equal(loaded.seeds, pool.seeds)
    assert torch.equal(loaded.rounds, pool.rounds)
    assert loaded.stages == pool.stages
    assert loaded.class_names == CLASSES
    assert torch.equal(torch.isnan(loaded.utilities), torch.isnan(pool.utilities))
    assert torch.equal(loaded.utilities.nan_to_num(), pool.utilities.nan_to_num())  # float32 exact through JSON
    assert torch.equal(loaded.prompt_embeds, pool.prompt_embeds)
    assert torch.equal(loaded.noises, pool.noises)

    rows = [json.loads(line) for line in (tmp_path / "pool" / "metadata.jsonl").read_text().splitlines()]
    assert rows[2] == {
        "file": "images/2_bag/000002-r0-initial-s2.png",
        "label": 2,
        "class_name": "bag",
        "seed": 2,
        "round": 0,
        "stage": "initial",
        "utility": None,
    }
    assert rows[0]["class_name"] == "t-shirt/top"
    assert rows[0]["file"].startswith("images/0_t-shirt_top/")
    assert rows[1]["utility"] == pytest.approx(-2.0)


def test_saved_tree_is_an_image_folder_with_the_same_labels(tmp_path):
    classes = tuple(f"class{k}" for k in range(12))  # >10 classes: folder order must still be label order
    pool = SyntheticPool.create(
        torch.rand(12, 1, 4, 4), torch.arange(12).flip(0), classes, torch.arange(12), round=0, stage="s"
    )
    pool.save(tmp_path / "pool")
    data, _ = load_image_folder(tmp_path / "pool" / "images", image_size=4, channels=1)
    assert data.class_names[3] == "03_class3"
    assert sorted(data.labels.tolist()) == list(range(12))
    assert data.labels.tolist() == [int(s.split("/")[-2].split("_")[0]) for s in data.sources]


def test_class_names_too_long_for_a_file_name(tmp_path):
    long_names = ("x" * 255, "x" * 254 + "y", "é" * 200)  # the first two differ only at the end
    pool = SyntheticPool.create(
        torch.rand(3, 1, 4, 4), torch.arange(3), long_names, torch.arange(3), round=0, stage="s"
    )
    pool.save(tmp_path / "pool")
    loaded = SyntheticPool.load(tmp_path / "pool")
    assert loaded.class_names == long_names
    rows = [json.loads(line) for line in (tmp_path / "pool" / "metadata.jsonl").read_text().splitlines()]
    assert [row["class_name"] for row in rows] == list(long_names)
    folders = [name.split("/")[1] for name in (row["file"] for row in rows)]
    assert len(set(folders)) == 3
    assert all(len(folder.encode()) <= 255 for folder in folders)


def test_pool_without_optional_tensors_and_empty_pool(tmp_path):
    bare = SyntheticPool.create(
        torch.rand(2, 3, 4, 4), torch.tensor([0, 1]), CLASSES, torch.tensor([5, 6]), round=2, stage="ilpo"
    )
    bare.save(tmp_path / "bare")
    loaded = SyntheticPool.load(tmp_path / "bare")
    assert loaded.prompt_embeds is None
    assert loaded.noises is None
    assert loaded.rounds.tolist() == [2, 2]
    empty = bare.subset([])
    empty.save(tmp_path / "empty")
    assert len(SyntheticPool.load(tmp_path / "empty")) == 0


class _Crash(RuntimeError):
    pass


def _crash_after(monkeypatch, calls: int):
    real = pool_module.atomic_write_bytes
    count = {"n": 0}

    def flaky(path, data):
        count["n"] += 1
        if count["n"] > calls:
            raise _Crash(f"simulated crash writing {path}")
        return real(path, data)

    monkeypatch.setattr(pool_module, "atomic_write_bytes", flaky)


def test_crash_mid_save_leaves_no_pool(tmp_path, monkeypatch):
    _crash_after(monkeypatch, calls=3)
    with pytest.raises(_Crash):
        _pool(7).save(tmp_path / "pool")
    assert not (tmp_path / "pool" / "metadata.jsonl").exists()
    assert list(tmp_path.iterdir()) == []  # the staging folder was removed too
    with pytest.raises(FileNotFoundError, match="no synthetic pool"):
        SyntheticPool.load(tmp_path / "pool")


@pytest.mark.parametrize("calls", [0, 4, 7])  # first image, mid images, the tensors file
def test_crash_mid_save_keeps_the_previous_pool(tmp_path, monkeypatch, calls):
    old = _pool(5, seed0=1)
    old.save(tmp_path / "pool")
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "pool").rglob("*") if p.is_file()}
    _crash_after(monkeypatch, calls=calls)
    with pytest.raises(_Crash):
        _pool(9, seed0=50).save(tmp_path / "pool")
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "pool").rglob("*") if p.is_file()}
    assert after == before
    assert torch.equal(SyntheticPool.load(tmp_path / "pool").seeds, old.seeds)


def test_metadata_is_written_last(tmp_path, monkeypatch):
    order = []
    real_bytes, real_jsonl = pool_module.atomic_write_bytes, pool_module.atomic_write_jsonl
    monkeypatch.setattr(pool_module, "atomic_write_bytes", lambda p, d: order.append(p.name) or real_bytes(p, d))
    monkeypatch.setattr(pool_module, "atomic_write_jsonl", lambda p, r: order.append(p.name) or real_jsonl(p, r))
    _pool(3).save(tmp_path / "pool")
    assert order[-1] == "metadata.jsonl"
    assert order[-2] == "tensors.safetensors"
    assert len(order) == 5


def test_replacing_a_pool_and_refusing_other_folders(tmp_path):
    _pool(5).save(tmp_path / "pool")
    _pool(2, seed0=9).save(tmp_path / "pool")
    assert SyntheticPool.load(tmp_path / "pool").seeds.tolist() == [9, 10]
    assert len(list((tmp_path / "pool" / "images").rglob("*.png"))) == 2  # old images are gone
    assert [p.name for p in tmp_path.iterdir()] == ["pool"]  # no staging or replaced folders left
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to replace"):
        _pool(2).save(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


def test_damaged_pools_give_clear_errors(tmp_path):
    directory = _pool(4).save(tmp_path / "pool")
    image = directory / "images" / "1_trouser" / "000001-r0-initial-s1.png"
    image.unlink()
    with pytest.raises(SyntheticPoolError, match=r"(?s)missing 1 image file.*000001-r0-initial-s1\.png"):
        SyntheticPool.load(directory)

    directory = _pool(4).save(tmp_path / "pool2")
    (directory / "tensors.safetensors").unlink()
    with pytest.raises(SyntheticPoolError, match=r"tensors\.safetensors is missing"):
        SyntheticPool.load(directory)

    directory = _pool(4).save(tmp_path / "pool3")
    (directory / "metadata.jsonl").unlink()
    with pytest.raises(SyntheticPoolError, match=r"metadata\.jsonl is missing"):
        SyntheticPool.load(directory)

    directory = _pool(4).save(tmp_path / "pool4")
    lines = (directory / "metadata.jsonl").read_text().splitlines()
    (directory / "metadata.jsonl").write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(SyntheticPoolError, match=r"records 4 images, metadata\.jsonl has 3 rows"):
        SyntheticPool.load(directory)

    directory = _pool(4).save(tmp_path / "pool5")
    rows = [json.loads(line) for line in (directory / "metadata.jsonl").read_text().splitlines()]
    rows[2]["class_name"] = "dress"
    (directory / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SyntheticPoolError, match=r"line 3.*'dress'"):
        SyntheticPool.load(directory)

    directory = _pool(4).save(tmp_path / "pool6")
    (directory / "images" / "0_t-shirt_top" / "000000-r0-initial-s0.png").write_bytes(b"broken")
    with pytest.raises(SyntheticPoolError, match="does not decode"):
        SyntheticPool.load(directory)


def test_atomic_outputs_get_ordinary_file_permissions(tmp_path):
    import os

    from utilgen.io import atomic_write_text

    path = atomic_write_text(tmp_path / "a.txt", "x")
    mask = os.umask(0)
    os.umask(mask)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~mask)
