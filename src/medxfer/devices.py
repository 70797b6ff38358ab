"""The one place that picks the compute device."""
from __future__ import annotations

import torch


def resolve_device(device: str | None = None) -> str:
    """``device`` as given, or ``"cuda"`` when available, else ``"cpu"``."""
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"
