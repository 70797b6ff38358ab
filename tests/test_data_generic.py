"""Generic sources (image folder, CSV), split files and validate_dataset."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data import DatasetError, load_dataset
from medxfer.data.splits import read_split_file, write_split_file
from medxfer.data.validate import validate_dataset


def _png(path: Path, value: int = 100, size: int = 8, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (size, size) if mode == "L" else (size, size, 3)
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path)
    return path


def _folder(root: Path, counts: dict[str, int]) -> Path:
    for cls, n in counts.items():
        for i in range(n):
            _png(root / cls / f"img{i:03d}.png", value=10 * i)
    return root


def test_folder_classes_sorted_and_stratified_counts(tmp_path: Path) -> None:
    root = _folder(tmp_path / "mydata", {"zebra": 10, "apple": 5})
    (root / "apple" / "notes.txt").write_text("not an image")
    ds = load_dataset("folder", root)
    assert ds.info.name == "mydata"
    assert ds.info.class_names == ("apple", "zebra")
    assert ds.info.task == "binary" and ds.info.fewshot_way == 2
    # stratified 80/20: round(0.2 * 5) = 1, round(0.2 * 10) = 2 test images
    assert ds.counts() == {"train": {"apple": 4, "zebra": 8}, "test": {"apple": 1, "zebra": 2}}
    assert all(Path(r.path).is_absolute() for r in ds.records)
    assert ds.options["split"] == "default"


def test_folder_name_option_and_split_seed(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 20, "b": 20})
    ds0 = load_dataset("folder", root, name="mine", seed=0)
    ds0b = load_dataset("folder", root, name="mine", seed=0)
    ds1 = load_dataset("folder", root, name="mine", seed=1)
    assert ds0.info.name == "mine"
    assert [r.split for r in ds0.records] == [r.split for r in ds0b.records]
    assert [r.split for r in ds0.records] != [r.split for r in ds1.records]
    assert ds0.fingerprint() != ds1.fingerprint()


def test_folder_with_split_subfolders_keeps_them(tmp_path: Path) -> None:
    root = tmp_path / "d"
    _folder(root / "train", {"cat": 3, "dog": 4})
    _folder(root / "test", {"cat": 1, "dog": 2})
    _folder(root / "valid", {"cat": 1})
    ds = load_dataset("folder", root)
    assert ds.counts() == {"train": {"cat": 3, "dog": 4}, "val": {"cat": 1, "dog": 0},
                           "test": {"cat": 1, "dog": 2}}


def test_folder_needs_two_classes(tmp_path: Path) -> None:
    _folder(tmp_path / "outer" / "inner", {"a": 2})
    with pytest.raises(DatasetError, match="did you mean"):
        load_dataset("folder", tmp_path / "outer")
    with pytest.raises(DatasetError, match="not found"):
        load_dataset("folder", tmp_path / "nope")


def test_csv_source_relative_paths_split_patient(tmp_path: Path) -> None:
    root = tmp_path / "study"
    for i in range(6):
        _png(root / "imgs" / f"{i}.png")
    (root / "labels.csv").write_text(
        "path,label,split,patient\n"
        "imgs/0.png,sick,train,p1\nimgs/1.png,healthy,train,p1\nimgs/2.png,sick,Validation,p2\n"
        "imgs/3.png,healthy,test,p3\nimgs/4.png,sick,test,p3\nimgs/5.png,healthy,train,p4\n")
    ds = load_dataset("csv", root / "labels.csv")
    assert ds.info.name == "labels"
    assert ds.info.class_names == ("healthy", "sick")
    assert ds.counts() == {"train": {"healthy": 2, "sick": 1}, "val": {"healthy": 0, "sick": 1},
                           "test": {"healthy": 1, "sick": 1}}
    assert ds.records[0].patient == "p1"
    assert ds.records[0].path == str((root / "imgs" / "0.png").resolve())


def test_csv_numeric_labels_sorted_numerically(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "l.csv").write_text("path,label\n0.png,10\n1.png,2\n2.png,10\n3.png,2\n")
    ds = load_dataset("csv", tmp_path / "l.csv")
    assert ds.info.class_names == ("2", "10")
    assert [r.label for r in ds.records] == [1, 0, 1, 0]


def test_csv_errors_name_file_and_row(tmp_path: Path) -> None:
    outside = _png(tmp_path / "outside.png")
    inner = tmp_path / "inner"
    _png(inner / "a.png")
    _png(inner / "b.png")
    csv_file = inner / "l.csv"
    csv_file.write_text(f"path,label,split\na.png,x,train\n../outside.png,y,train\n{outside},y,train\n"
                        "missing.png,y,train\nb.png,y,holdout\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("csv", csv_file)
    msg = str(err.value)
    assert f"{csv_file}:3" in msg and "escapes" in msg
    assert f"{csv_file}:4" in msg
    assert f"{csv_file}:5" in msg and "missing.png" in msg
    assert f"{csv_file}:6" in msg and "holdout" in msg
    (inner / "bad.csv").write_text("file,label\na.png,x\n")
    with pytest.raises(DatasetError, match="missing column.*'path'"):
        load_dataset("csv", inner / "bad.csv")


def test_csv_skip_bad_records_problems(tmp_path: Path) -> None:
    for i in range(4):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "l.csv").write_text("path,label\n0.png,a\n1.png,b\n2.png,a\n3.png,b\ngone.png,a\n")
    ds = load_dataset("csv", tmp_path / "l.csv", skip_bad=True)
    assert len(ds) == 4
    assert len(ds.problems) == 1 and "gone.png" in ds.problems[0] and "l.csv:6" in ds.problems[0]


def test_split_file_roundtrip_and_missing_entries(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 6, "b": 6})
    ds = load_dataset("folder", root, seed=3)
    split_file = write_split_file(ds, tmp_path / "split.csv")
    table = read_split_file(split_file)
    assert set(table) == {f"{c}/img{i:03d}.png" for c in "ab" for i in range(6)}
    other = load_dataset("folder", root, seed=99, split=str(split_file))
    assert [r.split for r in other.records] == [r.split for r in ds.records]
    assert other.options["split"] == "file"
    _png(root / "a" / "img999.png")
    with pytest.raises(DatasetError, match="img999.png: not listed in split file"):
        load_dataset("folder", root, split=str(split_file))
    skipped = load_dataset("folder", root, split=str(split_file), skip_bad=True)
    assert len(skipped) == 12
    with pytest.raises(ValueError, match="split file"):
        load_dataset("folder", root, split=str(tmp_path / "nothing.csv"))


def test_unknown_option_is_an_error(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 2, "b": 2})
    with pytest.raises(ValueError, match=r"unknown '--dataset-option folder.colour'. Valid: split"):
        load_dataset("folder", root, colour="red")


def test_validate_reports_unreadable_images(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 5, "b": 5})
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    _png(root / "a" / "rgb.png", mode="RGB")
    with pytest.raises(DatasetError, match=r"(?s)1 image\(s\) cannot be read.*broken.png"):
        validate_dataset("folder", root, progress=False)
    ds = validate_dataset("folder", root, skip_bad=True, progress=False)
    assert len(ds) == 11
    assert len(ds.problems) == 1 and "broken.png" in ds.problems[0]
    assert ds.summary()["total"] == 11
    unchecked = validate_dataset("folder", root, check_images=False)
    assert len(unchecked) == 12


def test_sixteen_bit_range_is_a_dataset_option(tmp_path: Path) -> None:
    root = _folder(tmp_path / "d", {"a": 2, "b": 2})
    assert load_dataset("folder", root).info.high_range == 65535
    ds = load_dataset("folder", root, high_range=4095)
    assert ds.info.high_range == 4095 and ds.options["high_range"] == 4095
    with pytest.raises(ValueError, match="high_range=0: must be positive"):
        load_dataset("folder", root, high_range=0)


def test_splits_follow_record_identity_not_file_order(tmp_path: Path) -> None:
    """The same images as a folder and as a CSV listing them in another order get the same
    train/test split, the same carved validation and the same linear-probe result."""
    import medxfer
    from medxfer.testing import write_stripes_blobs

    root = write_stripes_blobs(tmp_path / "imgs", n_per_class=20, size=40)
    files = sorted(root.rglob("*.png"), reverse=True)
    (root / "labels.csv").write_text("path,label\n" + "".join(f"{f.relative_to(root)},{f.parent.name}\n"
                                                              for f in files))
    folder = load_dataset("folder", root)
    table = load_dataset("csv", root / "labels.csv")
    assert [r.path for r in folder.records] != [r.path for r in table.records]  # another order
    split_of = {r.path: r.split for r in folder.records}
    assert {r.path: r.split for r in table.records} == split_of
    model = medxfer.load_model("test-tiny", weights="random")
    a = medxfer.evaluate("linear", medxfer.extract_features(model, folder, size=32), device="cpu")
    b = medxfer.evaluate("linear", medxfer.extract_features(model, table, size=32), device="cpu")
    assert a.details["splits"] == b.details["splits"] and a.metrics["C"] == b.metrics["C"]
    assert a.metrics["accuracy"] == b.metrics["accuracy"]
    assert a.details["val_curve"] == pytest.approx(b.details["val_curve"], abs=1e-9)
