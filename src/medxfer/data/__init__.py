"""Datasets: the record contract, the registry, official-layout adapters, generic sources."""
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DATASETS, DatasetAdapter, load_dataset, register_dataset

__all__ = ["DATASETS", "Dataset", "DatasetAdapter", "DatasetError", "DatasetInfo", "Record",
           "load_dataset", "register_dataset"]

from medxfer.data import builtin as _builtin  # noqa: E402,F401  (registers built-in adapters)
