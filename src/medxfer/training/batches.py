"""Seeded batches: endless shuffled batch indices, replayable after a resume, and batch loading
from a prepared uint8 store (a memmap, read in sorted order)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from medxfer.prepare import PreparedImages


class SeededBatches:
    """Endless shuffled batches of ``range(n)``, epoch by epoch, from a local generator.

    The last partial batch of an epoch is dropped when ``n >= batch_size``. A resumed run
    calls :meth:`skip` with the number of batches already drawn and sees the same order (the
    sampler is cheap to replay from its seed, so its state need not be saved).
    """

    def __init__(self, n: int, batch_size: int, generator: torch.Generator) -> None:
        if n < 1 or batch_size < 1:
            raise ValueError(f"need at least one row and a positive batch, got n={n}, batch_size={batch_size}")
        self.n = n
        self.batch_size = batch_size
        self._it = self._iterate(generator)

    def _iterate(self, g: torch.Generator) -> Iterator[np.ndarray]:
        n, b = self.n, self.batch_size
        while True:
            perm = torch.randperm(n, generator=g).numpy()
            stop = n - n % b if n >= b else n
            for s in range(0, stop, b):
                yield perm[s : s + b]

    def __iter__(self) -> SeededBatches:
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def skip(self, batches: int) -> None:
        for _ in range(batches):
            next(self._it)


def load_batch(prepared: PreparedImages, idx: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Rows ``idx`` of a prepared store as a uint8 B x C x H x W tensor on ``device``."""
    order = np.argsort(idx)  # sorted reads are much faster on a memmap
    arr = np.asarray(prepared.array[idx[order]])
    arr = arr[np.argsort(order)]
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device).permute(0, 3, 1, 2)
