"""Train / validation / test index sets for the many-shot protocols."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medxfer.errors import UsageError


@dataclass(frozen=True)
class SplitIndices:
    """Row indices of each split; ``val_source`` says where the validation rows came from."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_source: str  # "dataset" (the dataset's own val split) or "carved" (from train)

    def as_dict(self) -> dict[str, object]:
        return {"n_train": int(self.train.size), "n_val": int(self.val.size), "n_test": int(self.test.size),
                "val_source": self.val_source}


def carve_validation(labels: np.ndarray, fraction: float, seed: int, stratified: bool,
                     keys: list[str] | None = None, generator: str = "default") -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(labels)-1`` into (fit, val) with a local generator.

    Non-stratified: a random ``round(fraction * n)`` subset (the authors drew a random 20% of
    train with numpy seed 0). Stratified: ``round(fraction * n_c)`` of every class, at least
    one per class with two or more images, so every class with data is in both parts.
    ``keys`` (each row's identity, e.g. its path): rows are taken in key order before the
    seeded draw, so the carve does not depend on the order the rows come in.
    ``generator="legacy"`` (``--compat paper``): the authors' ``numpy.random.RandomState(seed)``
    permutation of the rows in the order given, first ``round(fraction * n)`` to validation.
    """
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"validation fraction must be in (0, 1), got {fraction}")
    if keys is not None:
        order = np.argsort(np.asarray(keys, dtype=object), kind="stable")
        fit, val = carve_validation(np.asarray(labels)[order], fraction, seed, stratified)
        return np.sort(order[fit]), np.sort(order[val])
    n = len(labels)
    if generator == "legacy":
        perm = np.random.RandomState(seed).permutation(n)
        n_val = int(round(fraction * n))
        if n_val == 0 or n_val == n:
            raise UsageError(f"cannot carve a {fraction:.0%} validation split from {n} training rows")
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    rng = np.random.default_rng(seed)
    if not stratified:
        perm = rng.permutation(n)
        n_val = int(round(fraction * n))
        if n_val == 0 or n_val == n:
            raise UsageError(f"cannot carve a {fraction:.0%} validation split from {n} training rows")
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])
    val_parts = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rows = rows[rng.permutation(rows.size)]
        n_val = int(round(fraction * rows.size))
        if rows.size >= 2:
            n_val = min(max(n_val, 1), rows.size - 1)
        else:
            n_val = 0
        val_parts.append(rows[:n_val])
    val = np.sort(np.concatenate(val_parts)) if val_parts else np.array([], dtype=np.int64)
    if val.size == 0:
        raise UsageError(f"cannot carve a validation split from {n} training rows")
    fit = np.setdiff1d(np.arange(n), val)
    return fit, val


def many_shot_splits(splits: np.ndarray, labels: np.ndarray, *, val_fraction: float, val_seed: int,
                     stratified: bool, what: str = "dataset", keys: list[str] | None = None,
                     generator: str = "default") -> SplitIndices:
    """The dataset's own train/val/test, carving a seeded validation set from train when absent
    (in the order of the rows' ``keys`` when given: see :func:`carve_validation`)."""
    splits = np.asarray(splits).astype(str)
    train = np.flatnonzero(splits == "train")
    val = np.flatnonzero(splits == "val")
    test = np.flatnonzero(splits == "test")
    unknown = sorted(set(splits.tolist()) - {"train", "val", "test"})
    if unknown:
        raise UsageError(f"{what}: unknown split name(s) {unknown}; expected train/val/test")
    if test.size == 0:
        raise UsageError(f"{what} has no 'test' split: the many-shot protocols report test metrics "
                         "(give the dataset a test split, e.g. a seeded split option of its adapter)")
    if train.size == 0:
        raise UsageError(f"{what} has no 'train' split")
    if val.size:
        return SplitIndices(train, val, test, "dataset")
    train_keys = None if keys is None or generator == "legacy" else [keys[i] for i in train]
    fit_pos, val_pos = carve_validation(np.asarray(labels)[train], val_fraction, val_seed, stratified, train_keys,
                                        generator)
    return SplitIndices(train[fit_pos], train[val_pos], test, "carved")
