"""The artifacts cells read, as explicit build steps for executors that schedule them first.

Every cell's protocol declares the cache artifacts it reads (:meth:`Needs.artifacts
<medxfer.protocols.base.Needs.artifacts>`): prepared images at a (size, transform), features
of a layer. :func:`dependencies` turns a grid into the distinct :class:`Prepare` and
:class:`Extract` steps it needs (each (dataset, transform) once, each (model, dataset, layer)
once) and, per cell, the steps it waits for; :func:`build_step` runs one step through a
:class:`~medxfer.cell.Session`, so the cell later finds the artifact complete in the cache.
Nothing here branches on a protocol's name.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medxfer.cell import Cell, Session
from medxfer.protocols.base import PROTOCOLS


@dataclass(frozen=True)
class Prepare:
    """Decode a dataset (by its label in the run) at ``size`` with transform ``resize``."""

    dataset: str
    size: int
    resize: str

    def describe(self) -> str:
        return f"prepare {self.dataset} ({self.size}px, {self.resize})"


@dataclass(frozen=True)
class Extract:
    """Extract ``layer`` features of ``model`` on a dataset prepared with ``resize``;
    ``prepare`` is the step it reads."""

    model: str
    dataset: str
    layer: str
    resize: str
    prepare: Prepare

    def describe(self) -> str:
        return f"extract {self.model} on {self.dataset} ({self.layer}, {self.resize})"


Step = Prepare | Extract


@dataclass
class Dependencies:
    """The distinct steps of a grid, in a buildable order, and each cell's steps."""

    steps: list[Step]
    of_cell: dict[str, list[Step]]  # cell id -> the steps it reads

    @property
    def prepares(self) -> list[Prepare]:
        return [s for s in self.steps if isinstance(s, Prepare)]

    @property
    def extracts(self) -> list[Extract]:
        return [s for s in self.steps if isinstance(s, Extract)]


def cell_steps(cell: Cell, session: Session) -> list[Step]:
    """The prepare and extract steps whose artifacts ``cell`` reads (from its protocol's
    declared needs and its parameters with the dataset's own settings)."""
    spec = session.spec
    proto = PROTOCOLS.get(cell.protocol)
    params = session.context(cell).params()
    steps: list[Step] = []
    for need in proto.needs.artifacts(params):
        resize = need.resize or spec.resize
        if need.kind == "features":
            prep = Prepare(cell.dataset.label, spec.image_size, resize)
            steps += [prep, Extract(cell.model, cell.dataset.label, need.layer, resize, prep)]
        else:
            steps.append(Prepare(cell.dataset.label, need.size or spec.image_size, resize))
    return list(dict.fromkeys(steps))


def dependencies(cells: Sequence[Cell], session: Session) -> Dependencies:
    """Every distinct step of ``cells`` once (prepares before the extracts that read them)."""
    of_cell = {c.id: cell_steps(c, session) for c in cells}
    seen = dict.fromkeys(s for steps in of_cell.values() for s in steps)
    ordered = [s for s in seen if isinstance(s, Prepare)] + [s for s in seen if isinstance(s, Extract)]
    return Dependencies(ordered, of_cell)


def build_step(step: Step, session: Session) -> dict[str, Any]:
    """Build (or find complete in the cache) the artifact of ``step``: ``{"key", "built",
    "seconds"}`` (``built``: this call built it)."""
    arg = next(d for d in session.spec.datasets if d.label == step.dataset)
    t0 = time.perf_counter()
    if isinstance(step, Prepare):
        p, _ = session.prepared(arg, step.size, step.resize)
        key, built = p.key, p.built
    else:
        f, _ = session.features(step.model, arg, step.layer, step.resize)
        key, built = f.key, f.built
    return {"step": step.describe(), "key": key, "built": bool(built), "seconds": time.perf_counter() - t0}
