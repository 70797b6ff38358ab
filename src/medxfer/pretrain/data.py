"""The images a pretraining run sees: datasets given like ``medxfer run --dataset`` (labels
ignored), or a plain folder of unlabelled images (``LABEL=images:DIR``), each prepared once
as a whole-image store (``prepare(..., resize="keep")``: shorter side ``store_size``, never
enlarged, aspect kept, padded canvas with per-image extents) that views are cropped from."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medxfer.cache import content_key
from medxfer.config import DatasetArg
from medxfer.data.common import list_images
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.errors import SpecError
from medxfer.prepare import KEEP, PreparedImages, prepare

UNLABELLED = "images"


def parse_data(text: str) -> DatasetArg:
    """``LABEL=images:DIR`` (a folder of images, any layout, no labels), or what ``--dataset``
    takes: ``NAME=PATH``, ``LABEL=folder:DIR``, ``LABEL=csv:FILE``, ``LABEL=medmnist:FILE``."""
    label, sep, rest = text.partition("=")
    kind, colon, path = rest.partition(":")
    if sep and colon and kind == UNLABELLED:
        if not path:
            raise SpecError(f"--data {text!r}: missing folder")
        return DatasetArg(label=label.strip(), kind=UNLABELLED, root=path)
    return DatasetArg.parse(text)


def unlabelled_images(root: str | os.PathLike[str], name: str) -> Dataset:
    """Every image file under ``root`` (recursively, hidden entries skipped) as one dataset."""
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    paths = list_images(folder)
    if not paths:
        raise DatasetError(f"{folder}: no image files found (png, jpg, jpeg, tif, bmp, ...)")
    info = DatasetInfo(name=name, task="unlabelled", class_names=("unlabelled",), layout="DIR/**/*.png",
                       licence="the user's data")
    records = [Record(path=str(p.resolve()), label=0, split="train") for p in paths]
    return Dataset(info=info, records=records, root=str(folder), options={"source": UNLABELLED})


def load_data(arg: DatasetArg, skip_bad: bool = False) -> Dataset:
    if arg.kind == UNLABELLED:
        return unlabelled_images(arg.root, arg.label)
    from medxfer.data import load_dataset

    return load_dataset(arg.kind, arg.root, skip_bad=skip_bad, **arg.options)


@dataclass
class ViewSource:
    """The rows views are drawn from: (store, row) pairs over one or more whole-image stores."""

    stores: list[PreparedImages]
    rows: np.ndarray  # N x 2: store index, row in that store
    channels: int
    summary: list[dict[str, object]]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def fingerprint(self) -> str:
        """The image content the run saw: each store's key and the rows used."""
        return content_key([s.key for s in self.stores], self.rows.tolist(), length=16)

    def images(self, idx: np.ndarray, device: torch.device) -> tuple[list[torch.Tensor], np.ndarray]:
        """The whole images of rows ``idx`` (uint8 C x H x W, ``channels`` channels) and their extents."""
        picked = self.rows[idx]
        out: list[torch.Tensor | None] = [None] * len(idx)
        extents = np.zeros((len(idx), 2), dtype=np.int64)
        for s, store in enumerate(self.stores):
            where = np.flatnonzero(picked[:, 0] == s)
            if not where.size:
                continue
            rows = picked[where, 1]
            order = np.argsort(rows)  # sorted reads are faster on a memmap
            arr = np.asarray(store.array[rows[order]])
            for j, w in enumerate(where[order]):
                img = torch.from_numpy(np.ascontiguousarray(arr[j])).permute(2, 0, 1)
                if img.shape[0] != self.channels:
                    img = img.expand(self.channels, -1, -1)
                out[w] = img.to(device)
                extents[w] = store.extents[rows[order][j]]
        return [t for t in out if t is not None], extents


def view_source(data: Sequence[DatasetArg | Dataset], *, store_size: int, splits: tuple[str, ...],
                cache_dir: str | os.PathLike[str] | None = None, workers: int | None = None,
                skip_bad: bool = False) -> ViewSource:
    """Load and prepare every dataset once; keep the records of ``splits`` (``("all",)``: every
    record) that decoded."""
    stores, rows, summary = [], [], []
    for s, item in enumerate(data):
        ds = item if isinstance(item, Dataset) else load_data(item, skip_bad)
        store = prepare(ds, size=store_size, resize=KEEP, cache_dir=cache_dir, workers=workers, skip_bad=skip_bad)
        keep = np.ones(len(store), dtype=bool)
        if "all" not in splits:
            keep &= np.isin(store.splits, list(splits))
        if store.bad:
            keep[np.asarray(store.bad, dtype=np.int64)] = False
        chosen = np.flatnonzero(keep)
        if not chosen.size:
            raise DatasetError(f"dataset {ds.info.name!r}: no usable images in split(s) {', '.join(splits)}")
        rows.append(np.stack([np.full(chosen.size, s), chosen], axis=1))
        stores.append(store)
        label = item.label if isinstance(item, DatasetArg) else ds.info.name
        summary.append({"label": label, "kind": item.kind if isinstance(item, DatasetArg) else "dataset",
                        "root": str(ds.root), "images": int(chosen.size), "fingerprint": ds.files_fingerprint(),
                        "store": store.key, "modality": ds.info.modality})
    channels = 3 if any(st.channels == 3 for st in stores) else 1
    return ViewSource(stores, np.concatenate(rows).astype(np.int64), channels, summary)
