"""Train/val/test split assignment: seeded, stratified, patient-level, saved and reloaded.

Every adapter takes a ``split`` option:

- ``"default"``: the dataset's official split where it has one, else a seeded 80/20
  train/test split, stratified by class and patient-level wherever patient ids exist;
- ``"paper"``: the split the authors' code used (image-level, see DATASETS.md);
- a path to a split file written by :func:`write_split_file` (CSV ``path,split`` with paths
  relative to the dataset root), to reuse a shipped split exactly.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from medxfer.cache import file_sha256, write_text_atomic
from medxfer.data.common import Issues, read_csv_rows
from medxfer.data.records import SPLITS, Dataset, DatasetError, Record
from medxfer.errors import UsageError

SplitFn = Callable[[list[Record]], list[str]]
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


def normalise_split_name(value: str) -> str | None:
    """``"Validation"`` -> ``"val"``; None when not a split name."""
    return SPLIT_ALIASES.get(value.strip().lower())


def identity_keys(paths: Sequence[str]) -> list[str]:
    """Each record's identity for seeded splits: its path relative to the records' common folder
    (array references kept), so a split never depends on list order and the same images give
    the same split through any adapter (a folder, a CSV listing them in another order)."""
    files = [p.partition("#")[0] for p in paths]
    if not files:
        return []
    try:
        common = os.path.commonpath([os.path.dirname(f) or "." for f in files])
    except ValueError:  # mixed absolute and relative paths: keep them whole
        common = ""
    return [(os.path.relpath(f, common) if common else f) + ("#" + p.partition("#")[2] if "#" in p else "")
            for f, p in zip(files, paths)]


def stratified_split(labels: Sequence[int], groups: Sequence[str | None] | None = None, *,
                     seed: int | tuple[int, ...], test_fraction: float = 0.2,
                     ids: Sequence[str] | None = None) -> list[str]:
    """Seeded train/test assignment, stratified by class, keeping each group on one side.

    Without groups (or where a group is None) each image is its own group, identified by
    ``ids`` (e.g. :func:`identity_keys`; default: its position). A group's stratum
    is its most frequent label (ties: the smaller label). The number of test groups,
    ``round(test_fraction * groups)``, is shared out over the strata by largest remainder
    (see :func:`_allocate`); within each stratum the groups are shuffled by
    ``np.random.default_rng(seed)`` and the first ones go to test. When every group is one
    image and ``test_fraction * n_class`` is whole, class ``c`` gets exactly that many test images.
    """
    n = len(labels)
    keys = [(groups[i] if groups is not None and groups[i] is not None
             else f"#image:{ids[i]}" if ids is not None else f"#image{i}") for i in range(n)]
    members: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        members[k].append(i)
    strata: dict[int, list[str]] = defaultdict(list)
    for key in sorted(members):
        c = Counter(labels[i] for i in members[key])
        top = max(c.values())
        strata[min(lbl for lbl, v in c.items() if v == top)].append(key)
    n_test = _allocate(test_fraction, {label: len(keys_) for label, keys_ in strata.items()})
    rng = np.random.default_rng(seed)
    out = ["train"] * n
    for label in sorted(strata):
        group_keys = strata[label]
        order = rng.permutation(len(group_keys))
        for j in order[:n_test[label]]:
            for i in members[group_keys[j]]:
                out[i] = "test"
    return out


def _allocate(fraction: float, sizes: dict[int, int]) -> dict[int, int]:
    """Share ``round(fraction * total)`` over strata: floors first, then largest remainders
    (ties: the smaller label), never more than a stratum holds."""
    total = int(round(fraction * sum(sizes.values())))
    exact = {k: fraction * v for k, v in sizes.items()}
    out = {k: int(np.floor(x + 1e-9)) for k, x in exact.items()}
    left = total - sum(out.values())
    for k in sorted(sizes, key=lambda k: (-(exact[k] - out[k]), k)):
        if left <= 0:
            break
        if out[k] < sizes[k]:
            out[k] += 1
            left -= 1
    return out


def shuffled_split(n: int, n_train: int, seed: int = 42) -> list[str]:
    """The authors' image-level split: permute rows with seed ``seed``, first ``n_train`` train.

    Uses a local ``np.random.RandomState(seed)`` permutation (no global seeding).
    """
    order = np.random.RandomState(seed).permutation(n)
    out = ["test"] * n
    for i in order[:n_train]:
        out[int(i)] = "train"
    return out


def paper_80_20(records: list[Record]) -> list[str]:
    """Image-level 80/20 train/test split with seed 42 (the authors' small-dataset split)."""
    return shuffled_split(len(records), int(0.8 * len(records)), seed=42)


def record_key(root: Path, path: str) -> str:
    """A record's path relative to the dataset root, in POSIX form (array refs kept)."""
    file, sep, ref = path.partition("#")
    try:
        rel = Path(file).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = Path(file).as_posix()
    return rel + sep + ref


def write_split_file(dataset: Dataset, path: str | os.PathLike[str]) -> Path:
    """Write ``dataset``'s split assignment as CSV ``path,split`` (paths relative to its root)."""
    root = Path(dataset.root)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "split"])
    for r in dataset.records:
        w.writerow([record_key(root, r.path), r.split])
    out = Path(path)
    write_text_atomic(out, buf.getvalue())
    return out


def read_split_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read a split file into ``{relative path: split}``, checking every split name."""
    p = Path(path)
    out: dict[str, str] = {}
    for line, row in read_csv_rows(p, ["path", "split"]):
        split = normalise_split_name(row["split"])
        if split is None:
            raise DatasetError(f"{p}:{line}: unknown split {row['split']!r} (expected one of {', '.join(SPLITS)})")
        out[row["path"]] = split
    return out


def assign_splits(records: list[Record], root: Path, split: str, issues: Issues, *,
                  default: SplitFn, paper: SplitFn | None) -> tuple[list[Record], dict[str, str]]:
    """Apply the ``split`` option to ``records``; returns the records and options to record.

    With a split file, records missing from it are bad records (errors, or skipped).
    """
    if split == "default":
        names = default(records)
        return [replace(r, split=s) for r, s in zip(records, names)], {"split": "default"}
    if split == "paper":
        if paper is None:
            raise UsageError(f"dataset {issues.dataset!r} has no 'paper' split")
        names = paper(records)
        return [replace(r, split=s) for r, s in zip(records, names)], {"split": "paper"}
    file = Path(split).expanduser()
    if not file.is_file():
        raise UsageError(f"option split={split!r}: expected 'default', 'paper' or an existing split file")
    table = read_split_file(file)
    out: list[Record] = []
    for r in records:
        key = record_key(root, r.path)
        if key not in table:
            issues.bad(f"{key}: not listed in split file {file}", kind="not in split file")
            continue
        out.append(replace(r, split=table[key]))
    return out, {"split": "file", "split_file_sha256": file_sha256(file)[:16]}
