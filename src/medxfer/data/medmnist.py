"""MedMNIST ``.npz`` files (the user supplies the file; nothing is downloaded).

Keys ``train_images``, ``train_labels``, ``val_images``, ... ``test_labels`` (any subset of the
three splits); images N x H x W (greyscale) or N x H x W x 3 (RGB), labels N or N x 1 class
indices. Multi-label files (ChestMNIST, N x 14 labels) are refused. Records point into the
file as ``"/abs/file.npz#train_images/12"``. Class names are ``"0" ... "K-1"`` (the ``.npz``
does not carry names). The file's own splits are kept unless ``split`` says otherwise.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from medxfer.data.build import default_split_fn, finish_dataset, keep_given_or
from medxfer.data.common import Issues
from medxfer.data.generic import GenericOptions, generic_info
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DatasetAdapter, register_dataset
from medxfer.data.splits import paper_80_20

SPLIT_KEYS = {"train": "train", "val": "val", "test": "test"}


def _npy_shape(npz: zipfile.ZipFile, key: str) -> tuple[int, ...]:
    """Shape of one array in an .npz from its header only (the images are not loaded)."""
    with npz.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, _ = reader(f)
    return tuple(shape)


def load_medmnist(root: Path, o: GenericOptions, skip_bad: bool = False) -> Dataset:
    """Read a MedMNIST ``.npz`` file (``root`` is the file)."""
    name, split, seed = o.name, o.split, o.seed
    file = root.resolve()
    if not file.is_file():
        raise DatasetError(f"{root}: MedMNIST .npz file not found")
    try:
        npz = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{root}: not a readable .npz file: {exc}") from exc
    with npz:
        keys = {n[:-4] for n in npz.namelist() if n.endswith(".npy")}
        present = [s for s in SPLIT_KEYS if f"{s}_images" in keys or f"{s}_labels" in keys]
        if not present:
            raise DatasetError(f"{root}: no train_images/train_labels, val_* or test_* arrays "
                               f"(has {', '.join(sorted(keys)) or 'none'})")
        shapes: dict[str, tuple[int, ...]] = {}
        for s in present:
            for kind in ("images", "labels"):
                if f"{s}_{kind}" not in keys:
                    raise DatasetError(f"{root}: has {s}_{'labels' if kind == 'images' else 'images'} "
                                       f"but no {s}_{kind}")
                shapes[f"{s}_{kind}"] = _npy_shape(npz, f"{s}_{kind}")
    with np.load(file, allow_pickle=False) as z:
        labels = {s: np.asarray(z[f"{s}_labels"]) for s in present}
    records: list[Record] = []
    given: list[str | None] = []
    for s in present:
        img_shape, lab = shapes[f"{s}_images"], labels[s]
        if len(img_shape) not in (3, 4) or (len(img_shape) == 4 and img_shape[3] not in (1, 3)):
            raise DatasetError(f"{root}: {s}_images has shape {img_shape}; expected N x H x W or N x H x W x 3")
        if lab.ndim == 2 and lab.shape[1] > 1:
            raise DatasetError(f"{root}: {s}_labels has {lab.shape[1]} columns: multi-label MedMNIST files "
                               f"(e.g. ChestMNIST) are not supported")
        lab = lab.reshape(-1)
        if len(lab) != img_shape[0]:
            raise DatasetError(f"{root}: {s}_images has {img_shape[0]} images but {s}_labels has {len(lab)} labels")
        if not np.issubdtype(lab.dtype, np.integer) or (len(lab) and lab.min() < 0):
            raise DatasetError(f"{root}: {s}_labels must be non-negative integers (got {lab.dtype})")
        for i, y in enumerate(lab.tolist()):
            records.append(Record(path=f"{file}#{s}_images/{i}", label=int(y), split=s))
            given.append(SPLIT_KEYS[s])
    n_classes = max(r.label for r in records) + 1 if records else 0
    info = generic_info(name or file.stem, tuple(str(k) for k in range(n_classes)),
                        "a MedMNIST .npz file (train_images, train_labels, val_*, test_*)")
    return finish_dataset(info, records, file.parent, Issues(info.name, skip_bad),
                          {"source": "medmnist", "seed": seed}, split=split,
                          default=keep_given_or(default_split_fn(seed), given), paper=paper_80_20)


register_dataset(DatasetAdapter(info=DatasetInfo(name="medmnist", task="multiclass", class_names=(),
                                                 layout="medmnist:FILE.npz"),
                                loader=load_medmnist, options=GenericOptions, generic=True))
