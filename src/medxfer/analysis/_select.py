"""Which images an analysis looks at: seeded, by record identity, never by the model."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medxfer.data.records import Record
from medxfer.data.splits import identity_keys


def choose_rows(records: Sequence[Record], n: int | None, seed: int, *, splits: Sequence[str] | None = None,
                exclude: Sequence[int] = (), salt: int = 0) -> np.ndarray:
    """Up to ``n`` record indices (all with ``n=None``), drawn with a generator seeded from
    ``seed`` (and ``salt``, so two uses of one seed draw independently) over the records in
    identity order: every model of a run gets the same images, whatever the file order."""
    keys = identity_keys([r.path for r in records])
    allowed = [i for i, r in enumerate(records) if (splits is None or r.split in splits) and i not in set(exclude)]
    ordered = sorted(allowed, key=lambda i: keys[i])
    rng = np.random.default_rng([seed, 0xA11, salt])
    picked = [ordered[j] for j in rng.permutation(len(ordered))]
    return np.array(picked if n is None else picked[:n], dtype=np.int64)
