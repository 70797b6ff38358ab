"""The dataset contract: one table of records plus a DatasetInfo.

Every adapter (official layouts, generic folder/CSV/MedMNIST, synthetic) returns a
:class:`Dataset`. Records are aligned row for row with everything derived from them
(prepared images, features), so the record index is the address used by every stage.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medxfer.errors import UsageError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One image: where it is, its label index, its split, and what is known about it.

    ``path`` is an absolute file path, or ``"<file>#<key>/<index>"`` for images stored inside
    an array file (MedMNIST); :func:`medxfer.data.images.open_image` reads both.
    """

    path: str
    label: int
    split: str = "train"
    patient: str | None = None
    study: str | None = None
    view: str | None = None
    eye: str | None = None


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: task, classes, expected size, domain, licence, paper settings."""

    name: str
    task: str  # "binary" | "multiclass"
    class_names: tuple[str, ...]
    modality: str = "other"  # "chest-xray" | "fundus" | "histology" | "other"
    in_domain: bool = False  # chest X-ray, the domain of the domain-specific models
    expected_images: int | None = None  # in the full official release
    licence: str = "unknown"
    citation: str = ""
    fewshot_way: int = 2  # the paper's few-shot setting (2-way or 5-way)
    fewshot_shot: int = 20
    fewshot_pool: int | None = None  # few-shot draws from the first N train images (large sets); None = all
    fewshot_splits: tuple[str, ...] | None = None  # without fewshot_pool: the splits of the pool (None = all)
    headline_metric: str = "accuracy"  # many-shot headline ("mean_per_class_accuracy" for EyePACS)
    layout: str = ""  # the folder to point at, for help texts
    display_name: str | None = None  # as the paper prints it (e.g. "iChallenge-PM"); None: the name
    synthetic: bool = False  # written by medxfer's synthetic generators, not real data
    high_range: int = 65535  # raw value of 16-bit greyscale that maps to 255 (the same for every image)

    @property
    def label(self) -> str:
        return self.display_name or self.name

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class LabelView:
    """What a dataset says before any image is decoded: labels, splits (arrays), class names."""

    labels: Any
    splits: Any
    class_names: tuple[str, ...]
    name: str = ""


@dataclass
class Dataset:
    """Records + info + what went wrong while reading them.

    ``options`` holds every adapter option that changes the records (label policy, view
    filter, split mode, seed); it is part of :meth:`fingerprint`. ``problems`` lists
    human-readable messages about skipped rows/files (only non-empty with ``skip_bad``
    or for reported-but-harmless issues such as label rows without images).
    ``pairs`` are record-index pairs for multi-view invariance (or None when the dataset
    has no notion of pairs).
    """

    info: DatasetInfo
    records: list[Record]
    root: str
    options: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    pairs: list[tuple[int, int]] | None = None
    _fingerprints: tuple[str, str] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class name (classes with zero images included)."""
        out: dict[str, dict[str, int]] = {}
        c = Counter((r.split, r.label) for r in self.records)
        for split in sorted({r.split for r in self.records}, key=_split_order):
            out[split] = {name: c.get((split, i), 0) for i, name in enumerate(self.info.class_names)}
        return out

    def indices(self, split: str) -> list[int]:
        return [i for i, r in enumerate(self.records) if r.split == split]

    def fingerprints(self) -> tuple[str, str]:
        """``(content, files)`` hashes, computed once per Dataset object (they stat every file).

        *content* covers everything that determines the records' meaning: the records (path,
        label, split, metadata), the class names, the adapter options, and each file's size
        and modification time. *files* covers only the image files in record order (paths,
        sizes, modification times): what decoded pixels depend on, so a label-only option
        (CheXpert ``uncertain``) keeps the prepared images. A Dataset is not mutated after it
        is built (:func:`~medxfer.data.build.drop_records` makes a new one).
        """
        if self._fingerprints is None:
            content = hashlib.sha256()
            files = hashlib.sha256()
            content.update(json.dumps({"name": self.info.name, "classes": self.info.class_names,
                                       "options": self.options}, sort_keys=True, default=str).encode())
            stat_cache: dict[str, tuple[int, int]] = {}
            for r in self.records:
                f = r.path.split("#", 1)[0]
                if f not in stat_cache:
                    try:
                        st = os.stat(f)
                        stat_cache[f] = (st.st_size, st.st_mtime_ns)
                    except OSError:
                        stat_cache[f] = (-1, -1)
                stat = repr(stat_cache[f]).encode()
                content.update(json.dumps(asdict(r), sort_keys=True).encode())
                content.update(stat)
                files.update(json.dumps(r.path).encode())
                files.update(stat)
            self._fingerprints = (content.hexdigest()[:16], files.hexdigest()[:16])
        return self._fingerprints

    def fingerprint(self) -> str:
        """A hash of everything that determines this dataset's content (see :meth:`fingerprints`)."""
        return self.fingerprints()[0]

    def files_fingerprint(self) -> str:
        """A hash of the image files alone, in record order (see :meth:`fingerprints`)."""
        return self.fingerprints()[1]

    def label_view(self) -> LabelView:
        """Labels, splits and class names, for checks that need no image."""
        import numpy as np

        return LabelView(np.array([r.label for r in self.records], dtype=np.int64),
                         np.array([r.split for r in self.records], dtype=object), tuple(self.info.class_names),
                         self.info.name)

    def summary(self) -> dict[str, Any]:
        """The ``validate --json`` object."""
        return {
            "dataset": self.info.name,
            "total": len(self.records),
            "counts": self.counts(),
            "pairs": None if self.pairs is None else len(self.pairs),
            "problems": list(self.problems),
        }


def _split_order(s: str) -> tuple[int, str]:
    return (SPLITS.index(s) if s in SPLITS else len(SPLITS), s)


class DatasetError(UsageError):
    """A dataset cannot be used as given; the message names the file, row or key."""


class SymlinkError(DatasetError):
    """A symbolic link whose target lies outside the dataset folder; the message names both."""


def is_inside(root_r: Path, path_r: Path) -> bool:
    """Whether resolved ``path_r`` is resolved ``root_r`` or lies below it."""
    return path_r == root_r or root_r in path_r.parents


def link_outside(root_r: Path, candidate: Path) -> tuple[Path, Path] | None:
    """(link, its resolved target) for the first symbolic link on the way from ``root_r`` down
    to ``candidate`` whose target lies outside ``root_r``; None when there is none."""
    try:
        rel = candidate.relative_to(root_r)
    except ValueError:
        return None  # not below the root as written: check_inside's own test refuses it
    cur = root_r
    for part in rel.parts:
        cur = cur / part
        if cur.is_symlink():
            target = cur.resolve()
            if not is_inside(root_r, target):
                return cur, target
    return None


def check_inside(root: Path, candidate: Path, where: str) -> Path:
    """Resolve ``candidate`` and refuse paths that escape ``root`` (CSV path traversal), by
    ``..``, an absolute path, or a symbolic link to a target outside it
    (:class:`SymlinkError`, naming the link and its target)."""
    root_r = root.resolve()
    link = link_outside(root_r, candidate)
    if link is not None:
        raise SymlinkError(f"{where}: {str(link[0])!r} is a symbolic link to {str(link[1])!r}, outside the "
                           f"dataset folder {str(root_r)!r}")
    cand_r = candidate.resolve()
    if not is_inside(root_r, cand_r):
        raise DatasetError(f"{where}: path {str(candidate)!r} escapes the dataset folder {str(root_r)!r}")
    return cand_r
