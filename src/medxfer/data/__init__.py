"""Datasets: the record contract, the registry, official-layout adapters, generic sources."""
from medxfer.data.records import Dataset, DatasetError, DatasetInfo, Record
from medxfer.data.registry import DATASETS, DatasetAdapter, load_dataset, register_dataset

from medxfer.data import builtin as _builtin  # noqa: E402,F401  (registers built-in adapters)
from medxfer.data.splits import read_split_file, write_split_file  # noqa: E402
from medxfer.data.synthetic import write_synthetic  # noqa: E402
from medxfer.data.validate import validate_dataset  # noqa: E402

__all__ = ["DATASETS", "Dataset", "DatasetAdapter", "DatasetError", "DatasetInfo", "Record",
           "load_dataset", "read_split_file", "register_dataset", "validate_dataset", "write_split_file",
           "write_synthetic"]
