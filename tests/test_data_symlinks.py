"""Symbolic links in the generic routes: followed inside the dataset folder, refused (naming the
link and its target) when they point outside; real links in temporary folders."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.data import DatasetError, load_dataset
from medxfer.data.records import SymlinkError, check_inside
from medxfer.errors import MedxferError


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8), mode="L").save(path)
    return path


def _classes(root: Path, n: int = 3) -> Path:
    for cls in ("a", "b"):
        for i in range(n):
            _png(root / cls / f"{cls}{i}.png", 10 * i)
    return root


# --------------------------------------------------------------------------- CSV

def test_csv_link_to_a_file_outside_is_refused_naming_link_target_file_and_row(tmp_path: Path) -> None:
    outside = _png(tmp_path / "elsewhere" / "secret.png")
    inner = tmp_path / "inner"
    for i in range(2):
        _png(inner / f"x{i}.png")
        _png(inner / f"y{i}.png")
    (inner / "link.png").symlink_to(outside)
    csv_file = inner / "labels.csv"
    csv_file.write_text("path,label\nx0.png,x\ny0.png,y\nlink.png,y\nx1.png,x\ny1.png,y\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("csv", csv_file)
    msg = str(err.value)
    assert isinstance(err.value, MedxferError)
    assert f"{csv_file}:4" in msg and str(inner / "link.png") in msg and str(outside) in msg
    assert "symbolic link" in msg and "outside the dataset folder" in msg
    ds = load_dataset("csv", csv_file, skip_bad=True)
    assert len(ds) == 4 and str(outside) not in {r.path for r in ds.records}
    assert any("link.png" in p and "labels.csv:4" in p for p in ds.problems)


def test_csv_link_through_a_folder_outside_and_links_inside(tmp_path: Path) -> None:
    outside = tmp_path / "store"
    _png(outside / "far.png")
    inner = tmp_path / "inner"
    real = _png(inner / "real" / "r.png")
    _png(inner / "y.png")
    (inner / "sub").symlink_to(outside, target_is_directory=True)  # a folder link on the way
    (inner / "alias.png").symlink_to(real)  # inside: followed
    with pytest.raises(SymlinkError, match=r"'.*inner/sub' is a symbolic link to '.*store'"):
        check_inside(inner, inner / "sub" / "far.png", "labels.csv:2")
    (inner / "labels.csv").write_text("path,label\nalias.png,x\ny.png,y\nreal/r.png,x\n")
    ds = load_dataset("csv", inner / "labels.csv")
    assert [r.path for r in ds.records][0] == str(real.resolve())


# --------------------------------------------------------------------------- folder

def test_folder_refuses_links_outside_at_every_level(tmp_path: Path) -> None:
    root = _classes(tmp_path / "data")
    outside = tmp_path / "outside"
    far = _png(outside / "far.png")
    _png(outside / "cls" / "c0.png")
    (root / "a" / "far.png").symlink_to(far)  # an image link
    (root / "b" / "more").symlink_to(outside, target_is_directory=True)  # a sub-folder link
    (root / "c").symlink_to(outside / "cls", target_is_directory=True)  # a class-folder link
    with pytest.raises(DatasetError) as err:
        load_dataset("folder", root)
    msg = str(err.value)
    for link, target in ((root / "a" / "far.png", far), (root / "b" / "more", outside),
                         (root / "c", outside / "cls")):
        assert f"{link}: symbolic link to {target}, outside the dataset folder" in msg
    ds = load_dataset("folder", root, skip_bad=True)
    assert ds.info.class_names == ("a", "b") and len(ds) == 6
    assert all(Path(r.path).is_relative_to(root.resolve()) for r in ds.records)
    assert sum("symbolic link" in p for p in ds.problems) == 3


def test_folder_follows_links_inside_as_copies_and_never_loops(tmp_path: Path) -> None:
    root = _classes(tmp_path / "data", n=2)
    (root / "b" / "also-a0.png").symlink_to(root / "a" / "a0.png")  # a file link inside: a copy in class b
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)  # back to ROOT: not followed
    (root / "b" / "broken.png").symlink_to(root / "gone.png")
    with pytest.raises(DatasetError, match="broken symbolic link"):
        load_dataset("folder", root)
    ds = load_dataset("folder", root, skip_bad=True)
    by_class = {c: sorted(Path(r.path).name for r in ds.records if ds.info.class_names[r.label] == c)
                for c in ("a", "b")}
    assert by_class == {"a": ["a0.png", "a1.png"], "b": ["a0.png", "b0.png", "b1.png"]}
    assert any("loop" in p and "not followed" in p for p in ds.problems)


def test_a_linked_dataset_root_is_its_target(tmp_path: Path) -> None:
    real = _classes(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    assert len(load_dataset("folder", link)) == 6
