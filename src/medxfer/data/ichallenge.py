"""iChallenge-PM (PALM) and iChallenge-AMD (ADAM) fundus photographs.

iChallenge-PM: ``PALM-Training400/{P,H,N}0001.jpg`` (label = first letter: pathologic myopia,
high myopia, normal) and, when their labels are present, ``PALM-Validation400/V0001.jpg``
labelled by a CSV or xlsx with columns ``imgName,Label`` (1 = pathologic myopia; the official
``PALM-Validation-GT/PM_Label_and_Fovea_Location.xlsx`` or a ``labels.csv``).

- ``labels="pm_vs_rest"`` (default, the paper's text): PM positive, normal and high myopia
  negative. ``labels="normal_vs_rest"`` (the authors' published numbers): normal negative,
  high + pathologic myopia positive; the validation labels cannot say "normal" vs "high
  myopia", so validation images are left out (noted in ``problems``).
- ``split="default"``: with validation labels, training images are the train split and
  validation images the test split; without them a seeded stratified 80/20 split of the
  training images. ``split="paper"``: training images only, 80/20 with seed 42.

iChallenge-AMD: ``Training400/AMD/A0001.jpg`` and ``Training400/Non-AMD/N0001.jpg``
(label = folder, checked against the first letter), seeded 80/20 split.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from medxfer.data.build import default_split_fn, finish_dataset
from medxfer.data.common import Issues, find_table, read_table
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DatasetAdapter, DatasetOptions, register_dataset
from medxfer.data.splits import paper_80_20
from medxfer.typed import setting

PM_CLASSES = {"pm_vs_rest": ("non-PM", "PM"), "normal_vs_rest": ("normal", "myopia")}
PM_LETTER = {"pm_vs_rest": {"P": 1, "H": 0, "N": 0}, "normal_vs_rest": {"P": 1, "H": 1, "N": 0}}
PM_INFO = DatasetInfo(
    name="ichallenge-pm", display_name="iChallenge-PM", task="binary", class_names=PM_CLASSES["pm_vs_rest"], modality="fundus",
    in_domain=False, expected_images=400, licence="iChallenge PALM challenge terms (research use)",
    citation=("Fu H, Li F, Orlando JI, Bogunovic H, Sun X, Liao J, Xu Y, Zhang S, Zhang X. "
              "PALM: PAthoLogic Myopia Challenge. IEEE Dataport, 2019. doi:10.21227/55pk-8z03"),
    fewshot_way=2, fewshot_splits=("train",),  # the paper's few-shot pool: the 400 training images
    layout="the folder holding PALM-Training400/ (and PALM-Validation400/ + labels)")
AMD_INFO = DatasetInfo(
    name="ichallenge-amd", display_name="iChallenge-AMD", task="binary", class_names=("Non-AMD", "AMD"), modality="fundus",
    in_domain=False, expected_images=400, licence="iChallenge ADAM challenge terms (research use)",
    citation=("Fu H, Li F, Orlando JI, Bogunovic H, Sun X, Liao J, Xu Y, Zhang S, Zhang X. "
              "ADAM: Automatic Detection challenge on Age-related Macular degeneration. IEEE Dataport, "
              "2020. doi:10.21227/dt4f-rt59"),
    fewshot_way=2, layout="the folder holding Training400/AMD/ and Training400/Non-AMD/")

TRAIN_NAME = re.compile(r"^([PHN])\d+\.jpe?g$", re.IGNORECASE)


def _pm_base(root: Path) -> Path:
    if (root / "PALM-Training400").is_dir():
        return root
    if root.name == "PALM-Training400" and root.is_dir():
        return root.parent
    raise DatasetError(f"{root}: no PALM-Training400/ folder; point at the folder that holds it "
                       f"(expected PALM-Training400/P0001.jpg ...)")


def _val_labels_file(base: Path, val_labels: str | None) -> Path | None:
    if val_labels == "none":
        return None
    if val_labels not in (None, "auto"):
        p = Path(val_labels).expanduser()
        if not p.is_file():
            raise DatasetError(f"{p}: validation labels file not found")
        return p
    dirs = [base, base / "PALM-Validation400", base / "PALM-Validation-GT"]
    candidates = [p for d in dirs if d.is_dir() for ext in ("*.csv", "*.xlsx") for p in sorted(d.glob(ext))]
    return find_table(candidates, ["imgName", "Label"])


@dataclass(frozen=True)
class PmOptions(DatasetOptions):
    labels: Literal["pm_vs_rest", "normal_vs_rest"] = setting("pm_vs_rest", help="PM vs normal + high myopia "
                                                              "(the paper's text) or normal vs rest (the authors')")
    val_labels: str | None = setting("auto", help="auto, none, or the validation labels CSV/xlsx")


def load_pm(root: Path, o: PmOptions, skip_bad: bool = False) -> Dataset:
    """Read iChallenge-PM (see the module docstring for the options)."""
    labels, val_labels, split, seed = o.labels, o.val_labels, o.split, o.seed
    base = _pm_base(root)
    issues = Issues("ichallenge-pm", skip_bad)
    records: list[Record] = []
    letters = PM_LETTER[labels]
    train_dir = base / "PALM-Training400"
    for p in sorted(train_dir.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        m = TRAIN_NAME.match(p.name)
        if m is None:
            if p.suffix.lower() in (".jpg", ".jpeg", ".png"):
                issues.bad(f"{p}: unexpected file name (expected P/H/N + number, e.g. P0001.jpg)",
                           kind="unexpected file")
            continue
        records.append(Record(path=str(p.resolve()), label=letters[m.group(1).upper()], split="train"))
    label_file = _val_labels_file(base, val_labels) if split != "paper" else None
    use_val = label_file is not None
    if use_val and labels == "normal_vs_rest":
        issues.note(f"validation images left out: {label_file.name} only says PM or not, "
                    "which cannot be mapped to normal vs rest")
        use_val = False
    if use_val:
        assert label_file is not None
        val_dir = base / "PALM-Validation400"
        for line, row in read_table(label_file, ["imgName", "Label"]):
            where = f"{label_file}:{line}"
            if row["Label"] not in ("0", "1"):
                issues.bad(f"{where}: unknown Label {row['Label']!r} for {row['imgName']} (expected 0 or 1)",
                           kind="unknown label")
                continue
            img = val_dir / Path(row["imgName"]).name
            if not img.is_file():
                issues.bad(f"{where}: image file not found: {img}", kind="missing file")
                continue
            records.append(Record(path=str(img.resolve()), label=int(row["Label"]), split="test"))
    elif (base / "PALM-Validation400").is_dir() and split != "paper" and labels == "pm_vs_rest":
        issues.note("PALM-Validation400/ has no labels file (imgName,Label) here: validation images not used")

    def default(recs: list[Record]) -> list[str]:
        if use_val:
            return [r.split for r in recs]
        return default_split_fn(seed)(recs)

    info = replace(PM_INFO, class_names=PM_CLASSES[labels])
    options = {"labels": labels, "validation": label_file.name if use_val and label_file else None, "seed": seed}
    return finish_dataset(info, records, base, issues, options, split=split, default=default, paper=paper_80_20)


def load_amd(root: Path, o: DatasetOptions, skip_bad: bool = False) -> Dataset:
    """Read iChallenge-AMD ``Training400/{AMD,Non-AMD}/*.jpg``."""
    split, seed = o.split, o.seed
    base = root / "Training400" if (root / "Training400").is_dir() else root
    if not (base / "AMD").is_dir() or not (base / "Non-AMD").is_dir():
        raise DatasetError(f"{root}: expected Training400/AMD/ and Training400/Non-AMD/ folders")
    issues = Issues("ichallenge-amd", skip_bad)
    records: list[Record] = []
    for folder, label, letter in (("Non-AMD", 0, "N"), ("AMD", 1, "A")):
        for p in sorted((base / folder).iterdir()):
            if p.name.startswith(".") or p.suffix.lower() not in (".jpg", ".jpeg", ".png"):
                continue
            if not p.name.upper().startswith(letter):
                issues.bad(f"{p}: file name does not start with {letter!r} as the {folder}/ folder's images do",
                           kind="label conflict")
                continue
            records.append(Record(path=str(p.resolve()), label=label))
    return finish_dataset(AMD_INFO, records, base.parent if base != root else root, issues, {"seed": seed},
                          split=split, default=default_split_fn(seed), paper=paper_80_20)


register_dataset(DatasetAdapter(info=PM_INFO, loader=load_pm, options=PmOptions),
                 aliases=("palm", "pm"))
register_dataset(DatasetAdapter(info=AMD_INFO, loader=load_amd, options=DatasetOptions),
                 aliases=("adam", "amd"))
