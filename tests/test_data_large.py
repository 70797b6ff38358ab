"""CheXpert, ChestX-ray14 and EyePACS on synthetic copies in their official layouts:
label rules, views, patient-level splits, the authors' splits, pairs, bad input."""
from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import pytest

from conftest import lazy_synthetic_copies
from medxfer.data import DATASETS, DatasetError, load_dataset
from medxfer.data.splits import write_split_file
from medxfer.data.validate import validate_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory):
    return lazy_synthetic_copies(tmp_path_factory.mktemp("synthetic-large"), n_per_class=6, size=32, seed=2)


def _patients_disjoint(ds) -> None:
    sides: dict[str, set[str]] = {}
    for r in ds.records:
        sides.setdefault(r.patient, set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values()), "a patient is on both sides of the split"


# --- CheXpert -------------------------------------------------------------------------------

def _totals(ds) -> dict[str, int]:
    c = Counter(ds.info.class_names[r.label] for r in ds.records if "/valid/" not in r.path)  # train.csv images
    return dict(c)


def test_chexpert_layout_and_default_split(synth) -> None:
    root = synth("chexpert")
    assert root.name == "CheXpert-v1.0-small"
    header = next(csv.reader(open(root / "train.csv")))
    assert header[:5] == ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] and header[15] == "Pleural Effusion"
    ds = validate_dataset("chexpert", root, valid="val", progress=False)
    # train.csv: 6 images per class under u_ones; valid.csv: 2 per class in the val split
    assert _totals(ds) == {"no pleural effusion": 6, "pleural effusion": 6}
    assert ds.counts()["val"] == {"no pleural effusion": 2, "pleural effusion": 2}
    assert {r.split for r in ds.records} == {"train", "val", "test"}
    _patients_disjoint(ds)
    assert any("3 image(s) with an uncertain" in p for p in ds.problems)
    info = ds.info
    assert info.in_domain and info.fewshot_pool == 10001 and info.expected_images == 224316
    # the parent folder (where the zip was unpacked) works too
    assert load_dataset("chexpert", root.parent, valid="val").records == ds.records


def test_chexpert_validation_is_carved_from_training_patients_by_default(synth) -> None:
    """The paper's protocol: validation is a seeded patient-level part of train.csv, not the
    234-image valid.csv; valid=val keeps valid.csv as validation, valid=test makes it the test set."""
    root = synth("chexpert")
    carved = load_dataset("chexpert", root)
    n_valid_csv = len(load_dataset("chexpert", root, valid="val").records) - len(carved.records)
    assert n_valid_csv == 4 and not any("valid/" in r.path for r in carved.records)
    assert {r.split for r in carved.records} == {"train", "val", "test"}
    _patients_disjoint(carved)
    val_patients = {r.patient for r in carved.records if r.split == "val"}
    assert val_patients and not val_patients & {r.patient for r in carved.records if r.split != "val"}
    assert load_dataset("chexpert", root).records == carved.records  # seeded
    as_test = load_dataset("chexpert", root, valid="test")
    assert all(("valid/" in r.path) == (r.split == "test") for r in as_test.records)
    assert {r.split for r in as_test.records} == {"train", "val", "test"}


@pytest.mark.parametrize("policy,expected", [
    ("u_ones", {"no pleural effusion": 6, "pleural effusion": 6}),
    ("u_zeros", {"no pleural effusion": 9, "pleural effusion": 3}),
    ("ignore", {"no pleural effusion": 6, "pleural effusion": 3}),
])
def test_chexpert_uncertain_policies(synth, policy: str, expected: dict[str, int]) -> None:
    ds = load_dataset("chexpert", synth("chexpert"), uncertain=policy)
    assert _totals(ds) == expected
    assert ds.options["uncertain"] == policy


def test_chexpert_views_and_pairs(synth) -> None:
    root = synth("chexpert")
    frontal = load_dataset("chexpert", root, views="frontal")
    assert _totals(frontal) == {"no pleural effusion": 4, "pleural effusion": 4}
    assert all(r.view == "frontal" for r in frontal.records) and frontal.pairs == []
    lateral = load_dataset("chexpert", root, views="lateral")
    assert len(lateral) == 4
    ds = load_dataset("chexpert", root)
    assert len(ds.pairs) == 4
    for lat, fro in ds.pairs:
        a, b = ds.records[lat], ds.records[fro]
        assert a.view == "lateral" and b.view == "frontal" and a.study == b.study and a.patient == b.patient
    # one study lists its lateral as view1 and the frontal as view2: found by lookup
    assert any(Path(ds.records[fro].path).name == "view2_frontal.jpg" for _, fro in ds.pairs)


def test_chexpert_paper_split(synth) -> None:
    ds = load_dataset("chexpert", synth("chexpert"), split="paper")
    # train.csv only (12 rows): round(12 * 134049 / 223414) = 7 train rows
    assert len(ds) == 12 and sum(r.split == "train" for r in ds.records) == 7
    # the row assignment does not depend on the label policy
    ign = load_dataset("chexpert", synth("chexpert"), split="paper", uncertain="ignore")
    by_path = {r.path: r.split for r in ds.records}
    assert all(by_path[r.path] == r.split for r in ign.records)


def test_chexpert_bad_rows(synth, tmp_path: Path) -> None:
    root = shutil.copytree(synth("chexpert"), tmp_path / "CheXpert-v1.0-small")
    lines = (root / "train.csv").read_text().splitlines()
    fields = lines[3].split(",")
    fields[15] = "maybe"
    lines[3] = ",".join(fields)
    fields = lines[4].split(",")
    fields[0] = fields[0].replace("view", "nothere")
    lines[4] = ",".join(fields)
    fields = lines[5].split(",")
    fields[0] = "CheXpert-v1.0-small/../../patient00001/study1/view1_frontal.jpg"
    lines[5] = ",".join(fields)
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("chexpert", root)
    msg = str(err.value)
    assert "train.csv:4: unknown Pleural Effusion value 'maybe'" in msg
    assert "train.csv:5: image file not found" in msg
    assert "train.csv:6: path" in msg and "escapes the dataset folder" in msg
    ds = load_dataset("chexpert", root, skip_bad=True)
    assert len(ds) == 12 - 3  # train.csv's 12 images (valid.csv is not read by default)
    (root / "train.csv").write_text("Path,Sex,Age\n")
    with pytest.raises(DatasetError, match="missing column"):
        load_dataset("chexpert", root)


# --- ChestX-ray14 ---------------------------------------------------------------------------

def _nih_lists(root: Path) -> dict[str, str]:
    out = {n: "train" for n in (root / "train_val_list.txt").read_text().split()}
    out.update({n: "test" for n in (root / "test_list.txt").read_text().split()})
    return out


def test_chestxray14_label_rule_and_official_split(synth) -> None:
    root = synth("chestx-ray14")
    assert (root / "Data_Entry_2017.csv").read_text().splitlines()[0].endswith("PixelSpacing[x,y],")
    ds = validate_dataset("chestx-ray14", root, progress=False)
    assert ds.info.class_names == ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass",
                                   "Nodule", "Pneumothorax")
    assert Counter(r.label for r in ds.records) == dict.fromkeys(range(7), 6)
    assert any("10 row(s) dropped" in p and "multi-label: 3" in p and "No Finding: 4" in p for p in ds.problems)
    lists = _nih_lists(root)
    assert all(lists[Path(r.path).name] == r.split for r in ds.records)
    _patients_disjoint(ds)
    assert {Path(r.path).parent.parent.name for r in ds.records} == {"images_001", "images_002"}
    assert ds.info.fewshot_way == 5 and ds.info.fewshot_pool == 10001


def test_chestxray14_single_folder_and_seeded_split(synth, tmp_path: Path) -> None:
    src = synth("chestx-ray14")
    root = tmp_path / "nih"
    (root / "images").mkdir(parents=True)
    for p in src.glob("images_*/images/*.png"):
        shutil.copy(p, root / "images" / p.name)
    shutil.copy(src / "Data_Entry_2017.csv", root)
    a = load_dataset("chestx-ray14", root, seed=5)
    b = load_dataset("chestx-ray14", root, seed=5)
    assert len(a) == 42 and [r.split for r in a.records] == [r.split for r in b.records]
    assert a.options["official_lists"] is False
    _patients_disjoint(a)
    assert 0.1 < sum(r.split == "test" for r in a.records) / len(a) < 0.35
    paper = load_dataset("chestx-ray14", root, split="paper")
    assert sum(r.split == "train" for r in paper.records) == int(0.8 * 42)


def test_chestxray14_missing_images_and_unknown_findings(synth, tmp_path: Path) -> None:
    root = shutil.copytree(synth("chestx-ray14"), tmp_path / "nih")
    shutil.rmtree(root / "images_002")
    with pytest.raises(DatasetError, match="--dataset-option chestx-ray14.allow_missing=true"):
        load_dataset("chestx-ray14", root)
    part = load_dataset("chestx-ray14", root, allow_missing=True)
    assert 0 < len(part) < 42 and any("not present" in p for p in part.problems)
    entry = root / "Data_Entry_2017.csv"
    lines = entry.read_text().splitlines()
    name = lines[1].split(",")[0]
    lines[1] = lines[1].replace(lines[1].split(",")[1], "Flu", 1)
    entry.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=f"Data_Entry_2017.csv:2: unknown finding.*Flu.*{name}"):
        load_dataset("chestx-ray14", root, allow_missing=True)


# --- EyePACS --------------------------------------------------------------------------------

def test_eyepacs_official_split_and_pairs(synth) -> None:
    root = synth("eyepacs")
    ds = validate_dataset("eyepacs", root, progress=False)
    names = tuple(ds.info.class_names)
    # train: 6 per grade; test (retinopathy_solution.csv): max(4, 6 // 2) = 4 per grade
    assert ds.counts() == {"train": dict.fromkeys(names, 6), "test": dict.fromkeys(names, 4)}
    # same-grade pairs: 5 * (6 - 2) // 2 = 10 in train, 5 * (4 - 2) // 2 = 5 in test
    assert len(ds.pairs) == 15
    for left, right in ds.pairs:
        a, b = ds.records[left], ds.records[right]
        assert (a.eye, b.eye) == ("left", "right") and a.patient == b.patient and a.label == b.label
    # every other patient with both eyes has two different grades
    eyes: dict[str, list] = {}
    for r in ds.records:
        eyes.setdefault(r.patient, []).append(r)
    both = [v for v in eyes.values() if len(v) == 2]
    assert len(both) == 25 and sum(v[0].label != v[1].label for v in both) == 10
    assert ds.info.headline_metric == "mean_per_class_accuracy" and ds.info.fewshot_way == 5
    assert load_dataset("eyepacs", root, split="paper").records == ds.records


def test_eyepacs_without_test_labels(synth, tmp_path: Path) -> None:
    root = shutil.copytree(synth("eyepacs"), tmp_path / "eyepacs")
    (root / "retinopathy_solution.csv").unlink()
    ds = load_dataset("eyepacs", root)
    assert len(ds) == 30 and {r.split for r in ds.records} == {"train", "test"}
    _patients_disjoint(ds)
    with pytest.raises(DatasetError, match="retinopathy_solution.csv"):
        load_dataset("eyepacs", root, split="paper")


def test_eyepacs_missing_and_renamed_image_folder(synth, tmp_path: Path) -> None:
    root = shutil.copytree(synth("eyepacs"), tmp_path / "eyepacs")
    (root / "retinopathy_solution.csv").unlink()
    shutil.rmtree(root / "test")
    (root / "train").rename(root / "sample")
    victims = sorted((root / "sample").iterdir())[:3]
    for v in victims:
        v.unlink()
    with pytest.raises(DatasetError) as err:
        load_dataset("eyepacs", root)
    assert "3 problem(s)" in str(err.value) and victims[0].stem in str(err.value)
    assert "--dataset-option eyepacs.allow_missing=true" in str(err.value)  # the CLI's spelling
    assert "--skip-bad" in str(err.value)
    ds = load_dataset("eyepacs", root, allow_missing=True)
    assert len(ds) == 27 and len(ds.problems) == 1 and "3 of 30" in ds.problems[0]
    assert load_dataset("eyepacs", root, images="sample", allow_missing=True).records == ds.records
    (root / "other").mkdir()
    shutil.copy(next((root / "sample").iterdir()), root / "other")
    with pytest.raises(DatasetError, match="pass images=FOLDER"):
        load_dataset("eyepacs", root, allow_missing=True)


def test_split_file_roundtrip_patient_level(synth, tmp_path: Path) -> None:
    root = synth("chexpert")
    ds = load_dataset("chexpert", root, seed=11)
    f = write_split_file(ds, tmp_path / "chexpert-split.csv")
    again = load_dataset("chexpert", root, split=str(f))
    assert [r.split for r in again.records] == [r.split for r in ds.records]
    assert again.pairs == ds.pairs


@pytest.mark.parametrize("name", ["chexpert", "chestx-ray14", "eyepacs"])
def test_large_info(name: str) -> None:
    info = DATASETS.get(name).info
    assert info.fewshot_pool == 10001 and info.citation and info.licence and info.layout
    assert info.in_domain == (name != "eyepacs")


def test_validate_skip_bad_reindexes_pairs(synth, tmp_path: Path) -> None:
    root = shutil.copytree(synth("eyepacs"), tmp_path / "eyepacs")
    full = load_dataset("eyepacs", root)
    left, right = full.pairs[0]
    Path(full.records[left].path).write_bytes(b"\xff\xd8 broken jpeg")
    broken_patient = full.records[left].patient
    with pytest.raises(DatasetError, match="cannot be read"):
        validate_dataset("eyepacs", root, progress=False)
    ds = validate_dataset("eyepacs", root, skip_bad=True, progress=False)
    assert len(ds) == len(full) - 1 and len(ds.pairs) == len(full.pairs) - 1
    assert any(Path(full.records[left].path).name in p for p in ds.problems)
    for a, b in ds.pairs:
        ra, rb = ds.records[a], ds.records[b]
        assert ra.patient == rb.patient != broken_patient and (ra.eye, rb.eye) == ("left", "right")


def test_eyepacs_explicit_test_labels(synth, tmp_path: Path) -> None:
    root = shutil.copytree(synth("eyepacs"), tmp_path / "eyepacs")
    solution = (root / "retinopathy_solution.csv").rename(tmp_path / "solution.csv")
    assert load_dataset("eyepacs", root).counts().keys() == {"train", "test"}
    ds = load_dataset("eyepacs", root, test_labels=str(solution))
    assert sum(r.split == "test" for r in ds.records) == 20 and ds.options["test_labels"] == "solution.csv"
    with pytest.raises(DatasetError, match="test labels file not found"):
        load_dataset("eyepacs", root, test_labels=str(tmp_path / "nope.csv"))
