"""make_splits: balance, disjointness, determinism, nesting, errors; save/load/rebuild."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from utilgen.data import LabelledImages, load_split_indices, make_splits, save_splits, splits_from_indices


def _data(per_class=(30, 30, 30)) -> LabelledImages:
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))]  # classes interleaved
    n = len(labels)
    return LabelledImages(torch.rand(n, 1, 2, 2), labels, ("a", "b", "c"), tuple(f"img{i}" for i in range(n)))


def test_balanced_and_disjoint():
    data = _data()
    splits = make_splits(data, shots_per_class=4, meta_per_class=5, test_per_class=10, seed=0)
    assert splits.train.class_counts() == [4, 4, 4]
    assert splits.meta.class_counts() == [5, 5, 5]
    assert splits.test.class_counts() == [10, 10, 10]
    sets = [set(splits.indices[name]) for name in ("train", "meta", "test")]
    assert not (sets[0] & sets[1])
    assert not (sets[0] & sets[2])
    assert not (sets[1] & sets[2])
    for name in ("train", "meta", "test"):  # each split holds exactly the images its indices name
        part = getattr(splits, name)
        assert part.sources == tuple(f"img{i}" for i in splits.indices[name])
        assert torch.equal(part.labels, data.labels[splits.indices[name]])


def test_deterministic_per_seed_and_different_across_seeds():
    data = _data()
    first = make_splits(data, shots_per_class=4, meta_per_class=5, test_per_class=10, seed=3)
    again = make_splits(data, shots_per_class=4, meta_per_class=5, test_per_class=10, seed=3)
    other = make_splits(data, shots_per_class=4, meta_per_class=5, test_per_class=10, seed=4)
    assert first.indices == again.indices
    assert first.indices["train"] != other.indices["train"]
    assert first.indices["test"] != other.indices["test"]


def test_global_rng_does_not_matter():
    data = _data()
    np.random.seed(123)
    torch.manual_seed(123)
    first = make_splits(data, shots_per_class=2, meta_per_class=2, test_per_class=2, seed=0)
    np.random.seed(456)
    torch.manual_seed(456)
    assert make_splits(data, shots_per_class=2, meta_per_class=2, test_per_class=2, seed=0).indices == first.indices


def test_more_shots_keep_test_and_meta_and_extend_train():
    data = _data()
    few = make_splits(data, shots_per_class=2, meta_per_class=5, test_per_class=10, seed=0)
    many = make_splits(data, shots_per_class=8, meta_per_class=5, test_per_class=10, seed=0)
    assert few.indices["test"] == many.indices["test"]
    assert few.indices["meta"] == many.indices["meta"]
    assert set(few.indices["train"]) < set(many.indices["train"])


def test_test_none_takes_the_rest():
    data = _data((12, 10, 11))
    splits = make_splits(data, shots_per_class=3, meta_per_class=2, test_per_class=None, seed=0)
    assert splits.test.class_counts() == [7, 5, 6]
    assert sum(len(v) for v in splits.indices.values()) == len(data)


def test_too_few_names_classes_counts_and_need():
    data = _data((30, 6, 4))
    with pytest.raises(ValueError, match="too few") as info:
        make_splits(data, shots_per_class=2, meta_per_class=2, test_per_class=3, seed=0)
    message = str(info.value)
    assert "'b' has 6" in message
    assert "'c' has 4" in message
    assert "'a'" not in message
    assert "needs 7 (2 shots + 2 meta + 3 test)" in message
    with pytest.raises(ValueError, match="at least 1 test"):
        make_splits(data, shots_per_class=2, meta_per_class=2, test_per_class=None, seed=0)


def test_save_load_rebuild(tmp_path):
    data = _data()
    splits = make_splits(data, shots_per_class=4, meta_per_class=5, test_per_class=10, seed=7)
    path = save_splits(splits, tmp_path / "splits.json")
    saved = load_split_indices(path)
    assert saved["class_names"] == ["a", "b", "c"]
    assert saved["seed"] == 7
    assert saved["indices"] == splits.indices
    assert saved["sources"]["meta"] == list(splits.meta.sources)
    rebuilt = splits_from_indices(data, saved)
    assert rebuilt.indices == splits.indices
    assert torch.equal(rebuilt.test.images, splits.test.images)


def test_rebuild_detects_changed_data(tmp_path):
    data = _data()
    saved = load_split_indices(
        save_splits(
            make_splits(data, shots_per_class=1, meta_per_class=1, test_per_class=1, seed=0), tmp_path / "s.json"
        )
    )
    renamed = LabelledImages(data.images, data.labels, ("a", "b", "z"), data.sources)
    with pytest.raises(ValueError, match="made for classes"):
        splits_from_indices(renamed, saved)
    moved = LabelledImages(data.images, data.labels, data.class_names, tuple(reversed(data.sources)))
    with pytest.raises(ValueError, match="different images"):
        splits_from_indices(moved, saved)
    with pytest.raises(ValueError, match="out of range"):
        splits_from_indices(data.subset(range(5)), saved)


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"indices": {}}))
    with pytest.raises(ValueError, match="not a utilgen split file"):
        load_split_indices(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError):
        load_split_indices(tmp_path / "missing.json")
