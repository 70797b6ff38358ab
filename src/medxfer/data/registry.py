"""The dataset registry: name -> adapter (DatasetInfo + typed options + loader)."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from medxfer.data.records import Dataset, DatasetInfo
from medxfer.errors import ParamError
from medxfer.registry import Registry
from medxfer.typed import build, setting


@dataclass(frozen=True)
class DatasetOptions:
    """Options every adapter takes; adapters subclass it with their own (one typed object each).

    ``split``: ``"default"`` (the official split where one exists, else a seeded 80/20 split,
    patient-level where patients are known), ``"paper"`` (the authors' split) or a split file.
    """

    split: str = setting("default", help="default, paper, or a split file (CSV path,split)")
    seed: int = setting(0, help="seed of the seeded splits")
    high_range: int | None = setting(None, help="raw value of 16-bit greyscale images mapped to 255, the same "
                                     "for every image (None: the format's 65535; e.g. 4095 for 12-bit data)")


Loader = Callable[[Path, Any, bool], Dataset]


@dataclass(frozen=True)
class DatasetAdapter:
    """A registered dataset.

    ``loader(root, options, skip_bad) -> Dataset`` reads the official layout under ``root``;
    ``options`` is the adapter's :class:`DatasetOptions` subclass (its fields, types and
    defaults are the options; unknown or mistyped options are errors).
    """

    info: DatasetInfo
    loader: Loader
    options: type[DatasetOptions] = DatasetOptions
    generic: bool = False  # folder / csv / medmnist: info is built per call


DATASETS: Registry[DatasetAdapter] = Registry("dataset", "medxfer.datasets")


def register_dataset(adapter: DatasetAdapter, aliases: tuple[str, ...] = ()) -> DatasetAdapter:
    return DATASETS.register(adapter.info.name, adapter, aliases=aliases)


def dataset_options(name: str, options: dict[str, Any] | None = None,
                    spell: Callable[[str], str] | None = None) -> DatasetOptions:
    """The typed options of dataset ``name`` from user values (one clear error for bad ones,
    naming the option as ``spell`` writes it; default ``--dataset-option LABEL.KEY``)."""
    adapter = DATASETS.get(name)
    given = (options or {}).get("name")
    label = str(given) if adapter.generic and given else adapter.info.name  # the --dataset LABEL of the user's data
    return build(adapter.options, options, where=f"dataset {label!r}",
                 spell=spell or (lambda key: f"--dataset-option {label}.{key}"))


def load_dataset(name: str, /, root: str | os.PathLike[str], *, skip_bad: bool = False, **options: Any) -> Dataset:
    """Read dataset ``name`` (registered, or ``"folder"``/``"csv"``/``"medmnist"``) at ``root``."""
    adapter = DATASETS.get(name)
    opts = dataset_options(name, options)
    dataset = adapter.loader(Path(root).expanduser(), opts, skip_bad)
    if opts.high_range is not None:
        if opts.high_range < 1:
            raise ParamError(f"--dataset-option {name}.high_range={opts.high_range}: must be positive")
        dataset.info = replace(dataset.info, high_range=opts.high_range)
        dataset.options["high_range"] = opts.high_range
    return dataset
