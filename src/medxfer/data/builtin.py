"""Imports every built-in adapter module so that it registers itself."""
from medxfer.data import bach, generic, ichallenge, tbcxr  # noqa: F401
