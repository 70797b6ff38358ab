"""CheXpert (v1.0 and v1.0-small): Pleural Effusion vs rest.

Layout: ``CheXpert-v1.0[-small]/train.csv`` and ``valid.csv`` with a ``Path`` column like
``CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`` (resolved against the
folder the user points at, whatever it is called), ``Frontal/Lateral``, ``AP/PA`` and 14
observation columns holding ``1.0``, ``0.0``, ``-1.0`` (uncertain) or blank.

Label: positive = Pleural Effusion 1; everything else negative (blank = negative).
Option ``uncertain`` decides -1 for every protocol alike: ``"u_ones"`` (default, positive),
``"u_zeros"`` (negative), ``"ignore"`` (the image is dropped; counted in ``problems``).
Option ``views``: ``"all"`` (default), ``"frontal"`` or ``"lateral"``.

Splits: ``"default"``: train.csv rows seeded stratified patient-level 80/20 train/test; the
validation split follows option ``valid``: ``"carve"`` (default, as the paper and PROTOCOL.md:
a seeded, patient-level, stratified 20% of the training patients; valid.csv is not read),
``"val"`` (the official valid.csv, 234 radiologist-labelled images, as validation: about 3
points of sampling error on accuracy), ``"test"`` (valid.csv as the test set, common in the
CheXpert literature; train.csv then gives train and a carved validation only). ``"paper"``:
train.csv only, rows permuted with seed 42 and the first 134,049 of the full file's 223,414
rows train, the rest test (for a file of another length the same fraction; computed on the
whole file before any filtering, so the assignment of a row never depends on the options).

Pairs: each lateral image with the (first listed) frontal image of the same patient and study.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medxfer.data.build import default_split_fn, finish_dataset
from medxfer.data.common import Issues, join_inside, read_csv_rows
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DatasetAdapter, DatasetOptions, register_dataset
from medxfer.data.splits import shuffled_split
from medxfer.typed import setting

CLASSES = ("no pleural effusion", "pleural effusion")
TARGET = "Pleural Effusion"
OBSERVATIONS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
                "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
                "Pleural Other", "Fracture", "Support Devices")
HEADER = ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA") + OBSERVATIONS
PAPER_TRAIN_ROWS, OFFICIAL_TRAIN_ROWS = 134049, 223414
VALUES = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "": 0, "-1.0": -1, "-1": -1}
UNCERTAIN = {"u_ones": 1, "u_zeros": 0, "ignore": None}
STUDY = re.compile(r"(patient\d+)/(study\d+)/")

INFO = DatasetInfo(
    name="chexpert", display_name="CheXpert", task="binary", class_names=CLASSES, modality="chest-xray", in_domain=True,
    expected_images=224316, licence="Stanford University CheXpert Dataset Research Use Agreement",
    citation=("Irvin J, Rajpurkar P, Ko M, et al. CheXpert: A large chest radiograph dataset with "
              "uncertainty labels and expert comparison. AAAI 2019."),
    fewshot_way=2, fewshot_pool=10001,
    layout="CheXpert-v1.0-small/ or CheXpert-v1.0/ (with train.csv, valid.csv, train/, valid/)")


@dataclass(frozen=True)
class ChexpertOptions(DatasetOptions):
    uncertain: Literal["u_ones", "u_zeros", "ignore"] = setting("u_ones", help="uncertain (-1) labels: "
                                                                "positive, negative or dropped")
    views: Literal["all", "frontal", "lateral"] = setting("all", help="which views to keep")
    valid: Literal["carve", "val", "test"] = setting(
        "carve", help="validation carved from the training patients (carve), valid.csv as validation (val), "
        "or valid.csv as the test set (test)")


def _base(root: Path) -> Path:
    if (root / "train.csv").is_file():
        return root
    for name in ("CheXpert-v1.0-small", "CheXpert-v1.0"):
        if (root / name / "train.csv").is_file():
            return root / name
    raise DatasetError(f"{root}: train.csv not found; point at the unpacked CheXpert-v1.0-small/ "
                       f"(or CheXpert-v1.0/) folder")


def _resolve(base: str, rel: str, where: str) -> str:
    """The absolute image path for a ``Path`` value, refusing values that leave the folder."""
    parts = rel.replace("\\", "/").split("/")
    if parts and parts[0].lower().startswith("chexpert"):
        parts = parts[1:]  # the release's own folder name, whatever the user renamed it to
    path = join_inside(base, "/".join(parts))
    if path is None:
        raise DatasetError(f"{where}: path {rel!r} escapes the dataset folder {base!r}")
    return path


def _read(csv_file: Path, base: Path, source: str, uncertain: str, views: str, issues: Issues,
          counters: dict[str, int]) -> tuple[list[Record], list[int]]:
    """Records of one CSV and, for each, its 0-based row position in the file."""
    records: list[Record] = []
    positions: list[int] = []
    base_str = str(base.resolve())
    counters[f"{source}_rows"] = 0
    for pos, (line, row) in enumerate(read_csv_rows(csv_file, ["Path", "Frontal/Lateral", TARGET])):
        counters[f"{source}_rows"] += 1
        where = f"{csv_file}:{line}"
        value = VALUES.get(row[TARGET])
        if value is None:
            issues.bad(f"{where}: unknown {TARGET} value {row[TARGET]!r} (expected 1.0, 0.0, -1.0 or blank)",
                       kind="unknown label")
            continue
        view = row["Frontal/Lateral"].lower()
        if view not in ("frontal", "lateral"):
            issues.bad(f"{where}: unknown Frontal/Lateral value {row['Frontal/Lateral']!r}", kind="unknown label")
            continue
        m = STUDY.search(row["Path"])
        if m is None:
            issues.bad(f"{where}: path {row['Path']!r} has no patientNNNNN/studyN/ part", kind="bad row")
            continue
        if views != "all" and view != views:
            continue
        if value == -1:
            counters["uncertain"] += 1
            label = UNCERTAIN[uncertain]
            if label is None:
                continue
        else:
            label = value
        try:
            path = _resolve(base_str, row["Path"], where)
        except DatasetError as exc:
            issues.bad(str(exc), kind="path outside the dataset folder")
            continue
        if not os.path.isfile(path):
            issues.bad(f"{where}: image file not found: {path}", kind="missing file")
            continue
        records.append(Record(path=path, label=label, split="val" if source == "valid" else "train",
                              patient=m.group(1), study=f"{m.group(1)}/{m.group(2)}", view=view))
        positions.append(pos)
    return records, positions


def study_pairs(records: list[Record]) -> list[tuple[int, int]]:
    """(lateral, frontal) record indices of one patient's study, the frontal looked up in the table."""
    frontal: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.view == "frontal" and r.study is not None:
            frontal.setdefault(r.study, i)
    return [(i, frontal[r.study]) for i, r in enumerate(records)
            if r.view == "lateral" and r.study is not None and r.study in frontal]


def load_chexpert(root: Path, o: ChexpertOptions, skip_bad: bool = False) -> Dataset:
    """Read CheXpert (see the module docstring for the options)."""
    uncertain, views, valid, split, seed = o.uncertain, o.views, o.valid, o.split, o.seed
    base = _base(root)
    issues = Issues("chexpert", skip_bad)
    counters = {"uncertain": 0}
    records, positions = _read(base / "train.csv", base, "train", uncertain, views, issues, counters)
    n_rows = counters["train_rows"]
    n_train = round(n_rows * PAPER_TRAIN_ROWS / OFFICIAL_TRAIN_ROWS)
    paper_of_row = shuffled_split(n_rows, n_train, seed=42)
    paper_splits = [paper_of_row[p] for p in positions]
    n_from_train = len(records)
    if valid != "carve" and split != "paper":
        if (base / "valid.csv").is_file():
            more, _ = _read(base / "valid.csv", base, "valid", uncertain, views, issues, counters)
            records += more
        else:
            raise DatasetError(f"{base / 'valid.csv'} not found (needed by --dataset-option chexpert.valid={valid}; "
                               f"the default valid=carve does not read it)")
    if counters["uncertain"]:
        action = {"u_ones": "counted positive", "u_zeros": "counted negative", "ignore": "dropped"}[uncertain]
        issues.note(f"{counters['uncertain']} image(s) with an uncertain (-1) {TARGET} label {action} "
                    f"(uncertain={uncertain!r})")

    def default(recs: list[Record]) -> list[str]:
        head = recs[:n_from_train]  # train.csv rows; the rest came from valid.csv
        out = default_split_fn(seed)(head) if head and valid != "test" else ["train"] * len(head)
        if valid != "val":  # carve validation from the training patients (seeded, patient-level)
            train = [i for i, s in enumerate(out) if s == "train"]
            carved = default_split_fn((seed, 1))([head[i] for i in train])
            for i, s in zip(train, carved):
                out[i] = "val" if s == "test" else "train"
        return out + ["test" if valid == "test" else "val"] * (len(recs) - len(out))

    def paper(recs: list[Record]) -> list[str]:
        return paper_splits  # valid.csv is not read in paper mode

    options = {"uncertain": uncertain, "views": views, "valid": valid, "seed": seed}
    return finish_dataset(INFO, records, base, issues, options, split=split, default=default, paper=paper,
                          pairs=study_pairs)


register_dataset(DatasetAdapter(info=INFO, loader=load_chexpert, options=ChexpertOptions),
                 aliases=("chexpert-small",))
