"""Run a whole grid: datasets -> prepare -> extract -> evaluate -> results -> summary.

Every cell (model x dataset x protocol x seed) gets a run key hashing everything that
determines its numbers; a cell whose result file already carries that key is skipped, so a
killed or extended run resumes where it stopped.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medxfer.cache import content_key, resolve_cache_dir, write_text_atomic
from medxfer.config import DatasetArg, RunSpec
from medxfer.data import Dataset, load_dataset
from medxfer.devices import resolve_device
from medxfer.features import FeatureSet
from medxfer.models import MODELS, Backbone, is_cached, load_model, resolve_model_arg
from medxfer.prepare import PreparedImages
from medxfer.protocols import PROTOCOLS, Protocol
from medxfer.results import (
    Cell,
    build_result,
    load_results,
    read_result,
    result_path,
    write_result,
)

log = logging.getLogger(__name__)


@dataclass
class RunOutcome:
    """What ``run`` did: result paths, which cells were computed or reused, the summary."""

    out: Path
    results: list[dict[str, Any]] = field(default_factory=list)
    computed: list[Cell] = field(default_factory=list)
    reused: list[Cell] = field(default_factory=list)
    summary_path: Path | None = None
    summary: str = ""


def run_key(cell: Cell, protocol: Protocol, params: dict[str, Any], model: Backbone, dataset: Dataset,
            spec: RunSpec, fingerprint: str) -> str:
    """Hash of everything that determines a cell's numbers (``fingerprint``: the dataset's,
    computed once per run since it stats every file)."""
    return content_key(
        "cell", protocol.name, protocol.version, params, cell.seed,
        model.name, model.weights, model.weights_hash,
        dataset.info.name, fingerprint, dataset.options,
        spec.image_size, spec.resize, spec.precision, spec.compat,
    )


def weights_choice(model_name: str, weights: str, cache_dir: Path) -> str:
    """Resolve ``"auto"``: the pretrained weights when they are cached, else random ones."""
    if weights != "auto":
        return weights
    return "pretrained" if is_cached(MODELS.get(model_name), cache_dir) else "random"


def load_datasets(spec: RunSpec) -> dict[str, Dataset]:
    out = {}
    for arg in spec.datasets:
        out[arg.label] = load_spec_dataset(arg, spec.skip_bad)
    return out


def load_spec_dataset(arg: DatasetArg, skip_bad: bool) -> Dataset:
    return load_dataset(arg.kind, arg.root, skip_bad=skip_bad, **arg.options)


def _model_info(model: Backbone) -> dict[str, Any]:
    s = model.spec
    return {"name": model.name, "weights": model.weights, "weights_hash": model.weights_hash,
            "random_weights": model.is_random, "arch": s.arch, "family": s.family,
            "normalization": s.normalization, "feature_dim": s.feature_dim, "licence": s.licence}


def _dataset_info(arg: DatasetArg, ds: Dataset, prepared: PreparedImages | None, fingerprint: str) -> dict[str, Any]:
    problems = list(ds.problems)
    if prepared is not None:
        problems += list(prepared.meta.get("problems", []))
    return {"label": arg.label, "kind": arg.kind, "root": str(arg.root), "name": ds.info.name,
            "images": len(ds), "class_names": list(ds.info.class_names), "options": ds.options,
            "fingerprint": fingerprint, "counts": ds.counts(), "problems": problems,
            "headline_metric": ds.info.headline_metric}


def run(spec: RunSpec, progress: bool = True) -> RunOutcome:
    """Run every cell of ``spec`` not already done; write results and ``summary.md``."""
    from medxfer.extract import extract_features
    from medxfer.prepare import prepare
    from medxfer.report.tables import summary_markdown

    out = Path(spec.out)
    results_dir = out / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = resolve_cache_dir(spec.cache_dir)
    device = resolve_device(spec.device)
    protocols = [PROTOCOLS.get(p) for p in spec.protocols]
    model_names = [resolve_model_arg(m) for m in spec.models]  # unknown names fail before any work
    datasets = load_datasets(spec)
    args = {a.label: a for a in spec.datasets}
    fingerprints = {label: ds.fingerprint() for label, ds in datasets.items()}
    outcome = RunOutcome(out=out)
    prepared_cache: dict[str, PreparedImages] = {}

    def prepared_for(label: str) -> PreparedImages:
        if label not in prepared_cache:
            prepared_cache[label] = prepare(datasets[label], size=spec.image_size, resize=spec.resize,
                                            cache_dir=cache_dir, workers=spec.workers,
                                            skip_bad=spec.skip_bad, progress=progress)
        return prepared_cache[label]

    for model_name in model_names:
        model = load_model(model_name, weights=weights_choice(model_name, spec.weights, cache_dir),
                           cache_dir=cache_dir)
        log.info("model %s: %s", model.name, model.weights)
        for label, ds in datasets.items():
            features: FeatureSet | None = None
            feat_seconds = 0.0
            for protocol in protocols:
                params = protocol.resolve_params(spec.protocol_params.get(protocol.name), spec.compat, ds.info)
                for seed in spec.seeds:
                    cell = Cell(model.name, label, protocol.name, seed)
                    key = run_key(cell, protocol, params, model, ds, spec, fingerprints[label])
                    existing = read_result(result_path(results_dir, cell))
                    if existing is not None and existing.get("run_key") == key:
                        log.info("reusing %s (run key %s)", cell.filename, key)
                        outcome.reused.append(cell)
                        outcome.results.append(existing)
                        continue
                    t0 = time.perf_counter()
                    prepared = prepared_for(label)
                    t_prep = time.perf_counter() - t0
                    timings = {"prepare_s": t_prep}
                    if protocol.needs == "features":
                        if features is None:
                            t1 = time.perf_counter()
                            features = extract_features(model, prepared, cache_dir=cache_dir,
                                                        batch_size=spec.batch_size, device=device,
                                                        precision=spec.precision, progress=progress)
                            if prepared.bad:
                                keep = np.setdiff1d(np.arange(len(features)), np.asarray(prepared.bad))
                                features = features.subset(keep)
                            feat_seconds = time.perf_counter() - t1
                        timings["extract_s"] = feat_seconds
                        t2 = time.perf_counter()
                        evaluation = protocol.run(features, seed=seed, **params)
                    else:
                        t2 = time.perf_counter()
                        workdir = out / "work" / cell.filename.removesuffix(".json")
                        evaluation = protocol.run(model, prepared, seed=seed, device=device,
                                                  workdir=workdir, **params)
                    timings["evaluate_s"] = time.perf_counter() - t2
                    artifacts = {"prepared_key": prepared.key}
                    if features is not None and protocol.needs == "features":
                        artifacts["features_key"] = features.key
                    result = build_result(
                        cell, key, evaluation, spec=spec.to_dict(), model_info=_model_info(model),
                        dataset_info=_dataset_info(args[label], ds, prepared, fingerprints[label]), timings=timings,
                        device=device, artifacts=artifacts,
                    )
                    write_result(results_dir, cell, result)
                    outcome.computed.append(cell)
                    outcome.results.append(result)
                    log.info("%s: %s", cell.filename, _headline(result))
    # the summary covers every result of this run (and earlier ones in the same folder)
    all_results = load_results(results_dir)
    outcome.summary = summary_markdown(all_results)
    outcome.summary_path = out / "summary.md"
    write_text_atomic(outcome.summary_path, outcome.summary)
    return outcome


def _headline(result: dict[str, Any]) -> str:
    m = result["metrics"]
    if "ci95" in m:
        return f"{m['accuracy']:.2f} ± {m['ci95']:.2f}"
    return ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, (int, float)))
