"""The local executor: every cell in this process, the label checks of all cells first."""
from __future__ import annotations

import logging
from collections.abc import Sequence

from medxfer.cell import Cell, CellOutcome, Session, check_cell, execute_cell
from medxfer.errors import MedxferError

log = logging.getLogger(__name__)


class LocalExecutor:
    """Checks every cell against its labels before any image is decoded (fail fast), then
    runs the others one by one; a cell that fails is recorded and the rest go on."""

    def run(self, cells: Sequence[Cell], session: Session) -> list[CellOutcome]:
        outcomes: dict[int, CellOutcome] = {}
        for i, cell in enumerate(cells):
            try:
                check_cell(cell, session)
            except MedxferError as exc:
                log.error("%s cannot run: %s", cell.describe(), exc)
                outcomes[i] = CellOutcome(cell, "failed", error=str(exc))
        for i, cell in enumerate(cells):
            if i not in outcomes:
                outcomes[i] = execute_cell(cell, session)
        return [outcomes[i] for i in range(len(cells))]


def _register() -> None:
    from medxfer.executors import register_executor

    register_executor("local", LocalExecutor)


_register()
