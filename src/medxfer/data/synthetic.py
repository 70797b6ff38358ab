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
from medxfer.registry import Registry

Writer = Callable[[Path, int, int, np.random.Generator], Path]
WRITERS: Registry[Writer] = Registry("synthetic dataset")


def write_synthetic(name: str, root: str | Path, *, n_per_class: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Write a synthetic copy of dataset ``name`` under ``root``; returns the folder to load."""
    if n_per_class < 4:
        raise ValueError(f"n_per_class must be at least 4 (got {n_per_class})")
    writer = WRITERS.get(name)
    out = Path(root).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return writer(out, n_per_class, size, np.random.default_rng(seed))


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
    def write(root: Path, n: int, size: int, rng: np.random.Generator) -> Path:
        base = root / top
        meta_rows: list[list[object]] = []
        number = 0
        for label in (0, 1):  # normals first, then TB, numbered consecutively as in the release
            for _ in range(n):
                number += 1
                stem = f"{prefix}_{number:04d}_{label}"
                img = synthetic_image(rng, label, 2, size, "chest-xray")
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
def _write_pm(root: Path, n: int, size: int, rng: np.random.Generator) -> Path:
    """n each of P, H, N training images; n PM + n non-PM validation images with an xlsx."""
    import openpyxl

    pattern = {"N": 0, "H": 1, "P": 2}
    for letter in ("H", "N", "P"):
        for i in range(1, n + 1):
            _save(synthetic_image(rng, pattern[letter], 3, size, "fundus"),
                  root / "PALM-Training400" / f"{letter}{i:04d}.jpg", quality=92)
    labels = [1] * n + [0] * n
    rng.shuffle(labels)
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(["ID", "imgName", "Label", "Fovea_X", "Fovea_Y"])
    for i, lbl in enumerate(labels, start=1):
        k = 2 if lbl == 1 else int(rng.integers(0, 2))
        _save(synthetic_image(rng, k, 3, size, "fundus"), root / "PALM-Validation400" / f"V{i:04d}.jpg", quality=92)
        ws.append([i, f"V{i:04d}.jpg", lbl, round(float(rng.uniform(900, 1300)), 2),
                   round(float(rng.uniform(900, 1200)), 2)])
    (root / "PALM-Validation-GT").mkdir(parents=True, exist_ok=True)
    wb.save(root / "PALM-Validation-GT" / "PM_Label_and_Fovea_Location.xlsx")
    return root


@_register("ichallenge-amd")
def _write_amd(root: Path, n: int, size: int, rng: np.random.Generator) -> Path:
    """n AMD (A0001.jpg ...) and n non-AMD (N0001.jpg ...) images in Training400/."""
    for label, (folder, letter) in enumerate((("Non-AMD", "N"), ("AMD", "A"))):
        for i in range(1, n + 1):
            _save(synthetic_image(rng, label, 2, size, "fundus"), root / "Training400" / folder / f"{letter}{i:04d}.jpg",
                  quality=92)
    return root


# --- BACH -----------------------------------------------------------------------------------

@_register("bach")
def _write_bach(root: Path, n: int, size: int, rng: np.random.Generator) -> Path:
    """n uncompressed 4:3 RGB TIFFs per class and the headerless ground-truth CSV."""
    base = root / "ICIAR2018_BACH_Challenge"
    prefixes = {"Normal": "n", "Benign": "b", "InSitu": "is", "Invasive": "iv"}
    rows: list[list[object]] = []
    width, height = size * 4 // 3, size
    for k, (cls, prefix) in enumerate(prefixes.items()):
        for i in range(1, n + 1):
            img = synthetic_image(rng, k, 4, width, "histology")[:height]
            name = f"{prefix}{i:03d}.tif"
            _save(img, base / "Photos" / cls / name)
            rows.append([name, cls])
    write_text_atomic(base / "Photos" / "microscopy_ground_truth.csv", _csv_text(None, rows))
    return base
