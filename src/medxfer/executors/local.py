"""The local executor: every cell in this process, one after the other."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

from medxfer.cell import Cell, CellOutcome, Session, execute_cell

log = logging.getLogger(__name__)


class LocalExecutor:
    """Runs the cells one by one in this process (the run has checked them against their
    labels already); a cell that fails is recorded and the rest go on."""

    def preflight(self, cells: Sequence[Cell], session: Session) -> None:
        """Nothing to check: the cells run here."""

    def run(self, cells: Sequence[Cell], session: Session) -> Iterator[CellOutcome]:
        for cell in cells:
            yield execute_cell(cell, session)


def _register() -> None:
    from medxfer.executors import register_executor

    register_executor("local", LocalExecutor)


_register()
