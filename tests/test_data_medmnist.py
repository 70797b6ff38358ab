"""MedMNIST .npz files: splits from keys, greyscale and RGB, array references, bad files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medxfer.data import DatasetError, load_dataset
from medxfer.data.images import open_image
from medxfer.data.validate import validate_dataset


def _npz(path: Path, rgb: bool = False, **override: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    shape = (28, 28, 3) if rgb else (28, 28)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3).reshape(n, 1).astype(np.uint8)
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_medmnist_greyscale_splits_and_refs(tmp_path: Path) -> None:
    f = _npz(tmp_path / "pneumoniamnist.npz")
    ds = validate_dataset("medmnist", f, progress=False)
    assert ds.info.name == "pneumoniamnist" and ds.info.class_names == ("0", "1", "2")
    assert ds.counts() == {"train": {"0": 2, "1": 2, "2": 2}, "val": {"0": 1, "1": 1, "2": 0},
                           "test": {"0": 1, "1": 1, "2": 1}}
    r = ds.records[7]
    assert r.path == f"{f.resolve()}#val_images/1" and r.label == 1 and r.split == "val"
    with np.load(f) as z:
        expected = z["val_images"][1]
    img = open_image(r.path)
    assert img.mode == "L" and np.array_equal(np.asarray(img), expected)


def test_medmnist_rgb_and_name_option(tmp_path: Path) -> None:
    f = _npz(tmp_path / "dermamnist.npz", rgb=True)
    ds = load_dataset("medmnist", f, name="derm")
    assert ds.info.name == "derm" and len(ds) == 11
    assert open_image(ds.records[0].path).mode == "RGB"


def test_medmnist_resplit_and_errors(tmp_path: Path) -> None:
    f = _npz(tmp_path / "x.npz")
    paper = load_dataset("medmnist", f, split="paper")
    assert sum(r.split == "train" for r in paper.records) == 8
    bad = _npz(tmp_path / "multi.npz", train_labels=np.zeros((6, 14), np.uint8))
    with pytest.raises(DatasetError, match="14 columns: multi-label"):
        load_dataset("medmnist", bad)
    bad = _npz(tmp_path / "mismatch.npz", test_labels=np.zeros((5, 1), np.uint8))
    with pytest.raises(DatasetError, match="test_images has 3 images but test_labels has 5"):
        load_dataset("medmnist", bad)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(DatasetError, match="has a"):
        load_dataset("medmnist", tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DatasetError, match="not a readable .npz"):
        load_dataset("medmnist", tmp_path / "junk.npz")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("medmnist", tmp_path / "none.npz")


def test_medmnist_split_file_roundtrip(tmp_path: Path) -> None:
    from medxfer.data import read_split_file, write_split_file

    f = _npz(tmp_path / "organmnist.npz")
    ds = load_dataset("medmnist", f, split="paper")
    split_file = write_split_file(ds, tmp_path / "split.csv")
    assert "organmnist.npz#test_images/2" in read_split_file(split_file)
    again = load_dataset("medmnist", f, split=str(split_file))
    assert [r.split for r in again.records] == [r.split for r in ds.records]
