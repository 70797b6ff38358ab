"""Shenzhen and Montgomery tuberculosis chest X-rays (U.S. NLM), normal vs TB.

Official layout: ``ChinaSet_AllFiles/CXR_png/CHNCXR_0001_0.png`` and
``MontgomerySet/CXR_png/MCUCXR_0001_0.png`` (suffix ``_0`` normal, ``_1`` TB), with
``ClinicalReadings/*.txt``. The Kaggle re-uploads (``images/images/*.png`` with a
``*_metadata.csv`` of ``study_id,sex,age,findings``) are read too.

Option ``labels``: ``"filename"`` (default, the official suffix) or ``"metadata"`` (the
authors' rule: the metadata CSV's ``findings`` text, exactly "normal" = negative); option
``metadata`` gives the CSV path (default: found beside or above the image folder).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medxfer.data.build import default_split_fn, finish_dataset
from medxfer.data.common import Issues, find_table, read_table
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DatasetAdapter, DatasetOptions, register_dataset
from medxfer.data.splits import paper_80_20
from medxfer.typed import setting

CLASSES = ("normal", "tuberculosis")
CITATION = ("Jaeger S, Candemir S, Antani S, Wang YX, Lu PX, Thoma G. Two public chest X-ray datasets "
            "for computer-aided screening of pulmonary diseases. Quant Imaging Med Surg. 2014;4(6):475-477.")
LICENCE = "U.S. National Library of Medicine public release (free for research; cite Jaeger et al. 2014)"


@dataclass(frozen=True)
class TbOptions(DatasetOptions):
    labels: Literal["filename", "metadata"] = setting("filename", help="label from the file-name suffix or "
                                                      "from the metadata CSV's findings (the authors')")
    metadata: str | None = setting(None, help="the metadata CSV (default: found near the images)")


def _image_dir(root: Path, top: str) -> Path:
    for base in (root, root / top):
        for sub in ("CXR_png", "images/images", "images"):
            if (base / sub).is_dir():
                return base / sub
    raise DatasetError(f"{root}: no CXR_png/ folder found; point at the unpacked {top}/ folder "
                       f"(expected {top}/CXR_png/*.png)")


def _metadata_labels(csv_path: Path, issues: Issues) -> dict[str, tuple[int, str]]:
    out: dict[str, tuple[int, str]] = {}
    for line, row in read_table(csv_path, ["study_id", "findings"]):
        name = Path(row["study_id"]).name
        out[name] = (0 if row["findings"].strip().lower() == "normal" else 1, f"{csv_path}:{line}")
    return out


def _loader(name: str, top: str, prefix: str):
    pattern = re.compile(rf"^{prefix}_(\d{{4}})_([01])\.png$", re.IGNORECASE)

    def load(root: Path, o: TbOptions, skip_bad: bool = False) -> Dataset:
        labels, metadata, split, seed = o.labels, o.metadata, o.split, o.seed
        image_dir = _image_dir(root, top)
        base = image_dir.parent.parent if image_dir.name == "images" and image_dir.parent.name == "images" \
            else image_dir.parent
        issues = Issues(name, skip_bad)
        meta: dict[str, tuple[int, str]] = {}
        meta_file: Path | None = None
        if labels == "metadata":
            if metadata is not None:
                meta_file = Path(metadata).expanduser()
                if not meta_file.is_file():
                    raise DatasetError(f"{meta_file}: metadata CSV not found")
            else:
                search = [p for d in (base, base.parent, root) for p in sorted(d.glob("*metadata*.csv"))]
                meta_file = find_table(search, ["study_id", "findings"])
                if meta_file is None:
                    raise DatasetError(f"{root}: labels='metadata' needs a metadata CSV with columns "
                                       f"study_id,findings (none found near {base}); pass metadata=PATH")
            meta = _metadata_labels(meta_file, issues)
        records: list[Record] = []
        for p in sorted(image_dir.iterdir()):
            if p.name.startswith(".") or p.suffix.lower() != ".png":
                continue
            m = pattern.match(p.name)
            if m is None:
                issues.bad(f"{p}: unexpected file name (expected {prefix}_NNNN_0.png or _1.png)",
                           kind="unexpected file")
                continue
            label = int(m.group(2))
            if labels == "metadata":
                if p.name not in meta:
                    issues.bad(f"{p}: no row for {p.name} in {meta_file}", kind="no metadata row")
                    continue
                label = meta[p.name][0]
            records.append(Record(path=str(p.resolve()), label=label, patient=f"{prefix}_{m.group(1)}"))
        if labels == "metadata":
            have = {Path(r.path).name for r in records}
            for img, (_, where) in sorted(meta.items()):
                if img not in have:
                    issues.note(f"{where}: metadata row for {img} has no image in {image_dir}")
        options = {"labels": labels, "seed": seed}
        return finish_dataset(INFOS[name], records, base, issues, options, split=split,
                              default=default_split_fn(seed), paper=paper_80_20)

    return load


INFOS = {
    "shenzhen": DatasetInfo(
        name="shenzhen", display_name="Shenzhen-CXR", task="binary", class_names=CLASSES, modality="chest-xray", in_domain=True,
        expected_images=662, licence=LICENCE, citation=CITATION, fewshot_way=2,
        layout="ChinaSet_AllFiles/ (with CXR_png/CHNCXR_0001_0.png ...)"),
    "montgomery": DatasetInfo(
        name="montgomery", display_name="Montgomery-CXR", task="binary", class_names=CLASSES, modality="chest-xray", in_domain=True,
        expected_images=138, licence=LICENCE, citation=CITATION, fewshot_way=2,
        layout="MontgomerySet/ (with CXR_png/MCUCXR_0001_0.png ...)"),
}

register_dataset(DatasetAdapter(info=INFOS["shenzhen"], loader=_loader("shenzhen", "ChinaSet_AllFiles", "CHNCXR"),
                                options=TbOptions), aliases=("shenzhen-cxr", "chinaset"))
register_dataset(DatasetAdapter(info=INFOS["montgomery"], loader=_loader("montgomery", "MontgomerySet", "MCUCXR"),
                                options=TbOptions), aliases=("montgomery-cxr",))
