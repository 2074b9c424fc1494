"""Tests of the keyed feature file: round trip, nothing when absent, no rewrite of the
same key, and a failed or damaged file that never costs the user the previous one."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from kedro.io import DatasetError

from irv2_pipeline.datasets import FeatureCacheDataset


def arrays(key: str = "k1") -> dict:
    rng = np.random.default_rng(0)
    return {
        "key": key,
        "about": {"model": "m", "image_size": 75, "open_policy": {"bg": [1, 2, 3]}},
        "train": rng.normal(size=(4, 3)).astype(np.float32),
        "train_paths": np.array(["a/1.png", "b/2.png", "a/3.png", "b/4.png"]),
        "val": np.empty((0, 3), np.float32),
    }


def test_a_missing_file_loads_as_nothing_and_does_not_exist(tmp_path):
    dataset = FeatureCacheDataset(filepath=str(tmp_path / "features.npz"))
    assert dataset.load() is None
    assert not dataset.exists()
    assert dataset.loads_none_when_absent


def test_saved_arrays_key_and_description_come_back(tmp_path):
    dataset = FeatureCacheDataset(filepath=str(tmp_path / "sub" / "features.npz"))
    saved = arrays()
    dataset.save(saved)
    loaded = dataset.load()
    assert loaded["key"] == "k1"
    assert loaded["about"] == saved["about"]
    assert set(loaded) == set(saved)
    for name in ("train", "train_paths", "val"):
        np.testing.assert_array_equal(loaded[name], saved[name])
        assert loaded[name].dtype == saved[name].dtype
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["features.npz"]


def test_saving_the_key_the_file_holds_writes_nothing(tmp_path):
    path = tmp_path / "features.npz"
    dataset = FeatureCacheDataset(filepath=str(path))
    dataset.save(arrays())
    before = path.stat()
    # What a run that reused the file hands back: the loaded arrays themselves.
    dataset.save(dataset.load())
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    dataset.save(arrays("k2"))
    assert dataset.load()["key"] == "k2"


def test_a_damaged_file_is_treated_as_absent_with_a_warning(tmp_path, caplog):
    path = tmp_path / "features.npz"
    path.write_bytes(b"PK\x03\x04 half an archive")
    caplog.set_level(logging.WARNING)
    assert FeatureCacheDataset(filepath=str(path)).load() is None
    assert "cannot be read" in caplog.text and str(path) in caplog.text


def test_a_failed_save_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "features.npz"
    dataset = FeatureCacheDataset(filepath=str(path))
    dataset.save(arrays())
    before = path.read_bytes()

    def disk_full(file, **named):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(DatasetError, match="previous file, if there was one, is"):
        dataset.save(arrays("k2"))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["features.npz"]


def test_python_objects_are_refused_before_anything_is_written(tmp_path):
    dataset = FeatureCacheDataset(filepath=str(tmp_path / "features.npz"))
    with pytest.raises(DatasetError, match="'groups' holds Python objects"):
        dataset.save({**arrays(), "groups": np.array([1, "a"], dtype=object)})
    assert not (tmp_path / "features.npz").exists()
