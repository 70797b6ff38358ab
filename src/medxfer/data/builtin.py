"""Imports every built-in adapter module so that it registers itself."""
from medxfer.data import (  # noqa: F401
    bach,
    chestxray14,
    chexpert,
    eyepacs,
    generic,
    ichallenge,
    medmnist,
    tbcxr,
)
