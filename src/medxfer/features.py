"""The feature-set contract: what extraction produces and feature protocols consume."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medxfer.data.records import DatasetInfo, Record
from medxfer.errors import UsageError


@dataclass
class FeatureSet:
    """Features aligned row for row with a dataset's records.

    ``features`` is N x D float32 (often a read-only memmap), ``labels`` N int64,
    ``splits`` N strings. ``key`` identifies the cached artifact (model fingerprint + prepared
    data + layer + precision), ``meta`` says how it was made (model, weights, device...).
    ``info`` is the dataset's (None for arrays built by hand): with it, :func:`medxfer.evaluate`
    applies the dataset's own paper settings (5-way episodes, the 10,001-image pool...).
    ``built`` says whether this call extracted them (False: read from the cache).
    """

    features: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    records: list[Record]
    class_names: tuple[str, ...]
    model: str
    dataset: str
    key: str = ""
    info: DatasetInfo | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    built: bool = False

    def __post_init__(self) -> None:
        n = len(self.records)
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise UsageError(f"features must be N x D with N={n}, got {self.features.shape}")
        if len(self.labels) != n or len(self.splits) != n:
            raise UsageError("labels and splits must be aligned with the records")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def headline_metric(self) -> str:
        """The dataset's many-shot headline metric (accuracy when unknown)."""
        return self.info.headline_metric if self.info is not None else "accuracy"

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.splits == split)

    def subset(self, indices: Any) -> FeatureSet:
        """The rows ``indices`` (e.g. without images that could not be decoded)."""
        idx = np.asarray(indices, dtype=np.int64)
        return FeatureSet(np.asarray(self.features)[idx], self.labels[idx], self.splits[idx],
                          [self.records[i] for i in idx], self.class_names, self.model, self.dataset,
                          self.key, self.info, dict(self.meta), self.built)

    @classmethod
    def from_arrays(cls, features: np.ndarray, labels: Any, splits: Any = None,
                    class_names: tuple[str, ...] | None = None, model: str = "array",
                    dataset: str = "array", info: DatasetInfo | None = None) -> FeatureSet:
        """Build a feature set from plain arrays (tests, notebooks, precomputed features)."""
        labels_a = np.asarray(labels, dtype=np.int64)
        n = len(labels_a)
        splits_a = np.asarray(["train"] * n if splits is None else list(splits), dtype=object)
        names = class_names or tuple(str(c) for c in range(int(labels_a.max()) + 1 if n else 0))
        recs = [Record(path=f"<array>#{i}", label=int(labels_a[i]), split=str(splits_a[i])) for i in range(n)]
        return cls(np.asarray(features, dtype=np.float32), labels_a, splits_a, recs, tuple(names), model, dataset,
                   info=info)
