"""Datasets: the record contract, the registry, official-layout adapters, generic sources."""
from medxfer.data import builtin as _builtin  # noqa: F401  (registers built-in adapters)
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record, SymlinkError
from medxfer.data.registry import (
           DATASETS,
           DatasetAdapter,
           load_dataset,
           register_dataset,
)
from medxfer.data.splits import read_split_file, write_split_file
from medxfer.data.synthetic import write_synthetic
from medxfer.data.validate import validate_dataset

__all__ = ["DATASETS", "Dataset", "DatasetAdapter", "DatasetError", "DatasetInfo", "Record",
           "SymlinkError", "load_dataset", "read_split_file", "register_dataset", "validate_dataset", "write_split_file",
           "write_synthetic"]
