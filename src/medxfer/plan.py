"""``medxfer run ... --plan``: what a run would do, what is cached, and how long the rest takes.

The estimate comes from a short measured probe on this machine: a few images of every dataset
are decoded (the prepare cost per image) and a few batches of every architecture are run on
the chosen device at the chosen precision (the extraction cost per image). Evaluating
cached features (few-shot, linear) and finetuning are not estimated.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from medxfer.cache import resolve_cache_dir
from medxfer.config import RunSpec
from medxfer.data.records import Dataset
from medxfer.devices import resolve_device
from medxfer.extract import (
    autocast_context,
    default_batch_size,
    features_dir,
    runtime_trunk,
)
from medxfer.models import MODELS, WeightsUnavailableError, load_model
from medxfer.models.backbone import Backbone
from medxfer.pipeline import weights_choice
from medxfer.prepare import (
    STATE_TODO,
    decode_record,
    default_workers,
    prepare_dir_for,
    prepared_key,
)
from medxfer.protocols.base import PROTOCOLS

log = logging.getLogger(__name__)

PROBE_IMAGES = 4  # decoded per dataset
PROBE_BATCHES = 2  # timed forward batches per architecture (after one warm-up batch)


@dataclass
class DatasetPlan:
    label: str
    images: int = 0
    prepared_done: int = 0  # images already in the prepared cache (complete or partial)
    key: str = ""
    error: str | None = None
    seconds_per_image: float | None = None  # measured decode cost (one worker)
    dataset: Dataset | None = None


@dataclass
class ModelPlan:
    name: str
    arch: str
    weights: str = ""
    error: str | None = None
    seconds_per_image: float | None = None  # measured forward cost on the device
    model: Backbone | None = None
    cached: dict[str, int] = field(default_factory=dict)  # dataset label -> features already extracted


def describe_plan(spec: RunSpec, *, probe: bool = True) -> str:
    """The grid, the images to prepare and features to extract, what is cached, an estimate."""
    device = resolve_device(spec.device)
    cache = resolve_cache_dir(spec.cache_dir)
    workers = spec.workers if spec.workers else default_workers()
    protocols = [PROTOCOLS.get(p) for p in spec.protocols]
    need_features = any(p.needs == "features" for p in protocols)
    cells = len(spec.models) * len(spec.datasets) * len(protocols) * len(spec.seeds)
    lines = [
        f"plan: {len(spec.models)} model(s) x {len(spec.datasets)} dataset(s) x {len(protocols)} protocol(s) "
        f"x {len(spec.seeds)} seed(s) = {cells} cell(s)",
        f"  models:    {', '.join(spec.models)} (weights: {spec.weights})",
        f"  datasets:  {', '.join(f'{d.label}={d.kind}:{d.root}' for d in spec.datasets)}",
        f"  protocols: {', '.join(p.name for p in protocols)}; seeds: {', '.join(map(str, spec.seeds))}",
        f"  device {device}, precision {spec.precision}, images {spec.image_size}px ({spec.resize}), "
        f"{workers} decoding worker(s), cache {cache}",
    ]
    datasets = [_plan_dataset(a.label, a.kind, a.root, dict(a.options), spec, cache) for a in spec.datasets]
    models = [_plan_model(name, spec, cache) for name in spec.models]
    fill_feature_cache(models, datasets, spec, cache)
    if probe:
        t0 = time.perf_counter()
        for d in datasets:
            _probe_decode(d, spec)
        probed: dict[str, float | None] = {}
        for m in models:
            if m.arch:
                if m.arch not in probed:
                    probed[m.arch] = _probe_forward(m, spec, device)
                m.seconds_per_image = probed[m.arch]
        lines.append(f"  (probe: {time.perf_counter() - t0:.1f}s)")

    lines.append("datasets (prepare: decode each image once, shared by every model):")
    prep_total = 0.0
    for d in datasets:
        if d.error:
            lines.append(f"  {d.label}: cannot load: {d.error}")
            continue
        todo = d.images - d.prepared_done
        state = ("prepared (cached)" if todo == 0 else
                 f"{todo} of {d.images} images to prepare" + (" (resumes a partial run)" if d.prepared_done else ""))
        est = ""
        if d.seconds_per_image is not None and todo:
            secs = todo * d.seconds_per_image / workers
            prep_total += secs
            est = f", about {_fmt(secs)} ({d.seconds_per_image * 1000:.1f} ms/image/worker measured)"
        lines.append(f"  {d.label}: {d.images} images, key {d.key}: {state}{est}")

    lines.append("models (extract: one forward pass per image and dataset):" if need_features else
                 "models (no protocol here needs extracted features):")
    ext_total = 0.0
    for m in models:
        head = f"  {m.name} ({m.arch}, {m.weights or 'weights unknown'})"
        if m.error:
            head += f": {m.error}"
        rate = (f"; {1 / m.seconds_per_image:.1f} images/s measured on {device}"
                if m.seconds_per_image else "")
        lines.append(head + rate)
        if not need_features:
            continue
        for d in datasets:
            if d.error:
                continue
            done = m.cached.get(d.label, 0)
            todo = d.images - done
            if m.model is None:
                status = f"{d.images} images to extract (cache unknown until the weights are available)"
                todo = d.images
            elif todo == 0:
                status = "features cached"
            else:
                status = f"{todo} of {d.images} images to extract" + (" (resumes)" if done else "")
            est = ""
            if m.seconds_per_image is not None and todo:
                secs = todo * m.seconds_per_image
                ext_total += secs
                est = f", about {_fmt(secs)}"
            lines.append(f"    on {d.label}: {status}{est}")
    if probe:
        lines.append(f"estimated time: prepare {_fmt(prep_total)} + extract {_fmt(ext_total)} = "
                     f"{_fmt(prep_total + ext_total)} (from the probe; evaluation of cached features and "
                     f"finetuning not included)")
    if any(p.needs == "images" for p in protocols):
        lines.append("finetuning cells train on the prepared images: not estimated (up to 5000 steps each)")
    return "\n".join(lines)


def _plan_dataset(label: str, kind: str, root: str, options: dict, spec: RunSpec, cache: Path) -> DatasetPlan:
    from medxfer.data import load_dataset

    plan = DatasetPlan(label)
    try:
        ds = load_dataset(kind, root, skip_bad=spec.skip_bad, **options)
    except Exception as exc:  # any loading problem is reported in the plan, not raised
        plan.error = f"{type(exc).__name__}: {exc}"
        return plan
    plan.dataset, plan.images = ds, len(ds)
    plan.key = prepared_key(ds, spec.image_size, spec.resize)
    out = prepare_dir_for(plan.key, cache)
    if (out / "meta.json").is_file():
        plan.prepared_done = plan.images
    elif (out / "state.npy").is_file():
        try:
            plan.prepared_done = int((np.load(out / "state.npy") != STATE_TODO).sum())
        except (OSError, ValueError):
            plan.prepared_done = 0
    return plan


def _plan_model(name: str, spec: RunSpec, cache: Path) -> ModelPlan:
    try:
        mspec = MODELS.get(name)
    except KeyError as exc:
        return ModelPlan(name, "", error=str(exc))
    plan = ModelPlan(mspec.name, mspec.arch)
    weights = weights_choice(mspec.name, spec.weights, cache)
    try:
        plan.model = load_model(name, weights=weights, cache_dir=cache)
        plan.weights = plan.model.weights
    except WeightsUnavailableError as exc:
        plan.error = f"pretrained weights unavailable: {exc}"
    return plan


def fill_feature_cache(models: list[ModelPlan], datasets: list[DatasetPlan], spec: RunSpec, cache: Path) -> None:
    """How many features of every (model, dataset) are already extracted."""
    for m in models:
        if m.model is None:
            continue
        for d in datasets:
            if d.error:
                continue
            out = features_dir(m.model, d.key, spec.precision, cache)
            if (out / "meta.json").is_file():
                m.cached[d.label] = d.images
            elif (out / "done.npy").is_file():
                try:
                    m.cached[d.label] = int(np.load(out / "done.npy").sum())
                except (OSError, ValueError):
                    pass


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
        except Exception as exc:  # a bad image shows up in the run itself; the probe goes on
            log.info("plan probe: %s", exc)
    if ok:
        d.seconds_per_image = (time.perf_counter() - t0) / ok


def _probe_forward(m: ModelPlan, spec: RunSpec, device: str) -> float | None:
    """Seconds per image for the model's architecture as extraction runs it on the device."""
    batch = spec.batch_size or default_batch_size(device)
    if torch.device(device).type == "cpu":
        batch = min(batch, 8)  # per-image cost on a CPU hardly depends on the batch
    try:
        model = load_model(m.name, weights="random")  # timing does not depend on the weights
        trunk, dtype = runtime_trunk(model, device, spec.precision)  # what extraction will run
        trunk.to(device, memory_format=torch.channels_last)
        x = torch.zeros(batch, 3, spec.image_size, spec.image_size, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        autocast = spec.precision if dtype == torch.float32 else "fp32"
        with torch.inference_mode(), autocast_context(device, autocast):
            trunk(x)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(PROBE_BATCHES):
                trunk(x)
            _sync(device)
        return (time.perf_counter() - t0) / (PROBE_BATCHES * batch)
    except Exception as exc:  # e.g. fp16 on a CPU: the run itself will report it
        log.info("plan probe of %s failed: %s", m.arch, exc)
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
