"""The dataset registry: name -> adapter (DatasetInfo + loader)."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medxfer.data.records import Dataset, DatasetInfo
from medxfer.registry import Registry

Loader = Callable[..., Dataset]


@dataclass(frozen=True)
class DatasetAdapter:
    """A registered dataset.

    ``loader(root: Path, *, skip_bad: bool = False, **options) -> Dataset`` reads the
    official layout under ``root``. ``options`` documents each accepted option with its
    default (e.g. ``{"uncertain": "u_ones"}``); unknown options are errors.
    """

    info: DatasetInfo
    loader: Loader
    options: dict[str, Any] = field(default_factory=dict)
    generic: bool = False  # folder / csv / medmnist: info is built per call


DATASETS: Registry[DatasetAdapter] = Registry("dataset", "medxfer.datasets")


def register_dataset(adapter: DatasetAdapter, aliases: tuple[str, ...] = ()) -> DatasetAdapter:
    return DATASETS.register(adapter.info.name, adapter, aliases=aliases)


def load_dataset(name: str, root: str | os.PathLike[str], /, *, skip_bad: bool = False, **options: Any) -> Dataset:
    """Read dataset ``name`` (registered, or ``"folder"``/``"csv"``/``"medmnist"``) at ``root``."""
    adapter = DATASETS.get(name)
    unknown = sorted(set(options) - set(adapter.options))
    if unknown:
        known = ", ".join(f"{k} (default {v!r})" for k, v in adapter.options.items()) or "none"
        raise ValueError(f"dataset {adapter.info.name!r} has no option {', '.join(unknown)}; options: {known}")
    return adapter.loader(Path(root).expanduser(), skip_bad=skip_bad, **options)
