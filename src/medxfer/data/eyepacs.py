"""EyePACS (Kaggle Diabetic Retinopathy Detection 2015): retinopathy grade 0-4.

Layout: ``trainLabels.csv`` (``image,level``; ``image`` is ``<patient>_<left|right>`` without
extension) beside ``train/<image>.jpeg``. Images are matched by file stem, so the images
folder may hold a subset (option ``images`` names it; by default ``train/``, or the only
folder of JPEGs). Rows without an image are errors unless ``allow_missing=True``, which
records one summary line in ``problems`` instead.

Splits: with the released test labels (``retinopathy_solution.csv``, ``image,level,Usage``,
images in ``test/``; option ``test_labels``) the default and ``paper`` split is the official
Kaggle train/test split; without them the default is a seeded stratified patient-level 80/20
split of the training images (``paper`` then is an error: it needs the test labels).

Pairs: the left and right eye of one patient when both are present with the same grade.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from medxfer.data.build import default_split_fn, finish_dataset
from medxfer.data.common import Issues, index_by_stem, read_csv_rows
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DatasetAdapter, DatasetOptions, register_dataset
from medxfer.typed import setting

CLASSES = ("0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative DR")
INFO = DatasetInfo(
    name="eyepacs", display_name="EyePACS", task="multiclass", class_names=CLASSES, modality="fundus", in_domain=False,
    expected_images=35126, licence="Kaggle competition rules (non-commercial research use)",
    citation=("Cuadros J, Bresnick G. EyePACS: an adaptable telemedicine system for diabetic retinopathy "
              "screening. J Diabetes Sci Technol. 2009;3(3):509-516. Kaggle Diabetic Retinopathy "
              "Detection (2015)."),
    fewshot_way=5, fewshot_pool=10001, headline_metric="mean_per_class_accuracy",
    layout="the folder holding trainLabels.csv and train/ (test/ + retinopathy_solution.csv optional)")


@dataclass(frozen=True)
class EyepacsOptions(DatasetOptions):
    images: str | None = setting(None, help="folder of the training images (default train/)")
    allow_missing: bool = setting(False, help="report labelled rows without an image instead of failing")
    test_labels: str | None = setting("auto", help="auto (retinopathy_solution.csv + test/), none, or a CSV path")
NAME = re.compile(r"^(\w+?)_(left|right)$")
JPEG_EXTS = (".jpeg", ".jpg", ".png", ".tif", ".tiff")


def _images_dir(root: Path, images: str | None) -> Path:
    if images is not None:
        p = Path(images).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_dir():
            raise DatasetError(f"{p}: images folder not found (option images={images!r})")
        return p
    if (root / "train").is_dir():
        return root / "train"
    with_jpegs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name != "test" and not d.name.startswith(".")
                  and any(f.suffix.lower() in JPEG_EXTS for f in d.iterdir())]
    if len(with_jpegs) == 1:
        return with_jpegs[0]
    if any(f.suffix.lower() in JPEG_EXTS for f in root.iterdir()):
        return root
    found = ", ".join(d.name for d in with_jpegs) or "none"
    raise DatasetError(f"{root}: cannot tell which folder holds the training images (folders with "
                       f"JPEGs: {found}); expected train/ or pass images=FOLDER")


def _read_labels(csv_file: Path, image_dir: Path, split: str, allow_missing: bool,
                 issues: Issues) -> list[Record]:
    index = index_by_stem([image_dir], JPEG_EXTS)
    records: list[Record] = []
    missing: list[str] = []
    listed: set[str] = set()
    for line, row in read_csv_rows(csv_file, ["image", "level"]):
        where = f"{csv_file}:{line}"
        m = NAME.match(row["image"])
        if m is None:
            issues.bad(f"{where}: image name {row['image']!r} is not <patient>_<left|right>", kind="bad row")
            continue
        if row["level"] not in ("0", "1", "2", "3", "4"):
            issues.bad(f"{where}: unknown level {row['level']!r} for {row['image']} (expected 0-4)",
                       kind="unknown label")
            continue
        listed.add(row["image"])
        path = index.get(row["image"])
        if path is None:
            issues.missing_file(f"{where}: no image {row['image']}.jpeg in {image_dir}", row["image"],
                                allow_missing, missing, hint="if only part of the images is present, pass --dataset-option "
                                     "eyepacs.allow_missing=true (Python: allow_missing=True)")
            continue
        records.append(Record(path=str(path), label=int(row["level"]), split=split,
                              patient=m.group(1), eye=m.group(2)))
    if missing:
        examples = ", ".join(missing[:5])
        issues.note(f"{csv_file.name}: {len(missing)} of {len(missing) + len(records)} labelled images are not "
                    f"in {image_dir} (allow_missing=True), e.g. {examples}")
    unlisted = sorted(set(index) - listed)
    if unlisted:
        issues.note(f"{image_dir}: {len(unlisted)} image(s) have no row in {csv_file.name} and are ignored, "
                    f"e.g. {', '.join(unlisted[:5])}")
    return records


def eye_pairs(records: list[Record]) -> list[tuple[int, int]]:
    """(left, right) record indices of one patient's eyes with the same grade."""
    eyes: dict[str, dict[str, int]] = defaultdict(dict)
    for i, r in enumerate(records):
        if r.patient is not None and r.eye is not None:
            eyes[r.patient].setdefault(r.eye, i)
    pairs = []
    for patient in sorted(eyes, key=lambda p: (len(p), p)):
        e = eyes[patient]
        if "left" in e and "right" in e and records[e["left"]].label == records[e["right"]].label:
            pairs.append((e["left"], e["right"]))
    return pairs


def load_eyepacs(root: Path, o: EyepacsOptions, skip_bad: bool = False) -> Dataset:
    """Read EyePACS (see the module docstring)."""
    images, allow_missing, test_labels, split, seed = o.images, o.allow_missing, o.test_labels, o.split, o.seed
    if root.is_file():
        root = root.parent
    labels_csv = root / "trainLabels.csv"
    if not labels_csv.is_file():
        hint = " (unzip trainLabels.csv.zip first)" if (root / "trainLabels.csv.zip").exists() else ""
        raise DatasetError(f"{root}: trainLabels.csv not found{hint}; point at the folder holding it and train/")
    issues = Issues("eyepacs", skip_bad)
    image_dir = _images_dir(root, images)
    records = _read_labels(labels_csv, image_dir, "train", allow_missing, issues)
    solution: Path | None = None
    if test_labels == "auto":
        solution = root / "retinopathy_solution.csv" if (root / "retinopathy_solution.csv").is_file() else None
    elif test_labels not in (None, "none"):
        solution = Path(test_labels).expanduser()
        if not solution.is_file():
            raise DatasetError(f"{solution}: test labels file not found (option test_labels)")
    if solution is not None:
        test_dir = root / "test"
        if not test_dir.is_dir():
            raise DatasetError(f"{root}: {solution.name} given but no test/ folder of images")
        records += _read_labels(solution, test_dir, "test", allow_missing, issues)

    def official(recs: list[Record]) -> list[str]:
        if solution is None:
            raise DatasetError(f"{root}: split='paper' is the official Kaggle train/test split and needs "
                               f"the released test labels (retinopathy_solution.csv) and test/ images")
        return [r.split for r in recs]

    def default(recs: list[Record]) -> list[str]:
        return official(recs) if solution is not None else default_split_fn(seed)(recs)

    options = {"images": image_dir.name, "allow_missing": allow_missing,
               "test_labels": solution.name if solution else None, "seed": seed}
    return finish_dataset(INFO, records, root, issues, options, split=split, default=default, paper=official,
                          pairs=eye_pairs)


register_dataset(DatasetAdapter(info=INFO, loader=load_eyepacs, options=EyepacsOptions),
                 aliases=("kaggle-dr", "diabetic-retinopathy"))
