"""Evaluation protocols (registered in :data:`medxfer.protocols.base.PROTOCOLS`).

Every public module of this package (and of :mod:`medxfer.analysis`, when present) is imported
here so its ``register_protocol`` call runs: adding a protocol touches only its own module.
"""
import importlib
import pkgutil

from medxfer.protocols.base import PROTOCOLS, EvalResult, Protocol, register_protocol

for _package in ("medxfer.protocols", "medxfer.analysis"):
    try:
        _pkg = importlib.import_module(_package)
    except ModuleNotFoundError:
        continue
    for _mod in pkgutil.iter_modules(_pkg.__path__):
        if not _mod.name.startswith("_"):
            importlib.import_module(f"{_package}.{_mod.name}")

__all__ = ["PROTOCOLS", "EvalResult", "Protocol", "register_protocol"]
