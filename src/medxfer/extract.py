"""Extract stage: a frozen backbone turns prepared uint8 crops into features of one layer.

Batches are read from the prepared memmap ahead of the device (:func:`medxfer.runtime.prefetch`),
run by a :class:`medxfer.runtime.Runner` (normalisation on the device, BatchNorm folded,
channels-last, optional bf16/fp16, OOM back-off), and written by record index into a
:class:`~medxfer.cache.ResumableArray` under ``<cache>/features/<key>/`` (resumable, locked,
checksummed). The key covers the model's fingerprint (architecture, weights, versioned
normalisation), the prepared images, the layer and the precision.
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from medxfer.cache import STATE_DONE, ResumableArray, content_key, resolve_cache_dir
from medxfer.data.records import Dataset
from medxfer.devices import resolve_device
from medxfer.errors import MedxferError
from medxfer.features import FeatureSet
from medxfer.models.backbone import POOLED, Backbone, assert_eval
from medxfer.prepare import PreparedImages, prepare
from medxfer.progress import bar
from medxfer.runtime import (
    AUTOCAST_TOLERANCE,
    PRECISIONS,
    Runner,
    check_precision,
    default_batch_size,
    prefetch,
)

log = logging.getLogger(__name__)

LAYER = POOLED
CHECKPOINT_EVERY = 256  # images extracted between durable flushes

__all__ = ["AUTOCAST_TOLERANCE", "PRECISIONS", "FeatureError", "extract_features", "features_artifact",
           "features_key"]


class FeatureError(MedxferError, RuntimeError):
    """Extraction produced unusable features (NaN/inf); the message names the model and record."""


def features_key(model: Backbone, prepared_key: str, precision: str = "fp32", layer: str = LAYER) -> str:
    """Cache key: the model's fingerprint (architecture, weights, normalisation) + the prepared
    images + layer + precision."""
    return content_key("features", model.fingerprint, prepared_key, layer, precision)


def features_artifact(model: Backbone, prepared_key: str, precision: str = "fp32", layer: str = LAYER,
                      cache_dir: str | os.PathLike[str] | None = None, dataset: str | None = None) -> ResumableArray:
    """The cache artifact of these features (ask it ``progress()`` or ``complete``); ``dataset``
    (the prepared images' dataset name) only describes it, it is not part of the key."""
    key = features_key(model, prepared_key, precision, layer)
    about = {"model": model.name, "dataset": dataset, "prepared_key": prepared_key, "layer": layer,
             "precision": precision}
    return ResumableArray(resolve_cache_dir(cache_dir) / "features" / key, f"{layer} features of {model.name}",
                          about=about)


def extract_features(
    model: Backbone,
    data: Dataset | PreparedImages,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
    layer: str = LAYER,
    num_workers: int | None = None,
    compile: bool = False,
    progress: bool | None = None,
    size: int = 224,
    resize: str = "aspect",
    fuse: bool = True,
    checkpoint_every: int = CHECKPOINT_EVERY,
    on_progress: Callable[[int, int], None] | None = None,
) -> FeatureSet:
    """Features of ``layer`` for every prepared image, cached and resumable (see the module docstring).

    ``data``: prepared images, or a Dataset that is prepared first (same cache). ``layer``:
    ``"pooled"`` (the paper's features) or a stage of the architecture, average-pooled.
    ``num_workers``: background loader threads (None = 2 on CUDA, 1 on CPU). ``precision``:
    ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast (features stay float32 and agree with fp32
    within :data:`AUTOCAST_TOLERANCE`). ``compile``: ``torch.compile`` the trunk (worth it for
    large jobs only). ``fuse``: run a BatchNorm-folded copy (exact in eval mode).
    ``checkpoint_every``: images between durable flushes; ``on_progress(done, total)`` after
    every batch. Rows stay aligned with the records: records that could not be decoded
    (``prepared.bad``) hold the features of their all-zero image and are listed in
    ``meta["bad"]``; callers leave them out (``FeatureSet.subset``).
    """
    assert_eval(model)
    dev = resolve_device(device)
    check_precision(dev, precision)
    dim = model.layer_dim(layer)
    prepared = data if isinstance(data, PreparedImages) else prepare(
        data, size=size, resize=resize, cache_dir=cache_dir, progress=progress)
    art = features_artifact(model, prepared.key, precision, layer, cache_dir, dataset=prepared.dataset)
    n = len(prepared)

    def build(a: ResumableArray) -> dict[str, object]:
        part = a.start((n, dim), np.float32, checkpoint_every=checkpoint_every, on_progress=on_progress)
        todo = part.todo
        bs = batch_size or default_batch_size(dev)
        workers = num_workers if num_workers is not None else (2 if torch.device(dev).type == "cuda" else 1)
        runner = Runner(model, dev, precision, compile=compile, fuse=fuse, layer=layer)
        steps = bar(total=n, initial=n - len(todo), desc=f"extract {model.name} on {prepared.dataset}", unit="img",
                    enabled=progress)
        t0 = time.perf_counter()
        batches = prefetch(prepared.array, todo, bs, workers, runner.pin)
        try:
            for idx, batch in batches:
                y = runner(batch).numpy()
                if y.shape != (len(idx), dim):
                    raise FeatureError(f"model {model.name}: {layer} features of shape {y.shape}, "
                                       f"expected {len(idx)} x {dim}")
                bad = ~np.isfinite(y).all(axis=1)
                if bad.any():
                    first = int(idx[np.argmax(bad)])
                    raise FeatureError(f"model {model.name}: non-finite features for record {first} "
                                       f"({prepared.records[first].path}) of dataset {prepared.dataset!r}")
                part.array[idx] = y
                part.mark(idx, STATE_DONE)
                steps.update(len(idx))
        finally:
            batches.close()  # stops the loader threads now, also when a batch raised
            steps.close()
            runner.restore()
            part.flush()
        seconds = time.perf_counter() - t0
        meta = {
            "model": model.name, "dataset": prepared.dataset, "weights": model.weights,
            "weights_hash": model.weights_hash,
            "model_fingerprint": model.fingerprint, "normalization": model.normalization.name,
            "prepared_key": prepared.key, "layer": layer, "n": n, "dim": dim, "device": str(dev),
            "precision": precision, "batch_size": runner.batch_cap or bs, "compile": compile,
            "fused_batchnorm": runner.fused, "num_workers": workers, "seconds": round(seconds, 3),
            "images_extracted": int(len(todo)),
            "images_per_second": round(len(todo) / seconds, 3) if seconds > 0 and len(todo) else None,
            "torch": torch.__version__,
        }
        a.finish(part, meta)
        log.info("extracted %s on %s: %d images in %.1fs -> %s", model.name, prepared.dataset, len(todo), seconds,
                 a.folder)
        return meta

    feats, meta, built = art.get_or_build(build)
    if feats.shape != (n, dim):
        raise FeatureError(f"{art.folder}: cached features have shape {feats.shape}, expected {n} x {dim}")
    meta = dict(meta, bad=list(prepared.bad), path=str(art.folder))
    return FeatureSet(features=feats, labels=prepared.labels, splits=prepared.splits, records=list(prepared.records),
                      class_names=prepared.class_names, model=model.name, dataset=prepared.dataset,
                      key=art.folder.name, info=prepared.info, meta=meta, built=built)
