"""Extract stage: a frozen backbone turns prepared uint8 crops into pooled features.

Batches are read from the prepared memmap by a background thread (pinned memory and
non-blocking copies on CUDA) while the device computes; images are normalised on the device and
fed channels-last under ``inference_mode`` to a BatchNorm-folded copy of the trunk (exact in
eval mode), optionally in bf16 (a bf16 weight copy on CPU, autocast on CUDA) or fp16 (CUDA
autocast), and optionally through ``torch.compile``. Features are written by record index into a preallocated float32 memmap
under ``<cache>/features/<key>/`` with a done-mask flushed every few batches, so a killed run
resumes; the finished array is checked complete and finite before ``meta.json`` marks it done.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medxfer.cache import (
    content_key,
    resolve_cache_dir,
    save_npy_atomic,
    write_json_atomic,
)
from medxfer.data.records import Dataset
from medxfer.devices import resolve_device
from medxfer.features import FeatureSet
from medxfer.models.backbone import Backbone, assert_eval
from medxfer.prepare import PreparedImages, prepare

log = logging.getLogger(__name__)

LAYER = "pooled"
FLUSH_EVERY_BATCHES = 8
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCH = {"cuda": 256, "cpu": 32}
# Stated tolerance of autocast features against fp32: max |a - b| / max |fp32| per feature set.
AUTOCAST_TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2}


class FeatureError(RuntimeError):
    """Extraction produced unusable features (NaN/inf); the message names the model and record."""


def default_batch_size(device: str) -> int:
    """A starting batch for the device type; CUDA halves it on out-of-memory."""
    return DEFAULT_BATCH.get(torch.device(device).type, 32)


def features_key(model: Backbone, prepared_key: str, precision: str = "fp32") -> str:
    """Cache key: model weights hash + name + prepared-data key + layer + precision."""
    return content_key("features", model.weights_hash, model.name, prepared_key, LAYER, precision)


def features_dir(model: Backbone, prepared_key: str, precision: str = "fp32",
                 cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "features" / features_key(model, prepared_key, precision)


def autocast_context(device: str, precision: str) -> AbstractContextManager[Any]:
    """The autocast context for ``precision`` on ``device`` (a clear error where unsupported)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    dev = torch.device(device).type
    if precision == "fp16" and dev != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    if precision == "bf16" and dev == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("this CUDA device does not support bf16; use 'fp16' or 'fp32'")
    return torch.autocast(device_type=dev, dtype=dtype)


def extract_features(
    model: Backbone,
    data: Dataset | PreparedImages,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    precision: str = "fp32",
    num_workers: int | None = None,
    compile: bool = False,
    progress: bool = True,
    size: int = 224,
    resize: str = "aspect",
    fuse: bool = True,
) -> FeatureSet:
    """Pooled features of every prepared image, cached and resumable (see module docstring).

    ``data``: a prepared dataset, or a Dataset that is prepared first (same cache).
    ``num_workers``: background loader threads (None = 2 on CUDA, 1 on CPU).
    ``precision``: ``"fp32"``, or ``"bf16"``/``"fp16"`` autocast (features stay float32; they
    agree with fp32 within :data:`AUTOCAST_TOLERANCE`, checked by the tests and benchmarks).
    ``compile``: ``torch.compile`` the trunk (worth it for large jobs only: compiling takes
    minutes). ``fuse``: run a BatchNorm-folded copy of the trunk (exact in eval mode).
    Rows stay aligned with ``prepared.records``: records that could not be decoded
    (``prepared.bad``, only with ``skip_bad``) hold the features of their all-zero image and
    are listed in ``meta["bad"]``; callers leave them out (``FeatureSet.subset``).
    """
    assert_eval(model)
    autocast_context(resolve_device(device), precision)  # validate before any work
    prepared = data if isinstance(data, PreparedImages) else prepare(
        data, size=size, resize=resize, cache_dir=cache_dir, progress=progress)
    key = features_key(model, prepared.key, precision)
    out = resolve_cache_dir(cache_dir) / "features" / key
    if not (out / "meta.json").is_file():
        _extract_to_cache(model, prepared, out, batch_size=batch_size, device=resolve_device(device),
                          precision=precision, num_workers=num_workers, compile=compile, fuse=fuse,
                          progress=progress)
    return _load(model, prepared, out, key)


def _extract_to_cache(model: Backbone, prepared: PreparedImages, out: Path, *, batch_size: int | None,
                      device: str, precision: str, num_workers: int | None, compile: bool, fuse: bool,
                      progress: bool) -> None:
    n = len(prepared)
    dim = int(model.feature_dim)
    out.mkdir(parents=True, exist_ok=True)
    feats_path, done_path = out / "features.npy", out / "done.npy"
    feats, done = _open_partial(feats_path, done_path, n, dim)
    todo = np.flatnonzero(~done)
    if len(todo) < n:
        log.info("extract %s on %s: resuming, %d of %d images left", model.name, prepared.dataset, len(todo), n)
    bs = batch_size or default_batch_size(device)
    workers = num_workers if num_workers is not None else (2 if torch.device(device).type == "cuda" else 1)
    runner = _Runner(model, device, precision, compile, fuse)
    bar = tqdm(total=n, initial=n - len(todo), desc=f"extract {model.name} on {prepared.dataset}",
               unit="img", disable=not progress, leave=False)
    t0 = time.perf_counter()
    batches = _prefetch(prepared.array, todo, bs, workers, runner.pin)
    try:
        with torch.inference_mode():
            for b, (idx, batch) in enumerate(batches):
                y = runner(batch)
                if y.shape != (len(idx), dim):
                    raise FeatureError(f"model {model.name}: features of shape {tuple(y.shape)}, "
                                       f"expected {len(idx)} x {dim} (spec feature_dim)")
                y_np = y.numpy()
                bad = ~np.isfinite(y_np).all(axis=1)
                if bad.any():
                    first = int(idx[np.argmax(bad)])
                    raise FeatureError(f"model {model.name}: non-finite features for record {first} "
                                       f"({prepared.records[first].path}) of dataset {prepared.dataset!r}")
                feats[idx] = y_np
                done[idx] = True
                bar.update(len(idx))
                if (b + 1) % FLUSH_EVERY_BATCHES == 0:
                    _flush(feats, done, done_path)
    finally:
        batches.close()  # stops the loader threads now, also when a batch raised
        bar.close()
        runner.restore()
        _flush(feats, done, done_path)
    seconds = time.perf_counter() - t0
    _check_complete(feats, done, model.name, prepared)
    meta = {
        "model": model.name, "weights": model.weights, "weights_hash": model.weights_hash,
        "dataset": prepared.dataset, "prepared_key": prepared.key, "layer": LAYER,
        "n": n, "dim": dim, "device": str(device), "precision": precision, "batch_size": runner.batch_cap or bs,
        "compile": compile, "fused_batchnorm": runner.fused, "num_workers": workers, "seconds": round(seconds, 3),
        "images_extracted": int(len(todo)),
        "images_per_second": round(len(todo) / seconds, 3) if seconds > 0 and len(todo) else None,
        "torch": torch.__version__,
    }
    del feats
    write_json_atomic(out / "meta.json", meta)
    log.info("extract %s on %s: %d images in %.1fs", model.name, prepared.dataset, len(todo), seconds)


_FOLDED: "weakref.WeakKeyDictionary[Backbone, dict[tuple[str, torch.dtype], torch.nn.Module | None]]" = (
    weakref.WeakKeyDictionary())


def folded_trunk(model: Backbone, dtype: torch.dtype = torch.float32) -> torch.nn.Module | None:
    """The BatchNorm-folded copy of ``model.trunk`` with weights in ``dtype``, made once per
    model, weights and dtype (about a second for ResNet-50) and reused by later extractions;
    None when the trunk cannot be folded."""
    copies = _FOLDED.setdefault(model, {})
    key = (model.weights_hash, dtype)
    if key not in copies:
        for old in [k for k in copies if k[0] != model.weights_hash]:
            del copies[old]  # the weights changed: stale copies go
        if dtype == torch.float32:
            copies[key] = fold_batchnorm(model.trunk)
        else:
            base = folded_trunk(model)
            copies[key] = None if base is None else copy.deepcopy(base).to(dtype)
    return copies[key]


def runtime_trunk(model: Backbone, device: str, precision: str, fuse: bool = True) -> tuple[torch.nn.Module, torch.dtype]:
    """The module extraction runs for this device and precision, and the dtype of its input.

    With ``fuse``: the BatchNorm-folded copy (the caller's model is untouched); bf16 on a CPU
    uses a bf16 copy of it on bf16 input (the same roundings as autocast, which casts the same
    folded weights on every call, without re-casting them per batch: about 1.5x faster on
    CPU); otherwise fp32 weights, with autocast for reduced precision. Without ``fuse``, or
    when folding is impossible, the model's own trunk.
    """
    if fuse and torch.device(device).type == "cpu" and precision == "bf16":
        copy_bf16 = folded_trunk(model, torch.bfloat16)
        if copy_bf16 is not None:
            return copy_bf16, torch.bfloat16
    folded = folded_trunk(model) if fuse else None
    return (folded if folded is not None else model.trunk), torch.float32


def fold_batchnorm(trunk: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of an eval-mode trunk with every conv -> BatchNorm pair folded into one conv.

    Exact in eval mode up to float rounding, and one memory pass less per layer (about 20-40%
    faster ResNet inference on CPU). None when the trunk cannot be traced symbolically.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(trunk, inplace=False)
    except Exception as exc:  # untraceable custom trunks keep their own forward
        log.info("batchnorm folding not applied (%s: %s)", type(exc).__name__, exc)
        return None


class _Runner:
    """Puts the :func:`runtime_trunk` on the device (channels-last) and runs normalised batches
    through it; :meth:`restore` puts the caller's model back (or the copy off the accelerator)."""

    def __init__(self, model: Backbone, device: str, precision: str, compile: bool, fuse: bool = True) -> None:
        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        self.pin = self.device.type == "cuda"
        first = next(model.parameters(), None)
        self._home = first.device if first is not None else torch.device("cpu")
        trunk, self.dtype = runtime_trunk(model, device, precision, fuse)
        self.fused = trunk is not model.trunk
        trunk.to(self.device, memory_format=torch.channels_last)
        self._trunk = trunk
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(trunk) if compile else trunk)  # type: ignore[assignment]
        self.batch_cap: int | None = None  # lowered on CUDA out-of-memory

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 B x H x W x C (CPU, maybe pinned) -> float32 B x D on the CPU."""
        cap = self.batch_cap or len(batch)
        outs = []
        start = 0
        while start < len(batch):
            part = batch[start:start + cap]
            try:
                outs.append(self._forward(part))
                start += len(part)
            except torch.cuda.OutOfMemoryError:
                if cap == 1:
                    raise
                cap = max(1, cap // 2)
                self.batch_cap = cap
                torch.cuda.empty_cache()
                log.warning("extract %s: out of GPU memory, batch lowered to %d", self.model.name, cap)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _forward(self, part: torch.Tensor) -> torch.Tensor:
        x = part.to(self.device, non_blocking=self.pin).permute(0, 3, 1, 2)  # NHWC memory = channels-last
        x = self.model.normalize(x).contiguous(memory_format=torch.channels_last)
        if self.dtype != torch.float32:  # a copy whose weights are already in this dtype
            return self.forward(x.to(self.dtype)).float().cpu()
        with autocast_context(str(self.device), self.precision):
            y = self.forward(x)
        return y.float().cpu()

    def restore(self) -> None:
        """The caller's model back where it was; the folded copy off the accelerator."""
        self._trunk.to(self._home if not self.fused else torch.device("cpu"))


def _prefetch(array: np.ndarray, todo: np.ndarray, batch_size: int, workers: int,
              pin: bool) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(indices, uint8 batch) in order, read ahead by ``workers`` background threads."""
    batches = [todo[i:i + batch_size] for i in range(0, len(todo), batch_size)]

    def load(idx: np.ndarray) -> torch.Tensor:
        if len(idx) and idx[-1] - idx[0] == len(idx) - 1:  # a contiguous run: slice, one copy
            arr = np.array(array[int(idx[0]):int(idx[-1]) + 1])
        else:
            arr = np.asarray(array[idx])
        t = torch.from_numpy(arr)
        return t.pin_memory() if pin else t

    if workers <= 0:
        for idx in batches:
            yield idx, load(idx)
        return
    results: dict[int, Any] = {}
    cond = threading.Condition()
    jobs: queue.Queue[int | None] = queue.Queue()
    depth = 2 * workers  # batches allowed ahead of the consumer
    consumed = [0]
    stop = threading.Event()

    def worker() -> None:
        while True:
            j = jobs.get()
            if j is None or stop.is_set():
                return
            with cond:
                cond.wait_for(lambda: j < consumed[0] + depth or stop.is_set())
            if stop.is_set():
                return
            try:
                res: Any = load(batches[j])
            except BaseException as exc:  # re-raised in the consumer thread
                res = exc
            with cond:
                results[j] = res
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for j in range(len(batches)):
        jobs.put(j)
    for _ in threads:
        jobs.put(None)
    for t in threads:
        t.start()
    try:
        for j, idx in enumerate(batches):
            with cond:
                cond.wait_for(lambda: j in results)
                res = results.pop(j)
                consumed[0] = j + 1
                cond.notify_all()
            if isinstance(res, BaseException):
                raise res
            yield idx, res
    finally:
        stop.set()
        with cond:
            cond.notify_all()
        for t in threads:
            t.join()


def _flush(feats: np.ndarray, done: np.ndarray, done_path: Path) -> None:
    """Features to disk first, then the mask that declares them done."""
    if isinstance(feats, np.memmap):
        feats.flush()
    save_npy_atomic(done_path, done)


def _open_partial(feats_path: Path, done_path: Path, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Reopen an interrupted extraction, or start a fresh preallocated memmap."""
    if feats_path.is_file() and done_path.is_file():
        try:
            feats = np.load(feats_path, mmap_mode="r+")
            done = np.load(done_path)
            if feats.shape == (n, dim) and feats.dtype == np.float32 and done.shape == (n,):
                return feats, done.astype(bool)
            log.warning("%s: partial features have the wrong shape; starting again", feats_path.parent)
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable partial features (%s); starting again", feats_path.parent, exc)
    feats = np.lib.format.open_memmap(feats_path, mode="w+", dtype=np.float32, shape=(n, dim))
    done = np.zeros(n, dtype=bool)
    save_npy_atomic(done_path, done)
    return feats, done


def _check_complete(feats: np.ndarray, done: np.ndarray, model: str, prepared: PreparedImages,
                    chunk: int = 4096) -> None:
    """Every row extracted and finite; errors name the model and the first bad record."""
    if not done.all():
        first = int(np.argmin(done))
        raise FeatureError(f"model {model}: {int((~done).sum())} records of {prepared.dataset!r} "
                           f"were not extracted, first {first} ({prepared.records[first].path})")
    for start in range(0, len(feats), chunk):
        ok = np.isfinite(feats[start:start + chunk]).all(axis=1)
        if not ok.all():
            first = start + int(np.argmin(ok))
            raise FeatureError(f"model {model}: non-finite features for record {first} "
                               f"({prepared.records[first].path}) of dataset {prepared.dataset!r}")


def _load(model: Backbone, prepared: PreparedImages, out: Path, key: str) -> FeatureSet:
    meta = json.loads((out / "meta.json").read_text())
    feats = np.load(out / "features.npy", mmap_mode="r")
    if feats.shape != (len(prepared), model.feature_dim):
        raise FeatureError(f"{out}: cached features have shape {feats.shape}, expected "
                           f"{len(prepared)} x {model.feature_dim}; delete the folder")
    meta = dict(meta, bad=list(prepared.bad), path=str(out))
    return FeatureSet(features=feats, labels=prepared.labels, splits=prepared.splits, records=list(prepared.records),
                      class_names=prepared.class_names, model=model.name, dataset=prepared.dataset,
                      key=key, headline_metric=prepared.headline_metric, meta=meta)
