"""Assembling a :class:`Dataset` from records, and dropping bad records afterwards."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from medxfer.data.common import Issues
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.splits import SplitFn, assign_splits, identity_keys, stratified_split

PairFn = Callable[[list[Record]], list[tuple[int, int]]]


def default_split_fn(seed: int | tuple[int, ...], use_patients: bool = True) -> SplitFn:
    """Seeded stratified 80/20 train/test, patient-level when records carry patient ids; other
    images are identified by their path (:func:`identity_keys`), never by their position."""
    def fn(records: list[Record]) -> list[str]:
        groups = [r.patient for r in records] if use_patients else None
        return stratified_split([r.label for r in records], groups, seed=seed,
                                ids=identity_keys([r.path for r in records]))
    return fn


def keep_given_or(fallback: SplitFn, given: list[str | None]) -> SplitFn:
    """Use the splits given by the layout (all records must have one), else ``fallback``."""
    def fn(records: list[Record]) -> list[str]:
        if given and all(s is not None for s in given):
            return [s for s in given if s is not None]
        return fallback(records)
    return fn


def finish_dataset(info: DatasetInfo, records: list[Record], root: Path, issues: Issues,
                   options: dict[str, Any], *, split: str, default: SplitFn,
                   paper: SplitFn | None = None, pairs: PairFn | None = None) -> Dataset:
    """Assign splits, find pairs, raise or record problems, and build the Dataset."""
    if not records and issues.n_bad == 0:
        raise DatasetError(f"{root}: no images found for dataset {info.name!r}"
                           + (f"; expected layout: {info.layout}" if info.layout else ""))
    records, split_opts = assign_splits(records, root, split, issues, default=default, paper=paper)
    problems = issues.finish()
    if not records:
        raise DatasetError(f"{root}: dataset {info.name!r} has no usable images left; problems:\n  "
                           + "\n  ".join(problems[:20]))
    present = {r.label for r in records}
    missing = [info.class_names[i] for i in range(info.num_classes) if i not in present]
    if missing:
        problems.append(f"no images of class(es) {', '.join(missing)}")
    opts = dict(options)
    opts.update(split_opts)
    if is_synthetic(root):
        info = replace(info, synthetic=True)
    return Dataset(info=info, records=records, root=str(root.resolve()), options=opts,
                   problems=problems, pairs=pairs(records) if pairs is not None else None)


def is_synthetic(root: Path, levels: int = 3) -> bool:
    """Whether ``root`` (or a folder up to ``levels`` above it) holds the marker that
    :func:`medxfer.data.synthetic.write_synthetic` leaves."""
    from medxfer.data.synthetic import SYNTHETIC_MARKER

    folder = root.resolve() if root.is_dir() else root.resolve().parent
    for candidate in [folder, *list(folder.parents)[:levels]]:
        if (candidate / SYNTHETIC_MARKER).is_file():
            return True
    return False


def drop_records(dataset: Dataset, bad: Iterable[int], messages: Iterable[str] = ()) -> Dataset:
    """A copy of ``dataset`` without the records at ``bad`` (pairs re-indexed, messages added)."""
    bad_set = set(bad)
    new_index: dict[int, int] = {}
    kept: list[Record] = []
    for i, r in enumerate(dataset.records):
        if i not in bad_set:
            new_index[i] = len(kept)
            kept.append(r)
    pairs = None
    if dataset.pairs is not None:
        pairs = [(new_index[a], new_index[b]) for a, b in dataset.pairs if a in new_index and b in new_index]
    return Dataset(info=dataset.info, records=kept, root=dataset.root, options=dict(dataset.options),
                   problems=list(dataset.problems) + list(messages), pairs=pairs)
