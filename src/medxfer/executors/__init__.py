"""Executors decide where and when cells run; every executor calls :func:`medxfer.cell.run_cell`.

``local`` (default) runs the cells one by one in this process; ``ray`` runs the grid's
prepare, extract and cell tasks on a Ray cluster (:mod:`medxfer.executors.ray`). Third-party
executors register an :class:`Executor` in :data:`EXECUTORS`.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from medxfer.cell import Cell, CellOutcome, Session
from medxfer.registry import Registry


class Executor(Protocol):
    """Runs cells and gives one outcome per cell, in the cells' order (as they finish, where it
    can: a run that stops part-way records the cells done); ``preflight`` is
    called before anything is written (the Ray executor checks the cluster's resources)."""

    def preflight(self, cells: Sequence[Cell], session: Session) -> None: ...

    def run(self, cells: Sequence[Cell], session: Session) -> Iterable[CellOutcome]: ...


EXECUTORS: Registry[Callable[[], Executor]] = Registry("executor", "medxfer.executors")


def register_executor(name: str, factory: Callable[[], Executor]) -> None:
    EXECUTORS.register(name, factory)


from medxfer.executors import local as _local  # noqa: E402,F401  (registers "local")
from medxfer.executors import ray as _ray  # noqa: E402,F401  (registers "ray"; Ray itself is imported on use)
