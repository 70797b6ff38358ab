"""BACH (ICIAR 2018) breast histology microscopy: Normal 0, Benign 1, InSitu 2, Invasive 3.

Official layout (``layout="official"``): ``ICIAR2018_BACH_Challenge/Photos/<Class>/*.tif``
with ``Photos/microscopy_ground_truth.csv`` (``name.tif,Class`` rows, no header). The label
is the folder; when the ground-truth CSV is present every image must agree with it.

Converted layout (``layout="converted"``): ``dataset/{normal,benign,insitu,invasive}_jpg/*.jpeg``
(a common JPEG re-encoding, e.g. the shared real sample). ``layout="auto"`` picks whichever
is present. Either way the class order is BACH's (the generic ``folder`` route would sort
the class folders alphabetically instead: benign, insitu, invasive, normal).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medxfer.data.build import default_split_fn, finish_dataset
from medxfer.data.common import Issues, is_image, read_csv_rows
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DatasetAdapter, DatasetOptions, register_dataset
from medxfer.data.splits import paper_80_20
from medxfer.typed import setting

CLASSES = ("Normal", "Benign", "InSitu", "Invasive")
INFO = DatasetInfo(
    name="bach", display_name="BACH", task="multiclass", class_names=CLASSES, modality="histology", in_domain=False,
    expected_images=400, licence="CC BY-NC-ND 4.0",
    citation=("Aresta G, Araujo T, Kwok S, et al. BACH: Grand challenge on breast cancer histology "
              "images. Medical Image Analysis 56 (2019) 122-139."),
    fewshot_way=2, layout="ICIAR2018_BACH_Challenge/ (with Photos/{Normal,Benign,InSitu,Invasive}/*.tif)")


@dataclass(frozen=True)
class BachOptions(DatasetOptions):
    layout: Literal["auto", "official", "converted"] = setting("auto", help="which layout to read")


def _photos_dir(root: Path) -> Path | None:
    for base in (root, root / "Photos", root / "ICIAR2018_BACH_Challenge" / "Photos"):
        if all((base / c).is_dir() for c in CLASSES):
            return base
    return None


def _converted_dir(root: Path) -> Path | None:
    for base in (root, root / "dataset"):
        if all((base / f"{c.lower()}_jpg").is_dir() for c in CLASSES):
            return base
    return None


def _read_official(photos: Path, issues: Issues) -> list[Record]:
    truth: dict[str, tuple[str, str]] = {}
    gt = photos / "microscopy_ground_truth.csv"
    if gt.is_file():
        for line, row in read_csv_rows(gt, [], header=False, fieldnames=["name", "label"]):
            if row.get("label") not in CLASSES:
                issues.bad(f"{gt}:{line}: unknown class {row.get('label')!r} (expected one of "
                           f"{', '.join(CLASSES)})", kind="unknown label")
                continue
            truth[row["name"]] = (row["label"], f"{gt}:{line}")
    records: list[Record] = []
    seen: set[str] = set()
    for label, cls in enumerate(CLASSES):
        for p in sorted((photos / cls).iterdir()):
            if p.name.startswith(".") or not p.is_file() or not is_image(p):
                continue
            seen.add(p.name)
            if p.name in truth and truth[p.name][0] != cls:
                issues.bad(f"{p}: in folder {cls}/ but {truth[p.name][1]} says {truth[p.name][0]}",
                           kind="label conflict")
                continue
            records.append(Record(path=str(p.resolve()), label=label))
    for name, (cls, where) in sorted(truth.items(), key=lambda kv: kv[1][1]):
        if name not in seen:
            issues.bad(f"{where}: image file not found: {photos / cls / name}", kind="missing file")
    if not gt.is_file():
        issues.note(f"{gt} not found: labels taken from the class folders only")
    return records


def _read_converted(base: Path) -> list[Record]:
    records: list[Record] = []
    for label, cls in enumerate(CLASSES):
        for p in sorted((base / f"{cls.lower()}_jpg").iterdir()):
            if p.is_file() and is_image(p):
                records.append(Record(path=str(p.resolve()), label=label))
    return records


def load_bach(root: Path, o: BachOptions, skip_bad: bool = False) -> Dataset:
    """Read BACH in its official or converted layout (see the module docstring)."""
    layout = o.layout
    issues = Issues("bach", skip_bad)
    photos = _photos_dir(root) if layout in ("auto", "official") else None
    converted = _converted_dir(root) if layout in ("auto", "converted") and photos is None else None
    if photos is not None:
        records, base, used = _read_official(photos, issues), photos, "official"
    elif converted is not None:
        records, base, used = _read_converted(converted), converted, "converted"
    else:
        want = {"official": "Photos/{Normal,Benign,InSitu,Invasive}/",
                "converted": "dataset/{normal,benign,insitu,invasive}_jpg/"}
        expected = " or ".join(v for k, v in want.items() if layout in ("auto", k))
        raise DatasetError(f"{root}: not a BACH folder (expected {expected})")
    return finish_dataset(INFO, records, base, issues, {"layout": used, "seed": o.seed}, split=o.split,
                          default=default_split_fn(o.seed), paper=paper_80_20)


register_dataset(DatasetAdapter(info=INFO, loader=load_bach, options=BachOptions), aliases=("iciar2018",))
