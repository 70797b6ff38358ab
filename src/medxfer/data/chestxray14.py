"""NIH ChestX-ray14: seven single-finding classes (5-way few-shot episodes).

Layout: ``Data_Entry_2017.csv`` (or ``Data_Entry_2017_v2020.csv``; columns ``Image Index``,
``Finding Labels`` with ``|`` separators, ``Patient ID``, ``View Position`` ...; the 2017 file
has an unquoted ``OriginalImage[Width,Height]`` header and a trailing comma) beside the
images in ``images_001/images/ ... images_012/images/`` or one ``images/`` folder, and the
official patient-level ``train_val_list.txt`` / ``test_list.txt``.

Label rule: keep images with exactly one finding among the seven classes; "No Finding",
Pneumonia, the other findings and multi-label images are dropped (counted in ``problems``).
Option ``allow_missing`` reports labelled rows whose image is absent (a partial download)
instead of failing.

Splits: ``"default"``: the official lists when both are present (train_val -> train), else a
seeded stratified patient-level 80/20 split. ``"paper"``: image-level 80/20 with seed 42.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medxfer.data.build import default_split_fn, finish_dataset
from medxfer.data.common import Issues, read_csv_rows
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DatasetAdapter, DatasetOptions, register_dataset
from medxfer.data.splits import paper_80_20
from medxfer.typed import setting

CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")
FINDINGS = frozenset(CLASSES) | {"Consolidation", "Edema", "Emphysema", "Fibrosis", "Hernia",
                                 "Pleural_Thickening", "Pneumonia", "No Finding"}
ENTRY_FILES = ("Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv")
INFO = DatasetInfo(
    name="chestx-ray14", display_name="ChestX-ray14", task="multiclass", class_names=CLASSES, modality="chest-xray", in_domain=True,
    expected_images=112120, licence="NIH Clinical Center public release (no restrictions; cite and acknowledge)",
    citation=("Wang X, Peng Y, Lu L, Lu Z, Bagheri M, Summers RM. ChestX-ray8: Hospital-scale chest X-ray "
              "database and benchmarks on weakly-supervised classification and localization of common "
              "thorax diseases. CVPR 2017."),
    fewshot_way=5, fewshot_pool=10001,
    layout="the folder holding Data_Entry_2017.csv and images_001/ ... images_012/ (or images/)")


@dataclass(frozen=True)
class ChestXray14Options(DatasetOptions):
    allow_missing: bool = setting(False, help="report labelled rows without an image instead of failing")


def image_index(base: Path) -> dict[str, Path]:
    """Image file name -> path over ``images_NNN/images/``, ``images_NNN/`` and ``images/``."""
    folders = [p for d in sorted(base.glob("images_*")) if d.is_dir()
               for p in ((d / "images") if (d / "images").is_dir() else d,)]
    if (base / "images").is_dir():
        folders.append(base / "images")
    index: dict[str, Path] = {}
    for folder in folders:
        for entry in folder.iterdir():
            if entry.suffix.lower() == ".png":
                index.setdefault(entry.name, entry)
    return index


def _read_list(path: Path) -> set[str]:
    return {ln.strip() for ln in path.read_text().splitlines() if ln.strip()}


def load_chestxray14(root: Path, o: ChestXray14Options, skip_bad: bool = False) -> Dataset:
    """Read ChestX-ray14 (see the module docstring)."""
    allow_missing, split, seed = o.allow_missing, o.split, o.seed
    entry = next((root / f for f in ENTRY_FILES if (root / f).is_file()), None)
    if entry is None:
        raise DatasetError(f"{root}: {' or '.join(ENTRY_FILES)} not found; point at the folder holding it "
                           f"and the images_001/ ... folders")
    index = image_index(root)
    if not index:
        raise DatasetError(f"{root}: no PNG images in images_001/images/ ... or images/")
    issues = Issues("chestx-ray14", skip_bad)
    dropped: Counter[str] = Counter()
    missing: list[str] = []
    records: list[Record] = []
    for line, row in read_csv_rows(entry, ["Image Index", "Finding Labels", "Patient ID"]):
        where = f"{entry}:{line}"
        findings = [f.strip() for f in row["Finding Labels"].split("|") if f.strip()]
        unknown = [f for f in findings if f not in FINDINGS]
        if unknown or not findings:
            issues.bad(f"{where}: unknown finding(s) {unknown or row['Finding Labels']!r} for {row['Image Index']}",
                       kind="unknown label")
            continue
        if len(findings) > 1:
            dropped["multi-label"] += 1
            continue
        if findings[0] not in CLASSES:
            dropped[findings[0]] += 1
            continue
        path = index.get(row["Image Index"])
        if path is None:
            issues.missing_file(f"{where}: image {row['Image Index']} not found in the images folders",
                                row["Image Index"], allow_missing, missing,
                                hint="if only some images_NNN archives are unpacked, pass --dataset-option "
                                     "chestx-ray14.allow_missing=true (Python: allow_missing=True)")
            continue
        records.append(Record(path=str(path.resolve()), label=CLASSES.index(findings[0]),
                              patient=row["Patient ID"].lstrip("0") or "0",
                              view=row.get("View Position") or None))
    if dropped:
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(dropped.items()))
        issues.note(f"{sum(dropped.values())} row(s) dropped by the single-finding label rule ({parts})")
    if missing:
        issues.note(f"{len(missing)} labelled image(s) not present (allow_missing=True), e.g. {', '.join(missing[:5])}")
    train_list, test_list = root / "train_val_list.txt", root / "test_list.txt"
    official = train_list.is_file() and test_list.is_file()

    def default(recs: list[Record]) -> list[str]:
        if not official:
            return default_split_fn(seed)(recs)
        train_names, test_names = _read_list(train_list), _read_list(test_list)
        out: list[str] = []
        for r in recs:
            name = Path(r.path).name
            if name in test_names:
                out.append("test")
            else:
                if name not in train_names:
                    issues.note(f"{name} is in neither {train_list.name} nor {test_list.name}: put in train")
                out.append("train")
        return out

    options = {"allow_missing": allow_missing, "official_lists": official, "entry_file": entry.name, "seed": seed}
    return finish_dataset(INFO, records, root, issues, options, split=split, default=default, paper=paper_80_20)


register_dataset(DatasetAdapter(info=INFO, loader=load_chestxray14, options=ChestXray14Options),
                 aliases=("chestxray14", "nih-cxr14", "chestx-ray8"))
