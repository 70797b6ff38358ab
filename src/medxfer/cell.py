"""The cell, the context, and the one function that runs a cell.

A run is a grid of :class:`Cell` objects (model, dataset, protocol with the user's
parameters, seed). :func:`run_cell` runs one: it computes the run key, reuses a finished
result with the same key, otherwise hands the protocol a :class:`Context` and writes the
typed :class:`~medxfer.results.Result`. Executors (local, Ray) only decide where and when
:func:`run_cell` runs.

The :class:`Context` gives a protocol what it needs, lazily: the model, the dataset and its
info, prepared images at any (size, resize mode), features at any layer, device, precision,
a work folder, the cache. A :class:`Session` memoises those within a run, so a dataset is
prepared once per transform and a (model, dataset) extracted once per layer however many
cells use them. :class:`DirectContext` serves the same interface from objects in memory
(``medxfer.evaluate`` / ``medxfer.finetune``).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medxfer.cache import (
    content_key,
    ensure_dir,
    file_lock,
    file_sha256,
    resolve_cache_dir,
)
from medxfer.config import DatasetArg, RunSpec
from medxfer.errors import MedxferError, OutputError, UsageError
from medxfer.protocols.base import PROTOCOLS, EvalResult, Params, Protocol

if TYPE_CHECKING:
    from medxfer.data.records import Dataset, DatasetInfo
    from medxfer.features import FeatureSet
    from medxfer.models.backbone import Backbone
    from medxfer.prepare import PreparedImages
    from medxfer.results import Result

log = logging.getLogger(__name__)

POOLED = "pooled"
_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def short_digest(obj: Any, length: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:length]


@dataclass(frozen=True)
class Cell:
    """One cell of the grid: ``model`` and ``protocol`` are registered names, ``params`` the
    user's parameter values (the protocol's defaults, compat overrides and the dataset's own
    settings are applied when the cell runs), ``variant`` every setting the user changed that
    changes numbers (it is part of the cell's identity, so two variants never overwrite)."""

    model: str
    dataset: DatasetArg
    protocol: str
    params: dict[str, Any]
    seed: int
    compat: str = "none"
    variant: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        parts = [_SAFE.sub("_", p) for p in (self.model, self.dataset.label, self.protocol)]
        tail = f"__v{short_digest(self.variant)}" if self.variant else ""
        return f"{'__'.join(parts)}__seed{self.seed}{tail}"

    @property
    def filename(self) -> str:
        return f"{self.id}.json"

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.variant.items())
        return f"{self.model} x {self.dataset.label} x {self.protocol} (seed {self.seed}{', ' + extra if extra else ''})"


# --------------------------------------------------------------------------- the context

class Context:
    """What a protocol gets (see the module docstring). Subclasses serve the pieces."""

    device: str = "cpu"
    precision: str = "fp32"

    @property
    def info(self) -> DatasetInfo | None:
        raise NotImplementedError

    @property
    def dataset(self) -> Dataset:
        raise UsageError("this protocol needs the dataset's records; run it through medxfer.run")

    @property
    def model(self) -> Backbone:
        raise UsageError("this protocol runs the backbone: give a model (medxfer.finetune(model, prepared), "
                         "or run it through medxfer.run)")

    def prepared(self, size: int | None = None, resize: str | None = None) -> PreparedImages:
        raise UsageError("this protocol needs prepared images: call medxfer.finetune(model, prepared, ...) "
                         "or run it through medxfer.run")

    def features(self, layer: str = POOLED, resize: str | None = None) -> FeatureSet:
        raise UsageError("this protocol needs extracted features: call medxfer.evaluate(protocol, features) "
                         "or run it through medxfer.run")

    def training_store(self, size: int) -> PreparedImages | None:
        """The records prepared whole (shorter side ``size``, never enlarged) for training crops,
        or None where there is none (training then crops the evaluation images)."""
        return None

    def workdir(self) -> Path | None:
        """A folder for resumable work (checkpoints), or None (nothing is kept)."""
        return None

    def artifact_dir(self) -> Path | None:
        """A folder for files the result lists as its artifacts (maps, images), or None."""
        return None

    @property
    def cache_dir(self) -> Path:
        return resolve_cache_dir(None)


@dataclass
class DirectContext(Context):
    """A context over objects in memory (``medxfer.evaluate``, ``medxfer.finetune``)."""

    given_features: FeatureSet | None = None
    given_prepared: PreparedImages | None = None
    given_model: Backbone | None = None
    given_info: DatasetInfo | None = None
    device: str = "cpu"
    precision: str = "fp32"
    given_workdir: Path | None = None
    given_cache: Path | None = None
    given_train: PreparedImages | None = None

    @property
    def info(self) -> DatasetInfo | None:
        if self.given_info is not None:
            return self.given_info
        for src in (self.given_features, self.given_prepared):
            if src is not None and src.info is not None:
                return src.info
        return None

    @property
    def model(self) -> Backbone:
        if self.given_model is None:
            return super().model
        return self.given_model

    def prepared(self, size: int | None = None, resize: str | None = None) -> PreparedImages:
        if self.given_prepared is None:
            return super().prepared(size, resize)
        if size not in (None, self.given_prepared.size):
            raise UsageError(f"prepared images are {self.given_prepared.size}px; this protocol asks for {size}px")
        return self.given_prepared

    def features(self, layer: str = POOLED, resize: str | None = None) -> FeatureSet:
        if self.given_features is not None and layer == POOLED:
            if resize not in (None, "aspect"):
                raise UsageError(f"these features were made with one transform; the protocol asks for {resize!r} "
                                 "(run it through medxfer.run, which prepares that transform)")
            return self.given_features
        if self.given_model is not None and self.given_prepared is not None:
            from medxfer.extract import extract_features

            return extract_features(self.given_model, self.given_prepared, layer=layer, device=self.device,
                                    precision=self.precision, cache_dir=self.given_cache)
        return super().features(layer)

    def workdir(self) -> Path | None:
        return self.given_workdir

    def training_store(self, size: int) -> PreparedImages | None:
        return self.given_train

    @property
    def cache_dir(self) -> Path:
        return resolve_cache_dir(self.given_cache)


class CellContext(Context):
    """The context of one cell in a run, served by the run's :class:`Session`."""

    def __init__(self, session: Session, cell: Cell, credits: dict[str, float] | None = None) -> None:
        self.session = session
        self.cell = cell
        self.credits = dict(credits or {})  # artifact key -> seconds: built for this cell by another task
        self.device = session.device
        self.precision = session.spec.precision
        self.timings: dict[str, float] = {}
        self.inputs: dict[str, dict[str, Any]] = {}
        self.prepared_problems: list[str] = []

    @property
    def info(self) -> DatasetInfo:
        return self.dataset.info

    @property
    def dataset(self) -> Dataset:
        return self.session.dataset(self.cell.dataset)

    @property
    def model(self) -> Backbone:
        return self.session.model(self.cell.model)

    def prepared(self, size: int | None = None, resize: str | None = None) -> PreparedImages:
        spec = self.session.spec
        p, seconds = self.session.prepared(self.cell.dataset, size or spec.image_size, resize or spec.resize)
        name = f"prepared:{p.size}:{p.meta.get('resize', resize or spec.resize)}"
        if name not in self.inputs:
            self.prepared_problems += list(p.meta.get("problems", []))
        self._record(name, p.key, p.path, p.built, seconds, "prepare_s")
        return p

    def features(self, layer: str = POOLED, resize: str | None = None) -> FeatureSet:
        resize = resize or self.session.spec.resize
        self.prepared(resize=resize)
        f, seconds = self.session.features(self.cell.model, self.cell.dataset, layer, resize)
        self._record(f"features:{layer}" + ("" if resize == self.session.spec.resize else f":{resize}"), f.key, Path(f.meta["path"]), f.built, seconds, "extract_s")
        return f

    def _record(self, name: str, key: str, folder: Path | None, built: bool, seconds: float, timing: str) -> None:
        if name in self.inputs:
            return
        built = built and self.session.claim(key)  # only the first cell to use a fresh artifact built it
        if key in self.credits:  # built for this cell by a dependency task (the Ray executor)
            built, seconds = True, self.credits[key]
        entry: dict[str, Any] = {"key": key, "built": built}
        marker = _marker(folder)
        if marker is not None:
            entry.update(size=marker.get("size"), sha256=marker.get("sha256"))
        self.inputs[name] = entry
        if built:  # time is counted by the cell that did the work, once
            self.timings[timing] = self.timings.get(timing, 0.0) + seconds

    def training_store(self, size: int) -> PreparedImages:
        from medxfer.prepare import KEEP

        return self.prepared(size, KEEP)

    def workdir(self) -> Path:
        return self.session.out / "work" / self.cell.id

    def artifact_dir(self) -> Path:
        return self.session.out / "artifacts" / self.cell.id

    @property
    def cache_dir(self) -> Path:
        return self.session.cache_dir

    def params(self) -> Params:
        """The cell's parameters: defaults, compat, the dataset's own settings, the user's."""
        proto = PROTOCOLS.get(self.cell.protocol)
        return proto.make_params(self.cell.params, self.cell.compat, self.info)


def _marker(folder: Path | None) -> dict[str, Any] | None:
    if folder is None:
        return None
    try:
        return json.loads((folder / "complete.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- the session

class Session:
    """Run-wide, memoised resources: models, datasets, prepared images and features.

    Models are kept one at a time (cells run model by model); datasets, prepared images and
    features are memory maps and stay. Loading or building each happens once per run.
    """

    def __init__(self, spec: RunSpec) -> None:
        from medxfer.devices import resolve_device
        from medxfer.models.custom import register_recorded_models

        register_recorded_models(spec.custom_models)  # the user's own checkpoints, on every worker
        self.spec = spec
        self.out = Path(spec.out).expanduser()
        check_writable(self.out, "output folder")
        check_writable(self.results_dir, "results folder")
        self.cache_dir = resolve_cache_dir(spec.cache_dir)
        self.device = resolve_device(spec.device)
        self._model: tuple[str, Backbone] | None = None
        self._datasets: dict[str, Dataset] = {}
        self._prepared: dict[tuple[str, int, str], tuple[PreparedImages, float]] = {}
        self._features: dict[tuple[str, str, str, str], tuple[FeatureSet, float]] = {}
        self._claimed: set[str] = set()
        self.notes: dict[str, Any] = {}  # executor facts recorded in run.json (e.g. the Ray tasks)

    @property
    def results_dir(self) -> Path:
        return self.out / "results"

    def weights_choice(self, model: str) -> str:
        """``"auto"`` resolved: pretrained when cached, else random."""
        if self.spec.weights != "auto":
            return self.spec.weights
        from medxfer.models import MODELS, is_cached

        return "pretrained" if is_cached(MODELS.get(model), self.cache_dir) else "random"

    def model(self, name: str) -> Backbone:
        if self._model is None or self._model[0] != name:
            from medxfer.models import load_model

            self._model = None  # release the previous model before loading the next
            model = load_model(name, weights=self.weights_choice(name), cache_dir=self.cache_dir)
            log.info("model %s: %s", model.name, model.weights)
            self._model = (name, model)
        return self._model[1]

    def dataset(self, arg: DatasetArg) -> Dataset:
        if arg.label not in self._datasets:
            from medxfer.data import load_dataset

            self._datasets[arg.label] = load_dataset(arg.kind, arg.root, skip_bad=self.spec.skip_bad, **arg.options)
        return self._datasets[arg.label]

    def loaded_datasets(self) -> dict[str, Dataset]:
        """The datasets this session has read, by label."""
        return dict(self._datasets)

    def prepared(self, arg: DatasetArg, size: int, resize: str) -> tuple[PreparedImages, float]:
        key = (arg.label, size, resize)
        if key not in self._prepared:
            from medxfer.prepare import prepare

            t0 = time.perf_counter()
            p = prepare(self.dataset(arg), size=size, resize=resize, cache_dir=self.cache_dir,
                        workers=self.spec.workers, skip_bad=self.spec.skip_bad)
            self._prepared[key] = (p, time.perf_counter() - t0)
        return self._prepared[key]

    def features(self, model: str, arg: DatasetArg, layer: str, resize: str | None = None) -> tuple[FeatureSet, float]:
        resize = resize or self.spec.resize
        key = (model, arg.label, layer, resize)
        if key not in self._features:
            import numpy as np

            from medxfer.extract import extract_features

            prepared, _ = self.prepared(arg, self.spec.image_size, resize)
            t0 = time.perf_counter()
            f = extract_features(self.model(model), prepared, cache_dir=self.cache_dir, layer=layer,
                                 batch_size=self.spec.batch_size, device=self.device, precision=self.spec.precision)
            seconds = time.perf_counter() - t0
            if prepared.bad:
                f = f.subset(np.setdiff1d(np.arange(len(f)), np.asarray(prepared.bad)))
            self._features[key] = (f, seconds)
        return self._features[key]

    def claim(self, artifact: str) -> bool:
        """True the first time ``artifact`` is claimed in this run (its build time is counted once)."""
        if artifact in self._claimed:
            return False
        self._claimed.add(artifact)
        return True

    def context(self, cell: Cell, credits: dict[str, float] | None = None) -> CellContext:
        return CellContext(self, cell, credits)


def check_writable(path: Path, what: str) -> None:
    """Fail early, with one clear line, when ``path`` cannot become a writable folder (nothing
    is created: the folder appears with the first file written into it)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputError(f"{what} {path}: {probe} is a file, not a folder")
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except (AttributeError, OSError):
        read_only = False
    if read_only:
        raise OutputError(f"{what} {path}: {probe} is on a read-only file system")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: {probe} is not writable")


# --------------------------------------------------------------------------- run a cell

def run_key(cell: Cell, ctx: CellContext) -> str:
    """Hash of everything that determines a cell's numbers: the typed parameters (without the
    execution-only ones), the protocol and its version, the model's name and fingerprint
    (weights, normalisation, architecture), the dataset's fingerprint and options, the
    preprocessing, the seed, and facts of the execution that change numbers."""
    proto = PROTOCOLS.get(cell.protocol)
    params = ctx.params()
    spec = ctx.session.spec
    ds = ctx.dataset
    parts: dict[str, Any] = {
        "protocol": proto.name, "version": proto.version, "params": params.key(), "seed": cell.seed,
        "dataset": ds.fingerprint(), "dataset_options": ds.options,
        "image_size": spec.image_size, "resize": spec.resize,
    }
    if proto.needs.features or proto.needs.model:
        model = ctx.model
        parts.update(model=model.name, model_fingerprint=model.fingerprint)
    if proto.needs.features:
        parts["precision"] = spec.precision
    if proto.key_extras is not None:
        parts["execution"] = proto.key_extras(params, ctx.device)
    return content_key("cell", parts)


@dataclass
class CellRun:
    """What running a cell gave: its result and whether it was reused (not recomputed)."""

    result: Result
    reused: bool


def check_cell(cell: Cell, session: Session) -> None:
    """What can be checked before any image is decoded: the dataset loads, the parameters
    resolve, the protocol's own label checks (a class too small for the episodes) pass."""
    ctx = session.context(cell)
    proto = PROTOCOLS.get(cell.protocol)
    params = ctx.params()
    if proto.check is not None:
        proto.check(ctx.dataset.label_view(), params, cell.seed)


def check_cells(cells: Sequence[Cell], session: Session) -> tuple[list[Cell], list[CellOutcome]]:
    """(cells that pass :func:`check_cell`, outcomes of those that fail, with the reason)."""
    runnable, failed = [], []
    for cell in cells:
        try:
            check_cell(cell, session)
        except MedxferError as exc:
            log.error("%s cannot run: %s", cell.describe(), exc)
            failed.append(CellOutcome(cell, "failed", error=str(exc)))
        else:
            runnable.append(cell)
    return runnable, failed


def run_cell(cell: Cell, ctx: CellContext) -> CellRun:
    """Run one cell (or reuse its finished result); write and return the result."""
    from medxfer.results import read_result, write_result

    session = ctx.session
    path = session.results_dir / cell.filename
    key = run_key(cell, ctx)
    existing = read_result(path)
    if existing is not None and existing.run_key == key:
        return CellRun(existing, True)
    lock = session.cache_dir / "locks" / f"cell-{short_digest([str(session.out.resolve()), cell.id], 16)}.lock"
    ensure_dir(lock.parent, "cache folder")
    with file_lock(lock, cell.describe()):
        existing = read_result(path)
        if existing is not None and existing.run_key == key:
            return CellRun(existing, True)
        proto = PROTOCOLS.get(cell.protocol)
        params = ctx.params()
        t0 = time.perf_counter()
        evaluation = proto.run(ctx, params, cell.seed)
        seconds = time.perf_counter() - t0
        timings = dict(ctx.timings)
        timings["evaluate_s"] = seconds - sum(ctx.timings.values())
        result = build_result(cell, ctx, proto, key, evaluation, timings)
        ensure_dir(session.results_dir, "results folder")
        write_result(path, result)
    return CellRun(result, False)


def build_result(cell: Cell, ctx: CellContext, proto: Protocol, key: str, ev: EvalResult,
                 timings: dict[str, float]) -> Result:
    """The typed result of one computed cell."""
    from medxfer.results import (
        ArtifactRecord,
        DatasetFacts,
        ModelFacts,
        Result,
        git_revision,
        library_versions,
    )

    session = ctx.session
    ds = ctx.dataset
    m = ctx.model
    s = m.spec
    from medxfer.models.pretrained import pretraining_facts

    model_facts = ModelFacts(
        name=m.name, display_name=s.label, arch=s.arch, family=s.family, imagenet_top1=s.imagenet_top1,
        normalization=m.normalization.name, weights=m.weights, weights_hash=m.weights_hash,
        fingerprint=m.fingerprint, random_weights=m.is_random, feature_dim=m.feature_dim, licence=s.licence,
        in_paper=s.in_paper, parent=s.parent, pretraining=pretraining_facts(s))
    problems = list(ds.problems) + list(ctx.prepared_problems)
    info = ds.info
    dataset_facts = DatasetFacts(
        label=cell.dataset.label, name=info.name, display_name=info.label, kind=cell.dataset.kind,
        root=str(cell.dataset.root), modality=info.modality, in_domain=info.in_domain,
        class_names=list(info.class_names), counts=ds.counts(), images=len(ds), headline_metric=info.headline_metric,
        fingerprint=ds.fingerprint(), options=dict(ds.options), problems=problems,
        synthetic=bool(getattr(info, "synthetic", False)))
    artifacts = []
    for f in ev.files:
        p = Path(f)
        try:
            rel = p.resolve().relative_to(session.out.resolve()).as_posix()
        except ValueError:
            raise UsageError(f"protocol {proto.name} wrote {p} outside the run folder {session.out}") from None
        artifacts.append(ArtifactRecord(rel, p.stat().st_size, file_sha256(p)))
    return Result(
        model=cell.model, dataset=cell.dataset.label, protocol=proto.name, protocol_version=proto.version,
        seed=cell.seed, run_key=key, cell_id=cell.id, variant=dict(cell.variant), headline=ev.headline,
        metrics=dict(ev.metrics), params=dict(ev.params), details=dict(ev.details), warnings=list(ev.warnings),
        artifacts=artifacts, inputs=dict(ctx.inputs), model_info=model_facts, dataset_info=dataset_facts,
        timings={k: round(float(v), 4) for k, v in timings.items()}, versions=library_versions(),
        git_revision=git_revision(), device=ctx.device,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), spec=session.spec.to_dict())


@dataclass
class CellOutcome:
    """How a cell ended in a run: ``"computed"``, ``"reused"`` or ``"failed"`` (with ``error``)."""

    cell: Cell
    status: str
    result: Result | None = None
    error: str | None = None
    where: dict[str, Any] | None = None  # where it ran (the Ray executor: node, resources, pid)


def execute_cell(cell: Cell, session: Session, credits: dict[str, float] | None = None) -> CellOutcome:
    """:func:`run_cell` with failures recorded, not raised: one cell that cannot run does not
    stop the others. User errors keep their one-line message; anything else is logged with
    its traceback (a bug) and recorded too. A full disk or an output or cache folder that
    cannot be written (:class:`OutputError`) is raised: every other cell would fail the same
    way. ``credits``: artifacts built for this cell by other tasks."""
    try:
        out = run_cell(cell, session.context(cell, credits))
    except OutputError:
        raise
    except MedxferError as exc:
        log.error("%s failed: %s", cell.describe(), exc)
        return CellOutcome(cell, "failed", error=str(exc))
    except Exception as exc:  # a bug: keep the traceback in the log, go on with the other cells
        log.exception("%s failed with an internal error", cell.describe())
        return CellOutcome(cell, "failed", error=f"internal error: {type(exc).__name__}: {exc}")
    status = "reused" if out.reused else "computed"
    if not out.reused:
        log.info("%s: %s", cell.describe(), _headline_text(out.result))
    return CellOutcome(cell, status, result=out.result)


def _headline_text(result: Result) -> str:
    h = result.headline
    ci = f" ± {h.ci95:.2f}" if h.ci95 is not None else ""
    return f"{h.metric} {h.value:.2f}{ci}"
