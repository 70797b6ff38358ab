"""Executors decide where and when cells run; every executor calls :func:`medxfer.cell.run_cell`.

``local`` (default) runs the cells one by one in this process. Third-party executors (the Ray
executor goes here) register an :class:`Executor` in :data:`EXECUTORS`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from medxfer.cell import Cell, CellOutcome, Session
from medxfer.registry import Registry


class Executor(Protocol):
    """Runs cells and returns one outcome per cell, in the cells' order."""

    def run(self, cells: Sequence[Cell], session: Session) -> list[CellOutcome]: ...


EXECUTORS: Registry[Callable[[], Executor]] = Registry("executor", "medxfer.executors")


def register_executor(name: str, factory: Callable[[], Executor]) -> None:
    EXECUTORS.register(name, factory)


from medxfer.executors import local as _local  # noqa: E402,F401  (registers "local")
