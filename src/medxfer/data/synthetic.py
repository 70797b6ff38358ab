"""Tiny synthetic copies of the paper's eight datasets, in their exact official layouts.

``write_synthetic(name, root)`` writes file names, folder structure, CSV headers and the
layout's quirks (CheXpert ``-1.0``/blank labels and lateral-first studies, ChestX-ray14
multi-label and "No Finding" rows that must be dropped, BACH ``.tif`` with a headerless
ground-truth CSV...) and returns the path a user would pass to ``load_dataset(name, path)``.
Images carry class-dependent structure (see :mod:`medxfer.data.synthetic_images`) so that
even random-weight CNN features separate the classes. Every random choice comes from
``np.random.default_rng(seed)``.

Per-class counts under the default options are documented on each writer; the tests check
them exactly.
"""
from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from medxfer.cache import write_text_atomic
from medxfer.data.synthetic_images import synthetic_image
from medxfer.errors import UsageError
from medxfer.registry import Registry

Painter = Callable[[int, int, int, str], np.ndarray]  # (class, classes, size, modality) -> uint8 image
Writer = Callable[[Path, int, int, np.random.Generator, Painter], Path]
SYNTHETIC_MARKER = "MEDXFER_SYNTHETIC.txt"  # in the folder written: adapters then mark the dataset synthetic
WRITERS: Registry[Writer] = Registry("synthetic dataset")


def write_synthetic(name: str, root: str | Path, *, n_per_class: int = 8, size: int = 64, seed: int = 0,
                    signal: float = 1.0) -> Path:
    """Write a synthetic copy of dataset ``name`` under ``root``; returns the folder to load.

    ``signal`` in (0, 1] sets how much of each image's structure depends on its class (the rest
    is drawn at random per image): 1 makes the classes easy even for random features, smaller
    values harder (the demo uses about 0.3, so its models land below the ceiling and differ).
    """
    if not 0.0 < signal <= 1.0:
        raise UsageError(f"signal must be in (0, 1], got {signal}")
    if n_per_class < 4:
        raise UsageError(f"n_per_class must be at least 4 (got {n_per_class})")
    writer = WRITERS.get(name)
    out = Path(root).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / SYNTHETIC_MARKER, f"Synthetic images written by medxfer.data.write_synthetic({name!r}, "
                      f"n_per_class={n_per_class}, size={size}, seed={seed}, signal={signal}): not real data.\n")
    rng = np.random.default_rng(seed)

    def paint(k: int, n_classes: int, side: int, modality: str) -> np.ndarray:
        return synthetic_image(rng, k, n_classes, side, modality, signal=signal)

    return writer(out, n_per_class, size, rng, paint)


def _register(name: str) -> Callable[[Writer], Writer]:
    def deco(fn: Writer) -> Writer:
        WRITERS.register(name, fn)
        return fn
    return deco


def _save(arr: np.ndarray, path: Path, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)


def _csv_text(header: list[str] | None, rows: list[list[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header is not None:
        w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


# --- Shenzhen / Montgomery ------------------------------------------------------------------

def _tb_writer(top: str, prefix: str, readings: Callable[[int, np.random.Generator], str],
               metadata: str) -> Writer:
    def write(root: Path, n: int, size: int, rng: np.random.Generator, paint: Painter) -> Path:
        base = root / top
        meta_rows: list[list[object]] = []
        number = 0
        for label in (0, 1):  # normals first, then TB, numbered consecutively as in the release
            for _ in range(n):
                number += 1
                stem = f"{prefix}_{number:04d}_{label}"
                img = paint(label, 2, size, "chest-xray")
                if number == 2:  # quirk: a few releases store grey images as RGB PNGs
                    img = np.repeat(img[..., None], 3, axis=2)
                _save(img, base / "CXR_png" / f"{stem}.png")
                text = readings(label, rng)
                (base / "ClinicalReadings").mkdir(parents=True, exist_ok=True)
                (base / "ClinicalReadings" / f"{stem}.txt").write_text(text)
                findings = "normal" if label == 0 else "PTB in the right upper field"
                meta_rows.append([f"{stem}.png", "male" if number % 2 else "female", 30 + number % 40, findings])
        (base / "CXR_png" / "Thumbs.db").write_bytes(b"\x00" * 16)  # quirk: a stray Windows file
        write_text_atomic(root / metadata, _csv_text(["study_id", "sex", "age", "findings"], meta_rows))
        return base
    return write


def _shenzhen_reading(label: int, rng: np.random.Generator) -> str:
    return f"male {int(rng.integers(20, 70))}yrs\n{'normal' if label == 0 else 'STB,ATB&PTB in the right upper field'}\n"


def _montgomery_reading(label: int, rng: np.random.Generator) -> str:
    return (f"Patient's Sex: F\nPatient's Age: {int(rng.integers(20, 70)):03d}Y\n"
            f"{'normal' if label == 0 else 'right upper lobe infiltrate, TB'}\n")


# n normal (_0) and n TB (_1) images; plus a metadata CSV beside the folder (Kaggle style).
_register("shenzhen")(_tb_writer("ChinaSet_AllFiles", "CHNCXR", _shenzhen_reading, "shenzhen_metadata.csv"))
_register("montgomery")(_tb_writer("MontgomerySet", "MCUCXR", _montgomery_reading, "montgomery_metadata.csv"))


# --- iChallenge-PM / iChallenge-AMD ---------------------------------------------------------

@_register("ichallenge-pm")
def _write_pm(root: Path, n: int, size: int, rng: np.random.Generator, paint: Painter) -> Path:
    """n each of P, H, N training images; n PM + n non-PM validation images with an xlsx."""
    import openpyxl

    pattern = {"N": 0, "H": 1, "P": 2}
    for letter in ("H", "N", "P"):
        for i in range(1, n + 1):
            _save(paint(pattern[letter], 3, size, "fundus"),
                  root / "PALM-Training400" / f"{letter}{i:04d}.jpg", quality=92)
    labels = [1] * n + [0] * n
    rng.shuffle(labels)
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["ID", "imgName", "Label", "Fovea_X", "Fovea_Y"])
    for i, lbl in enumerate(labels, start=1):
        k = 2 if lbl == 1 else int(rng.integers(0, 2))
        _save(paint(k, 3, size, "fundus"), root / "PALM-Validation400" / f"V{i:04d}.jpg", quality=92)
        ws.append([i, f"V{i:04d}.jpg", lbl, round(float(rng.uniform(900, 1300)), 2),
                   round(float(rng.uniform(900, 1200)), 2)])
    (root / "PALM-Validation-GT").mkdir(parents=True, exist_ok=True)
    wb.save(root / "PALM-Validation-GT" / "PM_Label_and_Fovea_Location.xlsx")
    return root


@_register("ichallenge-amd")
def _write_amd(root: Path, n: int, size: int, rng: np.random.Generator, paint: Painter) -> Path:
    """n AMD (A0001.jpg ...) and n non-AMD (N0001.jpg ...) images in Training400/."""
    for label, (folder, letter) in enumerate((("Non-AMD", "N"), ("AMD", "A"))):
        for i in range(1, n + 1):
            _save(paint(label, 2, size, "fundus"), root / "Training400" / folder / f"{letter}{i:04d}.jpg",
                  quality=92)
    return root


# --- BACH -----------------------------------------------------------------------------------

@_register("bach")
def _write_bach(root: Path, n: int, size: int, rng: np.random.Generator, paint: Painter) -> Path:
    """n uncompressed 4:3 RGB TIFFs per class and the headerless ground-truth CSV."""
    base = root / "ICIAR2018_BACH_Challenge"
    prefixes = {"Normal": "n", "Benign": "b", "InSitu": "is", "Invasive": "iv"}
    rows: list[list[object]] = []
    width, height = size * 4 // 3, size
    for k, (cls, prefix) in enumerate(prefixes.items()):
        for i in range(1, n + 1):
            img = paint(k, 4, width, "histology")[:height]
            name = f"{prefix}{i:03d}.tif"
            _save(img, base / "Photos" / cls / name)
            rows.append([name, cls])
    write_text_atomic(base / "Photos" / "microscopy_ground_truth.csv", _csv_text(None, rows))
    return base


# --- EyePACS --------------------------------------------------------------------------------

def _eyepacs_rows(n: int, rng: np.random.Generator, ids: list[int]) -> list[tuple[str, int]]:
    """(image name, grade) rows, n per grade: same-grade pairs, mixed-grade pairs, single eyes.

    Per grade: ``(n - 2) // 2`` patients with both eyes of that grade, one left eye paired with
    the next grade's right eye (so not a pair), and a single-eye patient when n is odd. Rows
    are sorted by patient id; mixed patients list the right eye first (the CSV does not
    always alternate left/right).
    """
    patients: list[list[tuple[str, int]]] = []
    for g in range(5):
        patients += [[("left", g), ("right", g)] for _ in range((n - 2) // 2)]
        patients.append([("right", (g + 1) % 5), ("left", g)])
        if (n - 2) % 2:
            patients.append([("left" if g % 2 else "right", g)])
    chosen = sorted(ids[:len(patients)])
    order = rng.permutation(len(patients))
    rows: list[tuple[str, int]] = []
    for pid, j in zip(chosen, order):
        rows += [(f"{pid}_{eye}", grade) for eye, grade in patients[j]]
    return rows


@_register("eyepacs")
def _write_eyepacs(root: Path, n: int, size: int, rng: np.random.Generator, paint: Painter) -> Path:
    """train/: n per grade (trainLabels.csv); test/: max(4, n // 2) per grade with
    retinopathy_solution.csv (image,level,Usage). Same-grade eye pairs: 5 * ((n - 2) // 2)
    in train plus the same count for the test size."""
    n_test = max(4, n // 2)
    ids = [int(i) for i in rng.choice(np.arange(10, 100 * (n + n_test) * 5), size=6 * (n + n_test), replace=False)]
    train = _eyepacs_rows(n, rng, ids[: 3 * n])
    test = _eyepacs_rows(n_test, rng, ids[3 * n:])
    for folder, rows in (("train", train), ("test", test)):
        for image, grade in rows:
            _save(paint(grade, 5, size, "fundus"), root / folder / f"{image}.jpeg", quality=90)
    write_text_atomic(root / "trainLabels.csv", _csv_text(["image", "level"], [[i, g] for i, g in train]))
    write_text_atomic(root / "retinopathy_solution.csv",
                      _csv_text(["image", "level", "Usage"],
                                [[i, g, "Public" if k % 3 == 0 else "Private"] for k, (i, g) in enumerate(test)]))
    return root


# --- CheXpert -------------------------------------------------------------------------------

_CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Enlarged Cardiomediastinum",
                    "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema", "Consolidation", "Pneumonia",
                    "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
                    "Support Devices"]


def _chexpert_studies(n: int, label: int) -> list[tuple[list[str], str]]:
    """(view files, Pleural Effusion value) per study: n // 3 two-view studies, then singles.

    Values alternate per study: positive "1.0", "-1.0"; negative "0.0", "" (blank).
    Every second two-view study lists the lateral as view1 (its frontal is view2).
    """
    n_pairs = n // 3
    views: list[list[str]] = []
    for k in range(n_pairs):
        views.append(["view1_frontal.jpg", "view2_lateral.jpg"] if k % 2 == 0
                     else ["view1_lateral.jpg", "view2_frontal.jpg"])
    views += [["view1_frontal.jpg"]] * (n - 2 * n_pairs)
    values = ("1.0", "-1.0") if label == 1 else ("0.0", "")
    return [(v, values[k % 2]) for k, v in enumerate(views)]


def _chexpert_row(rel: str, view_file: str, value: str, rng: np.random.Generator) -> list[object]:
    frontal = "frontal" in view_file
    others = [str(rng.choice(["", "", "0.0", "1.0", "-1.0"])) for _ in range(13)]
    obs = others[:10] + [value] + others[10:]
    return [rel, str(rng.choice(["Female", "Male"])), int(rng.integers(18, 90)),
            "Frontal" if frontal else "Lateral", str(rng.choice(["AP", "PA"])) if frontal else ""] + obs


@_register("chexpert")
def _write_chexpert(root: Path, n: int, size: int, rng: np.random.Generator, paint: Painter) -> Path:
    """CheXpert-v1.0-small/: train.csv with n images per class under u_ones (see
    :func:`_chexpert_studies`; with n = 6: 3 uncertain positives, 2 lateral/frontal pairs per
    class), patients of two studies each; valid.csv with 2 frontal images per class."""
    top = "CheXpert-v1.0-small"
    base = root / top
    studies = [(label, s) for label in (0, 1) for s in _chexpert_studies(n, label)]
    order = rng.permutation(len(studies))
    rows: list[list[object]] = []
    for k, j in enumerate(order):
        label, (files, value) = studies[j]
        patient, study = f"patient{k // 2 + 1:05d}", f"study{k % 2 + 1}"
        for f in files:
            rel = f"{top}/train/{patient}/{study}/{f}"
            _save(paint(label, 2, size, "chest-xray"), root / rel, quality=90)
            rows.append(_chexpert_row(rel, f, value, rng))
    write_text_atomic(base / "train.csv", _csv_text(_CHEXPERT_HEADER, rows))
    valid: list[list[object]] = []
    for k, label in enumerate((0, 0, 1, 1)):
        rel = f"{top}/valid/patient{64541 + k}/study1/view1_frontal.jpg"
        _save(paint(label, 2, size, "chest-xray"), root / rel, quality=90)
        row = _chexpert_row(rel, "view1_frontal.jpg", "1.0" if label else "0.0", rng)
        valid.append([v.replace("-1.0", "0.0") if isinstance(v, str) else v for v in row])
    write_text_atomic(base / "valid.csv", _csv_text(_CHEXPERT_HEADER, valid))
    return base


# --- ChestX-ray14 ---------------------------------------------------------------------------

_NIH_CLASSES = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumothorax")
_NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
               "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],\n")
# rows the single-finding rule must drop: (finding labels, count)
_NIH_DROPPED = (("No Finding", 4), ("Pneumonia", 2), ("Hernia", 1), ("Effusion|Infiltration", 2),
                ("Atelectasis|Mass|Nodule", 1))


@_register("chestx-ray14")
def _write_chestxray14(root: Path, n: int, size: int, rng: np.random.Generator, paint: Painter) -> Path:
    """Data_Entry_2017.csv (with its unquoted-bracket header and trailing comma), n images per
    class plus 10 rows to drop (4 No Finding, 2 Pneumonia, 1 Hernia, 3 multi-label), patients
    of 1-3 follow-ups, images split over images_001/images/ and images_002/images/, and
    official patient-level train_val_list.txt / test_list.txt (about 20% of the patients)."""
    findings = [c for c in _NIH_CLASSES for _ in range(n)] + [f for f, k in _NIH_DROPPED for _ in range(k)]
    findings = [findings[i] for i in rng.permutation(len(findings))]
    rows: list[tuple[str, str, int, int]] = []  # name, findings, follow-up, patient
    pid, i = 0, 0
    while i < len(findings):
        pid += 1
        for follow in range(int(rng.integers(1, 4))):
            if i == len(findings):
                break
            rows.append((f"{pid:08d}_{follow:03d}.png", findings[i], follow, pid))
            i += 1
    half = len(rows) // 2
    lines = [_NIH_HEADER]
    for k, (name, f, follow, p) in enumerate(rows):
        label = f.split("|")[0]
        cls = _NIH_CLASSES.index(label) if label in _NIH_CLASSES else 0
        folder = "images_001" if k < half else "images_002"
        _save(paint(cls, 7, size, "chest-xray"), root / folder / "images" / name)
        lines.append(f"{name},{f},{follow},{p},{int(rng.integers(20, 80))},{rng.choice(['M', 'F'])},"
                     f"{rng.choice(['PA', 'AP'])},2500,2048,0.168,0.168\n")
    write_text_atomic(root / "Data_Entry_2017.csv", "".join(lines))
    test_patients = set((rng.permutation(pid)[: max(1, round(0.2 * pid))] + 1).tolist())
    write_text_atomic(root / "test_list.txt", "".join(f"{r[0]}\n" for r in rows if r[3] in test_patients))
    write_text_atomic(root / "train_val_list.txt", "".join(f"{r[0]}\n" for r in rows if r[3] not in test_patients))
    return root
