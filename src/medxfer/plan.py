"""``medxfer run ... --plan``: what a run would do, what is cached, and how long the rest takes.

Nothing is downloaded, prepared or extracted. Datasets are read (their roots checked), every
cell's label checks run (a class too small for the episodes shows up here), the cache
artifacts are asked how far they are, and the estimate comes from a short measured probe on
this machine: a few images of every dataset are decoded and a few batches of every
architecture run on the chosen device at the chosen precision. Evaluating cached features
and finetuning are not estimated.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medxfer.cell import Cell, Session, check_cell
from medxfer.config import DatasetArg, RunSpec
from medxfer.data.records import Dataset
from medxfer.errors import MedxferError
from medxfer.grid import build_cells
from medxfer.models import MODELS, load_model
from medxfer.models.backbone import Backbone
from medxfer.models.fetch import is_cached, offline
from medxfer.prepare import decode_record, default_workers, prepared_artifact
from medxfer.protocols.base import PROTOCOLS
from medxfer.runtime import autocast_context, default_batch_size, runtime_module

log = logging.getLogger(__name__)

PROBE_IMAGES = 4  # decoded per dataset
PROBE_BATCHES = 2  # timed forward batches per architecture (after one warm-up batch)


@dataclass
class DatasetPlan:
    arg: DatasetArg
    dataset: Dataset | None = None
    error: str | None = None
    prepared_done: int = 0
    key: str = ""
    seconds_per_image: float | None = None

    @property
    def images(self) -> int:
        return len(self.dataset) if self.dataset is not None else 0


@dataclass
class ModelPlan:
    name: str
    arch: str
    weights: str = ""
    model: Backbone | None = None
    note: str = ""
    available: bool = True
    seconds_per_image: float | None = None
    cached: dict[str, int] = field(default_factory=dict)  # dataset label -> feature rows already extracted


@dataclass
class Plan:
    """The plan's text and whether any cell could run."""

    text: str
    runnable: bool
    cells: int = 0
    blocked: dict[str, str] = field(default_factory=dict)  # cell id -> why it cannot run


def _plan_dataset(arg: DatasetArg, session: Session, spec: RunSpec) -> DatasetPlan:
    plan = DatasetPlan(arg)
    if not Path(arg.root).expanduser().exists():
        plan.error = f"dataset root not found: {arg.root}"
        return plan
    try:
        plan.dataset = session.dataset(arg)
    except MedxferError as exc:
        plan.error = str(exc)
        return plan
    art = prepared_artifact(plan.dataset, spec.image_size, spec.resize, session.cache_dir)
    plan.key = art.folder.name
    plan.prepared_done = art.progress()[0]
    return plan


def _plan_model(name: str, session: Session) -> ModelPlan:
    spec = MODELS.get(name)
    plan = ModelPlan(spec.name, spec.arch)
    choice = session.weights_choice(name)
    if choice == "pretrained" and not spec.path and not is_cached(spec, session.cache_dir):
        where = spec.urls[0] if spec.urls else (spec.fetch_hint or "a manual download")
        plan.weights = "pretrained (not cached)"
        plan.available = bool(spec.urls) and not offline()
        plan.note = (f"weights not cached: the run would download them from {where}" if plan.available else
                     f"weights not cached and cannot be downloaded here ({where}); "
                     f"`medxfer fetch {name} --from FILE` or --weights random")
        return plan
    try:
        plan.model = session.model(name)
        plan.weights = plan.model.weights
    except MedxferError as exc:
        plan.available = False
        plan.note = str(exc)
    return plan


def make_plan(spec: RunSpec, *, probe: bool = True) -> Plan:
    """Describe what ``spec`` would do (see the module docstring)."""
    cells = build_cells(spec)
    session = Session(spec)
    device = session.device
    workers = spec.workers if spec.workers else default_workers()
    protocols = [PROTOCOLS.get(p) for p in spec.protocols]
    layers = sorted({layer for p in protocols for layer in p.needs.features})
    lines = [
        f"plan: {len(spec.models)} model(s) x {len(spec.datasets)} dataset(s) x {len(protocols)} protocol(s) "
        f"x {len(spec.seeds)} seed(s) = {len(cells)} cell(s)",
        f"  models:    {', '.join(spec.models)} (weights: {spec.weights})",
        f"  datasets:  {', '.join(f'{d.label}={d.kind}:{d.root}' for d in spec.datasets)}",
        f"  protocols: {', '.join(p.name for p in protocols)}; seeds: {', '.join(map(str, spec.seeds))}",
        f"  device {device}, precision {spec.precision}, images {spec.image_size}px ({spec.resize}), "
        f"{workers} decoding worker(s), cache {session.cache_dir}",
    ]
    datasets = {a.label: _plan_dataset(a, session, spec) for a in spec.datasets}
    models = {name: _plan_model(name, session) for name in dict.fromkeys(c.model for c in cells)}
    for m in models.values():
        for d in datasets.values():
            if m.model is not None and d.dataset is not None:
                from medxfer.extract import features_artifact

                m.cached[d.arg.label] = min((features_artifact(m.model, d.key, spec.precision, layer,
                                                               session.cache_dir).progress()[0] for layer in layers),
                                            default=0)
    blocked = _blocked_cells(cells, session, datasets, models)
    if probe:
        t0 = time.perf_counter()
        for d in datasets.values():
            _probe_decode(d, spec)
        probed: dict[str, float | None] = {}
        for m in models.values():
            if m.arch not in probed:
                probed[m.arch] = _probe_forward(m.name, spec, device)
            m.seconds_per_image = probed[m.arch]
        lines.append(f"  (probe: {time.perf_counter() - t0:.1f}s)")

    lines.append("datasets (prepare: decode each image once, shared by every model):")
    prep_total = 0.0
    for d in datasets.values():
        if d.error:
            lines.append(f"  {d.arg.label}: CANNOT LOAD: {d.error}")
            continue
        todo = d.images - d.prepared_done
        state = ("prepared (cached)" if todo == 0 else
                 f"{todo} of {d.images} images to prepare" + (" (resumes a partial run)" if d.prepared_done else ""))
        est = ""
        if d.seconds_per_image is not None and todo:
            secs = todo * d.seconds_per_image / workers
            prep_total += secs
            est = f", about {_fmt(secs)} ({d.seconds_per_image * 1000:.1f} ms/image/worker measured)"
        lines.append(f"  {d.arg.label}: {d.images} images, key {d.key}: {state}{est}")

    lines.append("models (extract: one forward pass per image and dataset):" if layers else
                 "models (no protocol here needs extracted features):")
    ext_total = 0.0
    for m in models.values():
        head = f"  {m.name} ({m.arch}, {m.weights or 'weights unknown'})" + (f": {m.note}" if m.note else "")
        rate = f"; {1 / m.seconds_per_image:.1f} images/s measured on {device}" if m.seconds_per_image else ""
        lines.append(head + rate)
        for d in datasets.values():
            if d.error or not layers:
                continue
            done = m.cached.get(d.arg.label, 0)
            todo = d.images - done
            if m.model is None:
                status, todo = f"{d.images} images to extract (cache unknown until the weights are there)", d.images
            elif todo == 0:
                status = "features cached"
            else:
                status = f"{todo} of {d.images} images to extract" + (" (resumes)" if done else "")
            est = ""
            if m.seconds_per_image is not None and todo:
                secs = todo * m.seconds_per_image * len(layers)
                ext_total += secs
                est = f", about {_fmt(secs)}"
            lines.append(f"    on {d.arg.label}: {status}{est}")
    if blocked:
        lines.append(f"cells that cannot run ({len(blocked)} of {len(cells)}):")
        lines += [f"  {cid}: {why}" for cid, why in blocked.items()]
    if probe:
        lines.append(f"estimated time: prepare {_fmt(prep_total)} + extract {_fmt(ext_total)} = "
                     f"{_fmt(prep_total + ext_total)} (from the probe; evaluation of cached features and "
                     f"finetuning not included)")
    if any(p.needs.model for p in protocols):
        lines.append("protocols that train or run the backbone per cell (finetune): not estimated")
    runnable = len(blocked) < len(cells)
    if not runnable:
        lines.append("nothing in this plan can run")
    return Plan("\n".join(lines), runnable, len(cells), blocked)


def _blocked_cells(cells: list[Cell], session: Session, datasets: dict[str, DatasetPlan],
                   models: dict[str, ModelPlan]) -> dict[str, str]:
    out: dict[str, str] = {}
    for cell in cells:
        d, m = datasets[cell.dataset.label], models[cell.model]
        if d.error:
            out[cell.id] = d.error
        elif not m.available:
            out[cell.id] = m.note
        else:
            try:
                check_cell(cell, session)
            except MedxferError as exc:
                out[cell.id] = str(exc)
    return out


def _probe_decode(d: DatasetPlan, spec: RunSpec) -> None:
    """Seconds per image to decode, resize and crop, from a few images spread over the dataset."""
    if d.dataset is None or d.prepared_done == d.images:
        return
    recs = d.dataset.records
    idx = np.unique(np.linspace(0, len(recs) - 1, min(PROBE_IMAGES, len(recs))).astype(int))
    t0 = time.perf_counter()
    ok = 0
    for i in idx:
        try:
            decode_record(recs[i].path, spec.image_size, spec.resize, 3)
            ok += 1
        except MedxferError as exc:  # a bad image shows up in the run itself; the probe goes on
            log.info("plan probe: %s", exc)
    if ok:
        d.seconds_per_image = (time.perf_counter() - t0) / ok


def _probe_forward(name: str, spec: RunSpec, device: str) -> float | None:
    """Seconds per image for the model's architecture as extraction runs it on the device
    (random weights: timing does not depend on them, and nothing is downloaded)."""
    batch = spec.batch_size or default_batch_size(device)
    if torch.device(device).type == "cpu":
        batch = min(batch, 8)  # per-image cost on a CPU hardly depends on the batch
    try:
        model = load_model(name, weights="random")
        module, dtype = runtime_module(model, device, spec.precision)
        module.to(device, memory_format=torch.channels_last)
        x = torch.zeros(batch, 3, spec.image_size, spec.image_size, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        autocast = spec.precision if dtype == torch.float32 else "fp32"
        with torch.inference_mode(), autocast_context(device, autocast):
            module(x)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(PROBE_BATCHES):
                module(x)
            _sync(device)
        return (time.perf_counter() - t0) / (PROBE_BATCHES * batch)
    except (MedxferError, RuntimeError) as exc:  # e.g. fp16 on a CPU: the run itself will report it
        log.info("plan probe of %s failed: %s", name, exc)
        return None


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _fmt(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


__all__ = ["Plan", "make_plan"]
