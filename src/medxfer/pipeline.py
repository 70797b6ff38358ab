"""Run a whole grid: build the cells, hand them to an executor, write the summary.

Every cell's result carries a run key hashing everything that determines its numbers; a cell
whose result file already carries that key is reused, so a killed or extended run resumes
where it stopped (see :mod:`medxfer.cell`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from medxfer.cache import write_json_atomic, write_text_atomic
from medxfer.cell import Cell, CellOutcome, Session
from medxfer.config import RunSpec
from medxfer.results import Result, git_revision, library_versions, load_results

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What ``run`` did: every cell's outcome, the results, and the summary."""

    out: Path
    outcomes: list[CellOutcome] = field(default_factory=list)
    summary_path: Path | None = None
    summary: str = ""
    report_path: Path | None = None  # report/report.html

    @property
    def results(self) -> list[Result]:
        return [o.result for o in self.outcomes if o.result is not None]

    @property
    def computed(self) -> list[Cell]:
        return [o.cell for o in self.outcomes if o.status == "computed"]

    @property
    def reused(self) -> list[Cell]:
        return [o.cell for o in self.outcomes if o.status == "reused"]

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def run(spec: RunSpec, progress: bool | None = None) -> RunOutcome:
    """Run every cell of ``spec`` not already done; write results, ``run.json`` and ``summary.md``.

    ``progress``: force bars on or off (None: they follow the ``medxfer`` logger).
    """
    from medxfer.executors import EXECUTORS
    from medxfer.grid import build_cells
    from medxfer.progress import forced

    cells = build_cells(spec)
    session = Session(spec)
    with forced(progress):
        outcomes = EXECUTORS.get(spec.executor)().run(cells, session)
    return finish(spec, session, outcomes)


def finish(spec: RunSpec, session: Session, outcomes: list[CellOutcome]) -> RunOutcome:
    """Record the run, write the report of every result in the run folder (this run's and
    earlier ones: ``report/``, see :func:`medxfer.report.build.build_report`) and the summary;
    a run that produced no result leaves nothing behind."""
    from medxfer.report.build import build_report
    from medxfer.report.collect import Collection, read_run_info

    outcome = RunOutcome(out=session.out, outcomes=outcomes)
    results = load_results(session.results_dir) if session.results_dir.is_dir() else []
    if not results:
        return outcome
    write_json_atomic(session.out / "run.json", {
        "schema": "medxfer.run/1", "spec": spec.to_dict(), "versions": library_versions(),
        "git_revision": git_revision(), "device": session.device, "cache_dir": str(session.cache_dir),
        "cells": [{"cell": o.cell.id, "status": o.status, "error": o.error,
                   "run_key": o.result.run_key if o.result is not None else None} for o in outcomes],
    })
    report = build_report(session.out, collection=Collection.of(results, session.out, read_run_info(session.out)))
    outcome.summary = report.summary
    outcome.report_path = report.html
    outcome.summary_path = session.out / "summary.md"
    write_text_atomic(outcome.summary_path, outcome.summary)
    return outcome
