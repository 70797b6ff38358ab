"""The small official datasets on synthetic copies in their exact layouts: Shenzhen, Montgomery,
iChallenge-PM, iChallenge-AMD, BACH. Counts are checked exactly per split and class."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import lazy_synthetic_copies
from medxfer.data import DATASETS, DatasetError, load_dataset
from medxfer.data.validate import validate_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory):
    """Lazily written synthetic copies (n_per_class=5, 32 px), one per dataset per module."""
    return lazy_synthetic_copies(tmp_path_factory.mktemp("synthetic"), n_per_class=5, size=32, seed=1)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", ["shenzhen", "montgomery"])
def test_tb_filename_labels_counts_and_split(synth, name: str) -> None:
    root = synth(name)
    ds = validate_dataset(name, root, progress=False)
    # 5 + 5 images; stratified 80/20 -> 1 test image per class
    assert ds.counts() == {"train": {"normal": 4, "tuberculosis": 4}, "test": {"normal": 1, "tuberculosis": 1}}
    assert ds.info.in_domain and ds.info.fewshot_way == 2 and ds.pairs is None
    names = [Path(r.path).name for r in ds.records]
    assert all(n.endswith(f"_{r.label}.png") for n, r in zip(names, ds.records))
    # the parent folder works too, and the split is reproducible
    again = load_dataset(name, root.parent)
    assert [(r.path, r.split) for r in again.records] == [(r.path, r.split) for r in ds.records]


def test_tb_paper_split_is_image_level_80_20(synth) -> None:
    ds = load_dataset("shenzhen", synth("shenzhen"), split="paper")
    assert sum(r.split == "train" for r in ds.records) == 8 and len(ds) == 10
    assert ds.options["split"] == "paper"


def test_tb_metadata_labels_follow_findings_text(synth, tmp_path: Path) -> None:
    top = _copy(synth("shenzhen").parent, tmp_path / "sz")
    meta = top / "shenzhen_metadata.csv"
    lines = meta.read_text().splitlines()
    # make one TB-suffixed image "normal" by its text, and one normal image abnormal
    lines = [ln.replace("PTB in the right upper field", "normal") if "CHNCXR_0006_1" in ln else ln for ln in lines]
    lines = [ln.replace(",normal", ",nodule left apex") if "CHNCXR_0001_0" in ln else ln for ln in lines]
    meta.write_text("\n".join(lines) + "\n")
    by_file = load_dataset("shenzhen", top / "ChinaSet_AllFiles")
    by_meta = load_dataset("shenzhen", top / "ChinaSet_AllFiles", labels="metadata")
    lab = {Path(r.path).name: r.label for r in by_meta.records}
    assert lab["CHNCXR_0006_1.png"] == 0 and lab["CHNCXR_0001_0.png"] == 1
    assert sum(lab.values()) == 5
    assert by_meta.fingerprint() != by_file.fingerprint()
    # an image without a metadata row is a clear error naming it
    meta.write_text("\n".join(ln for ln in lines if "CHNCXR_0003_0" not in ln) + "\n")
    with pytest.raises(DatasetError, match="CHNCXR_0003_0.png"):
        load_dataset("shenzhen", top / "ChinaSet_AllFiles", labels="metadata")
    (top / "shenzhen_metadata.csv").unlink()
    with pytest.raises(DatasetError, match="metadata CSV"):
        load_dataset("shenzhen", top / "ChinaSet_AllFiles", labels="metadata")


def test_tb_bad_file_name_is_reported(synth, tmp_path: Path) -> None:
    top = _copy(synth("montgomery"), tmp_path / "MontgomerySet")
    shutil.copy(top / "CXR_png" / "MCUCXR_0001_0.png", top / "CXR_png" / "MCUCXR_0001_copy.png")
    with pytest.raises(DatasetError, match="MCUCXR_0001_copy.png: unexpected file name"):
        load_dataset("montgomery", top)
    ds = load_dataset("montgomery", top, skip_bad=True)
    assert len(ds) == 10 and any("MCUCXR_0001_copy.png" in p for p in ds.problems)
    with pytest.raises(DatasetError, match="CXR_png"):
        load_dataset("montgomery", tmp_path)


def test_pm_default_uses_validation_as_test(synth) -> None:
    ds = validate_dataset("ichallenge-pm", synth("ichallenge-pm"), progress=False)
    # training: 5 P (PM) + 5 H + 5 N (non-PM); validation (xlsx labels): 5 PM + 5 non-PM
    assert ds.counts() == {"train": {"non-PM": 10, "PM": 5}, "test": {"non-PM": 5, "PM": 5}}
    assert ds.options["validation"] == "PM_Label_and_Fovea_Location.xlsx"
    first = {Path(r.path).name[0]: r.label for r in ds.records if r.split == "train"}
    assert first == {"P": 1, "H": 0, "N": 0}


def test_pm_label_rules_and_paper_split(synth) -> None:
    root = synth("ichallenge-pm")
    compat = load_dataset("ichallenge-pm", root, labels="normal_vs_rest")
    assert compat.info.class_names == ("normal", "myopia")
    # validation left out (its labels cannot say normal vs high myopia); 80/20 of the training
    assert compat.counts() == {"train": {"normal": 4, "myopia": 8}, "test": {"normal": 1, "myopia": 2}}
    assert any("validation images left out" in p for p in compat.problems)
    letters = {Path(r.path).name[0]: r.label for r in compat.records}
    assert letters == {"P": 1, "H": 1, "N": 0}
    paper = load_dataset("ichallenge-pm", root, split="paper")
    assert len(paper) == 15 and sum(r.split == "train" for r in paper.records) == 12
    no_val = load_dataset("ichallenge-pm", root, val_labels="none")
    assert len(no_val) == 15


def test_pm_validation_label_errors_name_row(synth, tmp_path: Path) -> None:
    root = _copy(synth("ichallenge-pm"), tmp_path / "pm")
    labels = root / "labels.csv"
    labels.write_text("ID,imgName,Label,Fovea_X,Fovea_Y\n1,V0001.jpg,1,1,1\n2,V0002.jpg,maybe,1,1\n"
                      "3,V0999.jpg,0,1,1\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("ichallenge-pm", root, val_labels=str(labels))
    assert f"{labels}:3: unknown Label 'maybe'" in str(err.value)
    assert f"{labels}:4: image file not found" in str(err.value)
    ds = load_dataset("ichallenge-pm", root, val_labels=str(labels), skip_bad=True)
    assert ds.counts()["test"] == {"non-PM": 0, "PM": 1}
    assert len(ds.problems) == 2 and all(p.startswith("skipped: ") for p in ds.problems)


def test_amd_counts_and_letter_check(synth, tmp_path: Path) -> None:
    ds = validate_dataset("ichallenge-amd", synth("ichallenge-amd"), progress=False)
    assert ds.counts() == {"train": {"Non-AMD": 4, "AMD": 4}, "test": {"Non-AMD": 1, "AMD": 1}}
    assert load_dataset("ichallenge-amd", synth("ichallenge-amd") / "Training400").records == ds.records
    root = _copy(synth("ichallenge-amd"), tmp_path / "amd")
    shutil.move(root / "Training400" / "AMD" / "A0002.jpg", root / "Training400" / "Non-AMD" / "A0002.jpg")
    with pytest.raises(DatasetError, match="A0002.jpg: file name does not start with 'N'"):
        load_dataset("ichallenge-amd", root)


def test_bach_official_layout(synth, tmp_path: Path) -> None:
    root = synth("bach")
    assert sorted(p.name for p in (root / "Photos").iterdir())[:1] == ["Benign"]
    assert next((root / "Photos" / "Normal").iterdir()).suffix == ".tif"
    ds = validate_dataset("bach", root, progress=False)
    assert ds.info.class_names == ("Normal", "Benign", "InSitu", "Invasive")
    assert ds.counts() == {"train": dict.fromkeys(ds.info.class_names, 4),
                           "test": dict.fromkeys(ds.info.class_names, 1)}
    assert ds.options["layout"] == "official"
    with Image.open(ds.records[0].path) as im:
        assert im.size == (42, 32) and im.mode == "RGB"
    # the ground truth must agree with the folders, and every CSV row needs its image
    bad = _copy(root, tmp_path / "ICIAR2018_BACH_Challenge")
    gt = bad / "Photos" / "microscopy_ground_truth.csv"
    gt.write_text(gt.read_text().replace("b002.tif,Benign", "b002.tif,Invasive") + "x001.tif,Normal\n"
                  + "y001.tif,Malignant\n")
    with pytest.raises(DatasetError) as err:
        load_dataset("bach", bad)
    msg = str(err.value)
    assert "b002.tif: in folder Benign/ but" in msg and f"{gt}:7 says Invasive" in msg
    assert f"{gt}:21: image file not found" in msg and f"{gt}:22: unknown class 'Malignant'" in msg
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="not a BACH folder"):
        load_dataset("bach", tmp_path / "empty")


def test_bach_converted_layout_and_generic_folder_route(tmp_path: Path) -> None:
    for cls in ("normal", "benign", "insitu", "invasive"):
        for i in range(3):
            path = tmp_path / "dataset" / f"{cls}_jpg" / f"{cls[0]}{i:03d}.jpeg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 50 * i, np.uint8)).save(path)
    (tmp_path / "dataset" / "label.txt").write_text("notes")
    ds = load_dataset("bach", tmp_path)
    assert ds.options["layout"] == "converted"
    assert {Path(r.path).parent.name: r.label for r in ds.records} == {
        "normal_jpg": 0, "benign_jpg": 1, "insitu_jpg": 2, "invasive_jpg": 3}
    generic = load_dataset("folder", tmp_path / "dataset", name="bach-jpg")
    assert generic.info.class_names == ("benign_jpg", "insitu_jpg", "invasive_jpg", "normal_jpg")
    with pytest.raises(ValueError, match="layout"):
        load_dataset("bach", tmp_path, layout="zip")


@pytest.mark.parametrize("name", ["shenzhen", "montgomery", "ichallenge-pm", "ichallenge-amd", "bach"])
def test_info_fields(name: str) -> None:
    info = DATASETS.get(name).info
    assert info.expected_images in {662, 138, 400}
    assert info.citation and info.licence != "unknown" and info.layout
    assert info.fewshot_way == 2 and info.fewshot_pool is None and info.headline_metric == "accuracy"
    assert info.in_domain == (info.modality == "chest-xray")
