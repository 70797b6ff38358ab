"""How a frozen backbone runs: precision policy, BatchNorm folding, OOM back-off, prefetching.

One module used by extraction, the planner's probe and the analyses, so they all run a model
the same way:

- :func:`autocast_context` / :data:`PRECISIONS`: fp32, or bf16 / fp16 autocast (features stay
  float32 and agree with fp32 within :data:`AUTOCAST_TOLERANCE`);
- :func:`runtime_module`: the module that runs for a (model, layer, device, precision): a
  BatchNorm-folded copy (exact in eval mode), in bf16 weights on a CPU for bf16;
- :class:`Runner`: normalises uint8 batches on the device, runs them channels-last under
  ``inference_mode``, halves the batch on CUDA out-of-memory, returns float32 on the CPU;
- :func:`prefetch`: batches read ahead by background threads (pinned memory on CUDA).
"""
from __future__ import annotations

import copy
import logging
import queue
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from medxfer.errors import UsageError
from medxfer.models.backbone import POOLED, Backbone, LayerModule

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_BATCH = {"cuda": 256, "cpu": 32}
# Stated tolerance of autocast features against fp32: max |a - b| / max |fp32| per feature set.
AUTOCAST_TOLERANCE = {"bf16": 5e-2, "fp16": 1e-2}


def default_batch_size(device: str) -> int:
    """A starting batch for the device type; CUDA halves it on out-of-memory."""
    return DEFAULT_BATCH.get(torch.device(device).type, 32)


def check_precision(device: str, precision: str) -> None:
    """A clear error where ``precision`` cannot run on ``device``."""
    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device).type
    if precision == "fp16" and dev != "cuda":
        raise UsageError("precision 'fp16' needs a CUDA device; use 'bf16' on CPU")
    if precision == "bf16" and dev == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this CUDA device does not support bf16; use 'fp16' or 'fp32'")


def autocast_context(device: str, precision: str) -> AbstractContextManager[Any]:
    """The autocast context for ``precision`` on ``device``."""
    check_precision(device, precision)
    dtype = PRECISIONS[precision]
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of an eval-mode module with every conv -> BatchNorm pair folded into one conv.

    Exact in eval mode up to float rounding, and one memory pass less per layer (about 20-40%
    faster ResNet inference on CPU). None when the module cannot be traced symbolically.
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(module, inplace=False)
    except Exception as exc:  # untraceable custom trunks keep their own forward
        log.info("batchnorm folding not applied (%s: %s)", type(exc).__name__, exc)
        return None


_FOLDED: weakref.WeakKeyDictionary[Backbone, dict[tuple[str, str, torch.dtype], torch.nn.Module | None]] = (
    weakref.WeakKeyDictionary())


def folded_trunk(model: Backbone, dtype: torch.dtype = torch.float32, layer: str = POOLED) -> torch.nn.Module | None:
    """The BatchNorm-folded copy of ``model`` up to ``layer`` with weights in ``dtype``, made once
    per (model, weights, layer, dtype) and reused; None when it cannot be folded."""
    copies = _FOLDED.setdefault(model, {})
    key = (model.weights_hash, layer, dtype)
    if key not in copies:
        for old in [k for k in copies if k[0] != model.weights_hash]:
            del copies[old]  # the weights changed: stale copies go
        if dtype == torch.float32:
            copies[key] = fold_batchnorm(_layer_module(model, layer))
        else:
            base = folded_trunk(model, torch.float32, layer)
            copies[key] = None if base is None else copy.deepcopy(base).to(dtype)
    return copies[key]


def _layer_module(model: Backbone, layer: str) -> torch.nn.Module:
    return model.trunk if layer == POOLED else LayerModule(model.trunk, model.arch, layer).eval()


def runtime_module(model: Backbone, device: str, precision: str, fuse: bool = True,
                   layer: str = POOLED) -> tuple[torch.nn.Module, torch.dtype]:
    """The module that runs for this device, precision and layer, and the dtype of its input.

    With ``fuse``: the BatchNorm-folded copy (the caller's model is untouched); bf16 on a CPU
    uses a bf16 copy of it on bf16 input (the same roundings as autocast, which casts the same
    folded weights on every call, without re-casting them per batch: about 1.5x faster on
    CPU); otherwise fp32 weights, with autocast for reduced precision. Without ``fuse``, or
    when folding is impossible, the model's own modules.
    """
    if fuse and torch.device(device).type == "cpu" and precision == "bf16":
        copy_bf16 = folded_trunk(model, torch.bfloat16, layer)
        if copy_bf16 is not None:
            return copy_bf16, torch.bfloat16
    folded = folded_trunk(model, torch.float32, layer) if fuse else None
    return (folded if folded is not None else _layer_module(model, layer)), torch.float32


class Runner:
    """Runs uint8 batches through a model as :func:`runtime_module` says, on ``device``.

    ``runner(batch)``: uint8 B x H x W x C (CPU, maybe pinned) -> float32 B x D on the CPU.
    :meth:`restore` puts the caller's model back where it was (or the folded copy off the
    accelerator). ``batch_cap`` is lowered on CUDA out-of-memory and remembered.
    """

    def __init__(self, model: Backbone, device: str, precision: str = "fp32", *, compile: bool = False,
                 fuse: bool = True, layer: str = POOLED) -> None:
        check_precision(device, precision)
        self.model = model
        self.device = torch.device(device)
        self.precision = precision
        self.pin = self.device.type == "cuda"
        first = next(model.parameters(), None)
        self._home = first.device if first is not None else torch.device("cpu")
        module, self.dtype = runtime_module(model, device, precision, fuse, layer)
        self.fused = module is not model.trunk and not isinstance(module, LayerModule)
        module.to(self.device, memory_format=torch.channels_last)
        self._module = module
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(module) if compile else module)  # type: ignore[assignment]
        self.batch_cap: int | None = None

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
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
                log.warning("%s: out of GPU memory, batch lowered to %d", self.model.name, cap)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _forward(self, part: torch.Tensor) -> torch.Tensor:
        x = part.to(self.device, non_blocking=self.pin).permute(0, 3, 1, 2)  # NHWC memory = channels-last
        x = self.model.normalize(x).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            if self.dtype != torch.float32:  # a copy whose weights are already in this dtype
                return self.forward(x.to(self.dtype)).float().cpu()
            with autocast_context(str(self.device), self.precision):
                y = self.forward(x)
        return y.float().cpu()

    def restore(self) -> None:
        """The caller's model back where it was; the folded copy off the accelerator."""
        self._module.to(self._home if not self.fused else torch.device("cpu"))


def prefetch(array: np.ndarray, rows: np.ndarray, batch_size: int, workers: int,
             pin: bool) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(row indices, uint8 batch) in order, read ahead by ``workers`` background threads."""
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]

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
