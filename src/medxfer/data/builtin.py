"""Imports every built-in adapter module so that it registers itself."""
from medxfer.data import generic  # noqa: F401
