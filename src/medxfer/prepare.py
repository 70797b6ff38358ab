"""Prepare stage: decode every image once into a uint8 memmap of evaluation crops."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.data.records import Record


@dataclass
class PreparedImages:
    """Decoded, resized, centre-cropped images aligned row for row with ``records``.

    ``array`` is N x S x S x C uint8 (C = 1 for an all-greyscale dataset, else 3), usually a
    read-only memmap. ``key`` hashes everything that determines the content (dataset
    fingerprint, size, resize mode, decoder version). ``bad`` lists record indices that
    could not be decoded (only with ``skip_bad``; their rows are zeros).
    """

    array: np.ndarray
    records: list[Record]
    key: str
    path: Path | None
    size: int
    class_names: tuple[str, ...] = ()
    dataset: str = ""
    bad: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def channels(self) -> int:
        return int(self.array.shape[-1])

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def splits(self) -> np.ndarray:
        return np.array([r.split for r in self.records], dtype=object)
