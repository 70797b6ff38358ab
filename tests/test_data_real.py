"""The adapters on the real samples in ../shared/data (skipped when absent)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from medxfer.data import DatasetError, load_dataset
from medxfer.data.validate import validate_dataset


def test_ichallenge_pm_training_and_validation(shared_data: Path) -> None:
    root = shared_data / "ichallenge-pm"
    ds = validate_dataset("ichallenge-pm", root, progress=False)
    letters = Counter(Path(r.path).name[0] for r in ds.records if r.split == "train")
    assert letters == {"P": 213, "H": 26, "N": 161}
    # training images are the train split, the 400 validation images (labels.csv) the test split
    assert ds.counts() == {"train": {"non-PM": 187, "PM": 213}, "test": {"non-PM": 189, "PM": 211}}
    assert ds.options["validation"] == "labels.csv" and ds.problems == []


def test_ichallenge_pm_published_rule_uses_training_only(shared_data: Path) -> None:
    ds = load_dataset("ichallenge-pm", shared_data / "ichallenge-pm", labels="normal_vs_rest")
    assert Counter(r.label for r in ds.records) == {0: 161, 1: 239}
    paper = load_dataset("ichallenge-pm", shared_data / "ichallenge-pm", split="paper")
    assert len(paper) == 400 and sum(r.split == "train" for r in paper.records) == 320


def test_eyepacs_sample_with_missing_rows(shared_data: Path) -> None:
    root = shared_data / "eyepacs-sample"
    with pytest.raises(DatasetError, match="35076 problem"):
        load_dataset("eyepacs", root)
    ds = validate_dataset("eyepacs", root, allow_missing=True, progress=False)
    assert len(ds) == 50 and Counter(r.label for r in ds.records) == dict.fromkeys(range(5), 10)
    assert ds.problems == [f"trainLabels.csv: 35076 of 35126 labelled images are not in {root / 'sample'} "
                           "(allow_missing=True), e.g. 21_right, 22_left, 22_right, 23_left, 23_right"]
    assert ds.counts()["test"] == dict.fromkeys(ds.info.class_names, 2)
    sides: dict[str, set[str]] = {}
    for r in ds.records:
        sides.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values())
    pair_patients = {ds.records[a].patient for a, _ in ds.pairs}
    assert {"13", "19", "20", "54", "78", "79"} <= pair_patients and len(ds.pairs) == 17
    skipped = load_dataset("eyepacs", root, skip_bad=True)
    assert len(skipped) == 50 and skipped.problems[-1].startswith("... and")


def test_bach_sample_converted_layout(shared_data: Path) -> None:
    ds = validate_dataset("bach", shared_data / "bach-sample", progress=False)
    assert ds.options["layout"] == "converted"
    assert ds.counts() == {"train": dict.fromkeys(ds.info.class_names, 16),
                           "test": dict.fromkeys(ds.info.class_names, 4)}
    generic = load_dataset("folder", shared_data / "bach-sample" / "dataset", name="bach-jpg")
    assert generic.info.class_names == ("benign_jpg", "insitu_jpg", "invasive_jpg", "normal_jpg")
    assert len(generic) == 80
