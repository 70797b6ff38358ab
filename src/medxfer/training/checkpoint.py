"""Training checkpoints: independent state copies and atomic, keyed checkpoint files.

A checkpoint records a ``key`` (a hash of everything that decides the run's numbers); one
made with other settings is ignored with a warning, never resumed.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medxfer.cache import atomic_path

log = logging.getLogger(__name__)


def snapshot_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """An independent copy of ``module``'s state (parameters and buffers) on the CPU.

    The copy must not alias the live tensors: ``module.state_dict()`` alone returns
    references that keep changing as training goes on (the original code's bug).
    """
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def nonpersistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers left out of ``state_dict()`` (e.g. a memory bank of negatives), copied to the CPU:
    a resumed run needs them too."""
    persistent = set(module.state_dict())
    return {k: v.detach().to("cpu", copy=True) for k, v in module.named_buffers() if k not in persistent}


def restore_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Copy saved non-persistent buffers back into ``module`` (names must exist)."""
    live = dict(module.named_buffers())
    with torch.no_grad():
        for k, v in buffers.items():
            live[k].copy_(v.to(live[k].device))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` atomically (a crash never leaves half a file)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path | None, key: str, what: str) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if it exists and was made with ``key``; else None (a
    mismatching one is ignored with a warning). Read with ``weights_only=True``."""
    if path is None or not path.is_file():
        return None
    ck = torch.load(path, map_location="cpu", weights_only=True)
    if ck.get("key") == key:
        return ck
    log.warning("%s: ignoring %s (made with different settings)", what, path)
    return None
