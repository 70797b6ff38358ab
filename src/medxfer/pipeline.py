"""Run a whole grid: build the cells, hand them to an executor, write the summary.

Every cell's result carries a run key hashing everything that determines its numbers; a cell
whose result file already carries that key is reused, so a killed or extended run resumes
where it stopped (see :mod:`medxfer.cell`).
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medxfer.cache import write_json_atomic, write_text_atomic
from medxfer.cell import Cell, CellOutcome, Session
from medxfer.config import RunSpec
from medxfer.errors import UsageError
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

    ``progress``: force bars on or off (None: they follow the ``medxfer`` logger). Every cell
    is checked against its labels first (a failing cell is recorded, before any image is
    decoded); ``run.json`` is written before the first cell runs (status ``running``) so a
    killed run can be resumed from it (``medxfer run --resume RUN_DIR``, :func:`resume_spec`).
    """
    from medxfer.cell import check_cells
    from medxfer.executors import EXECUTORS
    from medxfer.grid import build_cells
    from medxfer.progress import forced

    spec = with_custom_models(spec)
    cells = build_cells(spec)
    executor = EXECUTORS.get(spec.executor)()
    session = Session(spec)
    with forced(progress):
        load_datasets(spec, session)
        runnable, failed = check_cells(cells, session)
        done: dict[str, CellOutcome] = {o.cell.id: o for o in failed}
        if runnable:
            executor.preflight(runnable, session)
            write_run_record(spec, session, cells, [], status="running")
            try:
                for o in executor.run(runnable, session):
                    done[o.cell.id] = o
            except BaseException as exc:  # recorded, then raised as it was
                record_stop(spec, session, cells, list(done.values()), exc)
                raise
    return finish(spec, session, [done[c.id] for c in cells])


def record_stop(spec: RunSpec, session: Session, cells: list[Cell], outcomes: list[CellOutcome],
                exc: BaseException) -> None:
    """Best effort: ``run.json`` says the run stopped (``interrupted``, or ``stopped`` with the
    error) and which cells finished, instead of ``running``; when even that cannot be written
    (the full disk that stopped the run) a warning says so and the original error stands."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    try:
        write_run_record(spec, session, cells, outcomes, status="interrupted" if interrupted else "stopped",
                         stop=None if interrupted else f"{type(exc).__name__}: {exc}")
    except Exception as again:  # never hide the error that stopped the run
        log.warning("run.json could not record that the run stopped (%s: %s)", type(again).__name__, again)


def load_datasets(spec: RunSpec, session: Session) -> None:
    """Read every dataset of the run before any cell: a missing root or a wrong layout is the
    user's input, so it stops the run with one :class:`DatasetError` naming the dataset and path."""
    from medxfer.data.records import DatasetError

    for arg in spec.datasets:
        try:
            session.dataset(arg)
        except DatasetError as exc:
            raise DatasetError(f"dataset {arg.label!r}: {exc}") from None


def with_custom_models(spec: RunSpec) -> RunSpec:
    """``spec`` with canonical model names and the full specs of the user's own checkpoints
    recorded in ``custom_models`` (so workers and resumed runs register them; nothing relies
    on a registry changed in this process)."""
    from medxfer.models import resolve_model_arg
    from medxfer.models.custom import custom_model_records, register_recorded_models

    register_recorded_models(spec.custom_models)
    names = tuple(resolve_model_arg(m) for m in spec.models)
    recorded = {d["name"]: d for d in spec.custom_models}
    for d in custom_model_records(names):
        recorded.setdefault(d["name"], d)
    return spec.with_(models=names, custom_models=tuple(recorded.values()))


RUN_RECORD = "run.json"


def read_run_record(run_dir: str | Path) -> dict[str, Any]:
    """``RUN_DIR/run.json``; a missing or unreadable one is a :class:`UsageError` naming it."""
    path = Path(run_dir).expanduser() / RUN_RECORD
    if not Path(run_dir).expanduser().is_dir():
        raise UsageError(f"--resume {run_dir}: no such run folder")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--resume {run_dir}: {path} not found (not a medxfer run folder, or a run "
                         "that stopped before its first cell)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--resume {run_dir}: {path} is unreadable ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("spec"), dict):
        raise UsageError(f"--resume {run_dir}: {path} holds no run spec")
    return data


def resume_spec(run_dir: str | Path, **changes: Any) -> RunSpec:
    """The run spec recorded in ``RUN_DIR/run.json``, writing into ``RUN_DIR`` (wherever the
    folder is now), with ``changes`` (e.g. another executor) applied."""
    record = read_run_record(run_dir)
    data = dict(record["spec"], out=str(Path(run_dir).expanduser()), **changes)
    return RunSpec.from_dict(data, where=str(Path(run_dir) / RUN_RECORD))


def write_run_record(spec: RunSpec, session: Session, cells: list[Cell], outcomes: list[CellOutcome],
                     status: str, stop: str | None = None) -> None:
    """``run.json``: the spec, versions, device, cache, every cell's status and, once cells
    ran, what is needed to reproduce them (weights hashes, split files, seeds)."""
    by_id = {o.cell.id: o for o in outcomes}
    cell_rows = []
    for c in cells:
        o = by_id.get(c.id)
        row = {"cell": c.id, "status": o.status if o else "pending", "error": o.error if o else None,
               "run_key": o.result.run_key if o is not None and o.result is not None else None}
        if o is not None and o.where:
            row["ran_on"] = o.where
        cell_rows.append(row)
    record: dict[str, Any] = {
        "schema": "medxfer.run/2", "status": status, "spec": spec.to_dict(), "seeds": list(spec.seeds),
        "versions": library_versions(), "git_revision": git_revision(), "device": session.device,
        "cache_dir": str(session.cache_dir), "host": socket.gethostname(), "pid": os.getpid(),
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cells": cell_rows,
    }
    if stop is not None:
        record["stopped_by"] = stop
    weights = {o.result.model: {"weights": o.result.model_info.weights, "weights_hash": o.result.model_info.weights_hash}
               for o in outcomes if o.result is not None}
    if weights:
        record["weights"] = dict(sorted(weights.items()))
    record.update(session.notes)
    splits = write_split_files(session)
    if splits:
        record["splits"] = splits
    write_json_atomic(session.out / RUN_RECORD, record)


def write_split_files(session: Session) -> dict[str, str]:
    """Each loaded dataset's split assignment as ``RUN_DIR/splits/LABEL.csv`` (reload it with
    the dataset option ``split=FILE``); label -> path relative to the run folder."""
    from medxfer.data.splits import write_split_file

    out = {}
    for label, ds in sorted(session.loaded_datasets().items()):
        rel = f"splits/{label}.csv"
        write_split_file(ds, session.out / rel)
        out[label] = rel
    return out


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
    status = "failed cells" if any(o.status == "failed" for o in outcomes) else "finished"
    write_run_record(spec, session, [o.cell for o in outcomes], outcomes, status=status)
    report = build_report(session.out, collection=Collection.of(results, session.out, read_run_info(session.out)))
    outcome.summary = report.summary
    outcome.report_path = report.html
    outcome.summary_path = session.out / "summary.md"
    write_text_atomic(outcome.summary_path, outcome.summary)
    return outcome
