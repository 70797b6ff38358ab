"""The Ray executor: the grid's tasks on a Ray cluster, calling the same cell function.

``--executor ray [--address ADDR]`` (``pip install "medxfer[ray]"``: Ray core only). The run's
artifacts are explicit tasks derived from what each cell's protocol declares it reads
(:mod:`medxfer.deps`): every (dataset, transform) is prepared once and every (model, dataset,
layer) extracted once, before the cells that read them, wherever those run; a cell task
starts when its artifacts are complete and then finds them in the cache. Tasks carry the
resources they need: extraction and the protocols that declare ``accelerator="gpu"``
(finetuning, reconstruction) ask for a GPU unless the run's device is ``cpu``; preparation and
the other protocols ask for a CPU. Before anything is submitted the cluster is checked to have
a node with those resources (Ray would wait forever for a GPU that does not exist).

Artifacts and results live on storage every node sees: the run folder, the cache and the
dataset roots are sent to the workers as absolute paths; the file system must give every
node the same paths, atomic ``rename`` within a folder, ``fsync``, and working ``flock``/
``fcntl`` locks (a local disk, NFSv4, Lustre, GPFS, BeeGFS do; see the README). Custom models
travel in the run spec (``RunSpec.custom_models``) and each worker registers them.

A worker that dies mid-task (killed, pre-empted, out of memory) is retried by Ray
(:data:`MAX_RETRIES` times); the task resumes from the artifact's last flushed state or the
cell's last checkpoint. Ray's usage telemetry is turned off (``RAY_USAGE_STATS_ENABLED=0``)
and a cluster started here uses a short temporary folder (Unix socket paths are limited to
107 bytes).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medxfer.cell import Cell, CellOutcome, Session, execute_cell
from medxfer.config import RunSpec
from medxfer.deps import Extract, Step, build_step, dependencies
from medxfer.errors import DiskFullError, MedxferError, OutputError, UsageError
from medxfer.protocols.base import PROTOCOLS

log = logging.getLogger(__name__)

MAX_RETRIES = 3  # times Ray re-runs a task whose worker died
TELEMETRY_ENV = "RAY_USAGE_STATS_ENABLED"


class ClusterError(MedxferError, RuntimeError):
    """The Ray cluster cannot be reached or lacks the resources the run's tasks ask for."""


def short_temp_dir() -> str:
    """Ray's temporary folder for a cluster started here: ``$RAY_TMPDIR`` or
    ``/tmp/medxfer-ray-UID`` (short: Ray's Unix sockets live under it)."""
    return os.environ.get("RAY_TMPDIR") or f"/tmp/medxfer-ray-{os.getuid()}"


def import_ray() -> Any:
    """Ray, with its usage telemetry off; a clear error when it is not installed."""
    os.environ[TELEMETRY_ENV] = "0"
    try:
        import ray
    except ImportError:
        raise UsageError('--executor ray needs Ray: pip install "medxfer[ray]"') from None
    return ray


def connect(address: str | None) -> tuple[Any, bool]:
    """(ray, whether this call connected): to ``address`` (or ``$RAY_ADDRESS``), else a local
    cluster of this machine's CPUs (and GPUs) started in a short temporary folder."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = not logging.getLogger("medxfer").isEnabledFor(logging.INFO)
    try:
        if address:
            ray.init(address=address, log_to_driver=not quiet, logging_level=logging.WARNING,
                     configure_logging=True)
        else:
            ray.init(include_dashboard=False, _temp_dir=short_temp_dir(), log_to_driver=not quiet,
                     logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"at {address}" if address else "on this machine"
        raise ClusterError(f"cannot connect to a Ray cluster {where}: {exc}") from None
    return ray, True


def _on_cpu(spec: RunSpec) -> bool:
    return spec.device is not None and spec.device.split(":")[0] == "cpu"


def step_resources(step: Step, spec: RunSpec) -> dict[str, float]:
    """Extraction runs on a GPU (unless the run's device is the CPU); preparation on CPUs
    (``spec.cpus_per_task`` of them: Ray gives a task as many threads as CPUs)."""
    if isinstance(step, Extract) and not _on_cpu(spec):
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": spec.cpus_per_task}


def cell_resources(cell: Cell, spec: RunSpec) -> dict[str, float]:
    """What the cell's protocol declares: a GPU for ``accelerator="gpu"`` (unless the run's
    device is the CPU), else ``spec.cpus_per_task`` CPUs."""
    if PROTOCOLS.get(cell.protocol).needs.accelerator == "gpu" and not _on_cpu(spec):
        return {"num_cpus": 1, "num_gpus": 1}
    return {"num_cpus": spec.cpus_per_task}


def check_resources(nodes: list[dict[str, Any]], wants: list[tuple[str, dict[str, float]]], where: str) -> None:
    """Fail with a clear message when no live node of the cluster offers what a task asks for."""
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", n.get("alive", False))]
    missing: dict[str, list[str]] = {}
    for what, res in wants:
        need = {"CPU": res.get("num_cpus", 0), "GPU": res.get("num_gpus", 0)}
        if not any(all(r.get(k, 0) >= v for k, v in need.items() if v) for r in alive):
            short = "a GPU" if need["GPU"] else f"{need['CPU']:g} CPU(s)"
            missing.setdefault(short, []).append(what)
    if not missing:
        return
    have = ", ".join(f"{r.get('CPU', 0):g} CPU / {r.get('GPU', 0):g} GPU" for r in alive) or "no live node"
    parts = []
    for short, tasks in missing.items():
        shown = "; ".join(tasks[:3]) + (f"; and {len(tasks) - 3} more" if len(tasks) > 3 else "")
        parts.append(f"{len(tasks)} task(s) ask for {short} ({shown})")
    hint = (" Add a node with a GPU (`ray start --address HEAD:PORT --num-gpus N`) or pass --device cpu to run "
            "them on CPUs." if "a GPU" in missing else "")
    raise ClusterError(f"the Ray cluster {where} has no node for {'; '.join(parts)}; its nodes offer: {have}.{hint}")


def worker_spec(session: Session) -> RunSpec:
    """The run spec with every path absolute (run folder, cache, dataset roots), as workers get it."""
    spec = session.spec
    datasets = tuple(type(d)(label=d.label, kind=d.kind, root=str(Path(d.root).expanduser().resolve()),
                             options=dict(d.options)) for d in spec.datasets)
    return spec.with_(out=str(session.out.resolve()), cache_dir=str(session.cache_dir.resolve()), datasets=datasets)


# --------------------------------------------------------------------------- on the workers

_SESSIONS: dict[str, Session] = {}


def _worker_session(spec: RunSpec, log_level: int) -> Session:
    """One session per run spec in a worker process (models, datasets memoised across tasks)."""
    from medxfer.cache import content_key

    key = content_key(spec.to_dict())
    if key not in _SESSIONS:
        logger = logging.getLogger("medxfer")
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.propagate = False
        logger.setLevel(log_level)
        _SESSIONS.clear()
        _SESSIONS[key] = Session(spec)
    return _SESSIONS[key]


def _failed_upstream(upstream: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    return next((u for u in upstream if u.get("error")), None)


def step_task(spec: RunSpec, step: Step, log_level: int, *upstream: dict[str, Any]) -> dict[str, Any]:
    """A Ray task: build one artifact (``upstream``: the results of the steps it reads)."""
    from medxfer.progress import forced

    bad = _failed_upstream(upstream)
    if bad is not None:
        return {"step": step.describe(), "error": f"{bad['step']} failed: {bad['error']}"}
    try:
        with forced(False):
            return dict(build_step(step, _worker_session(spec, log_level)), ran_on=_where())
    except OutputError:  # a full disk or an unwritable folder: every other step would fail the same way
        raise
    except MedxferError as exc:
        return {"step": step.describe(), "error": str(exc)}
    except Exception as exc:  # a bug: logged with its traceback on the worker, reported as the cells' error
        log.exception("%s failed with an internal error", step.describe())
        return {"step": step.describe(), "error": f"internal error: {type(exc).__name__}: {exc}"}


def cell_task(spec: RunSpec, cell: Cell, owns: list[int], log_level: int, *steps: dict[str, Any]) -> CellOutcome:
    """A Ray task: run one cell once its artifacts are built (``steps``: their results;
    ``owns``: those whose build time this cell reports, as the first cell to read them)."""
    from medxfer.progress import forced

    bad = _failed_upstream(steps)
    if bad is not None:
        return CellOutcome(cell, "failed", error=f"{bad['step']} failed: {bad['error']}")
    credits = {s["key"]: float(s["seconds"]) for i, s in enumerate(steps) if i in owns and s.get("built")}
    with forced(False):
        outcome = execute_cell(cell, _worker_session(spec, log_level), credits)
    outcome.where = _where()
    return outcome


def _where() -> dict[str, Any]:
    """The node, the resources Ray assigned and the worker process of the running task."""
    import ray

    ctx = ray.get_runtime_context()
    return {"node": ray.util.get_node_ip_address(), "node_id": ctx.get_node_id(),
            "resources": {k: float(v) for k, v in sorted(ctx.get_assigned_resources().items())}, "pid": os.getpid()}


# --------------------------------------------------------------------------- on the driver

class RayExecutor:
    """Submits the grid's prepare, extract and cell tasks to a Ray cluster (see the module docstring)."""

    def __init__(self) -> None:
        self._ray: Any = None
        self._connected = False

    def _plan(self, cells: Sequence[Cell], session: Session) -> tuple[Any, list[tuple[str, dict[str, float]]]]:
        deps = dependencies(cells, session)
        wants = [(s.describe(), step_resources(s, session.spec)) for s in deps.steps]
        wants += [(c.describe(), cell_resources(c, session.spec)) for c in cells]
        return deps, wants

    def preflight(self, cells: Sequence[Cell], session: Session) -> None:
        """Connect and check the cluster offers what every task asks for (before anything is written)."""
        self._ray, self._connected = connect(session.spec.address)
        _, wants = self._plan(cells, session)
        where = f"at {session.spec.address}" if session.spec.address else "(local)"
        try:
            check_resources(self._ray.nodes(), wants, where)
        except ClusterError:
            self.close()
            raise

    def close(self) -> None:
        if self._connected and self._ray is not None:
            self._ray.shutdown()
        self._connected = False

    def run(self, cells: Sequence[Cell], session: Session) -> list[CellOutcome]:
        if self._ray is None:
            self.preflight(cells, session)
        try:
            return self._run(cells, session)
        finally:
            self.close()

    def _run(self, cells: Sequence[Cell], session: Session) -> list[CellOutcome]:
        ray = self._ray
        spec = worker_spec(session)
        deps, _ = self._plan(cells, session)
        level = logging.getLogger("medxfer").getEffectiveLevel()
        spec_ref = ray.put(spec)
        step_fn = ray.remote(step_task)
        cell_fn = ray.remote(cell_task)
        refs: dict[Step, Any] = {}
        for step in deps.steps:
            upstream = [refs[step.prepare]] if isinstance(step, Extract) else []
            refs[step] = step_fn.options(name=f"medxfer {step.describe()}", max_retries=MAX_RETRIES, retry_exceptions=False,
                                         **step_resources(step, session.spec)).remote(spec_ref, step, level, *upstream)
        owner: dict[Step, str] = {}
        for cell in cells:
            for step in deps.of_cell[cell.id]:
                owner.setdefault(step, cell.id)
        pending: dict[Any, Cell] = {}
        for cell in cells:
            steps = deps.of_cell[cell.id]
            owns = [i for i, s in enumerate(steps) if owner[s] == cell.id]
            ref = cell_fn.options(name=f"medxfer cell {cell.id}", max_retries=MAX_RETRIES, retry_exceptions=False,
                                  **cell_resources(cell, session.spec)).remote(
                spec_ref, cell, owns, level, *[refs[s] for s in steps])
            pending[ref] = cell
        log.info("ray: %d prepare, %d extract and %d cell task(s) submitted", len(deps.prepares),
                 len(deps.extracts), len(cells))
        done: dict[str, CellOutcome] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                done[cell.id] = self._outcome(ray, ref, cell)
        session.notes["ray"] = {"address": session.spec.address, "steps": [self._step_record(ray, s, refs[s])
                                                                          for s in deps.steps]}
        return [done[c.id] for c in cells]

    @staticmethod
    def _step_record(ray: Any, step: Step, ref: Any) -> dict[str, Any]:
        from ray.exceptions import RayError

        try:
            got = dict(ray.get(ref))
        except RayError as exc:
            got = {"step": step.describe(), "error": f"{type(exc).__name__}: {exc}"}
        got.pop("seconds", None)
        return got

    @staticmethod
    def _outcome(ray: Any, ref: Any, cell: Cell) -> CellOutcome:
        from ray.exceptions import RayError, RayTaskError

        try:
            outcome: CellOutcome = ray.get(ref)
        except RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, OutputError):
                raise (DiskFullError if isinstance(cause, DiskFullError) else OutputError)(str(cause)) from None
            log.error("%s failed on its worker: %s", cell.describe(), exc)
            return CellOutcome(cell, "failed", error=f"internal error on a Ray worker: {cause or exc}")
        except RayError as exc:  # the worker died more than MAX_RETRIES times, the node was lost, ...
            log.error("%s failed: %s", cell.describe(), exc)
            return CellOutcome(cell, "failed", error=f"Ray task failed after {MAX_RETRIES} retries: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        if outcome.status == "computed" and outcome.result is not None:
            h = outcome.result.headline
            log.info("%s: %s %.2f", cell.describe(), h.metric, h.value)
        elif outcome.status == "failed":
            log.error("%s failed: %s", cell.describe(), outcome.error)
        return outcome


def _register() -> None:
    from medxfer.executors import register_executor

    register_executor("ray", RayExecutor)


_register()
