"""medxfer: which pretrained backbone transfers best to your medical images.

``import medxfer`` is light (no torch): the API below is imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "evaluate": "medxfer.api", "extract_features": "medxfer.api", "finetune": "medxfer.api",
    "load_dataset": "medxfer.api", "load_model": "medxfer.api", "run": "medxfer.api",
    "DatasetArg": "medxfer.config", "RunSpec": "medxfer.config",
    "register_model": "medxfer.models", "MedxferError": "medxfer.errors",
}

__all__ = sorted([*_LAZY, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'medxfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
