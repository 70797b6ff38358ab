"""Prepare stage: decode every image once into a uint8 memmap of evaluation crops.

The evaluation transform (PROTOCOL.md): resize the shorter side to ``size`` (bicubic), centre
crop ``size`` x ``size``; the ``"squash"`` compat mode instead resizes both sides to
``round(size * 257 / 224)`` (aspect distorting, the authors' few-shot code) before the crop.
Large JPEGs are decoded at reduced size (``Image.draft``), greyscale stays one channel when
the whole dataset is greyscale. One prepared array serves every model; normalisation happens
per model on the device.

Cache layout under ``<cache>/prepared/<key>/``: ``images.npy`` (N x S x S x C uint8, written
in place as a memmap), ``state.npy`` (per-record int8: 0 to do, 1 done, 2 bad; saved
atomically after every flushed chunk so a killed run resumes), ``problems.json`` (messages of
bad records) and ``meta.json`` (written atomically last: its presence marks completion).
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medxfer.cache import content_key, resolve_cache_dir, save_npy_atomic, write_json_atomic
from medxfer.data.images import ImageReadError, image_channels, open_image
from medxfer.data.records import Dataset, Record
from medxfer.registry import Registry

log = logging.getLogger(__name__)

# Bump when decoding/resizing changes in a way that changes prepared pixels.
DECODER_VERSION = "1"
SQUASH_REFERENCE = (257, 224)  # the authors' squash: 257 -> crop 224
FLUSH_EVERY = 512  # records decoded between flushes of the memmap and the resume state

STATE_TODO, STATE_DONE, STATE_BAD = 0, 1, 2


@dataclass
class PreparedImages:
    """Decoded, resized, centre-cropped images aligned row for row with ``records``.

    ``array`` is N x S x S x C uint8 (C = 1 for an all-greyscale dataset, else 3), usually a
    read-only memmap. ``key`` hashes everything that determines the content (dataset
    fingerprint, size, resize mode, decoder version). ``bad`` lists record indices that
    could not be decoded (only with ``skip_bad``; their rows are zeros).
    """

    array: np.ndarray
    records: list[Record]
    key: str
    path: Path | None
    size: int
    class_names: tuple[str, ...] = ()
    dataset: str = ""
    bad: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def channels(self) -> int:
        return int(self.array.shape[-1])

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    @property
    def splits(self) -> np.ndarray:
        return np.array([r.split for r in self.records], dtype=object)

    @property
    def headline_metric(self) -> str:
        return str(self.meta.get("headline_metric", "accuracy"))


# --------------------------------------------------------------------------- transforms

def _resize_aspect(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), longer side truncated as torchvision's Resize(int)."""
    w, h = img.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.BICUBIC)


def _resize_squash(img: Image.Image, size: int) -> Image.Image:
    """Both sides to ``round(size * 257 / 224)`` (bicubic), ignoring the aspect ratio."""
    side = int(round(size * SQUASH_REFERENCE[0] / SQUASH_REFERENCE[1]))
    return img if img.size == (side, side) else img.resize((side, side), Image.BICUBIC)


RESIZES: Registry[Callable[[Image.Image, int], Image.Image]] = Registry("resize mode")
RESIZES.register("aspect", _resize_aspect)
RESIZES.register("squash", _resize_squash)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Centre crop ``size`` x ``size`` with torchvision's rounding of the offsets."""
    w, h = img.size
    left = int(round((w - size) / 2.0))
    top = int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def decode_record(path: str, size: int, resize: str, channels: int) -> np.ndarray:
    """One image file -> S x S x C uint8 evaluation crop (raises ImageReadError)."""
    img = open_image(path, draft_size=size)
    img = center_crop(RESIZES.get(resize)(img, size), size)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        if arr.shape[2] == 1 and channels == 3:
            arr = np.repeat(arr, 3, axis=2)  # a greyscale image in an RGB dataset
        else:
            raise ImageReadError(f"{path}: decoded {arr.shape[2]} channels, dataset has {channels}")
    return arr


def _decode_task(path: str, size: int, resize: str, channels: int) -> tuple[np.ndarray | None, str | None]:
    """Worker entry point: an array, or the error message (errors travel as data)."""
    try:
        return decode_record(path, size, resize, channels), None
    except ImageReadError as exc:
        return None, str(exc)


# --------------------------------------------------------------------------- keys and cache

def prepared_key(dataset: Dataset, size: int = 224, resize: str = "aspect", fingerprint: str | None = None) -> str:
    """The cache key of ``prepare(dataset, size=size, resize=resize)``.

    Channels are not a separate part: they are a function of the image files, which the
    dataset fingerprint already covers (path, size, mtime of every file), and reading every
    header just to look the cache up would cost more than the lookup on a large dataset.
    """
    RESIZES.get(resize)
    fp = dataset.fingerprint() if fingerprint is None else fingerprint
    return content_key("prepared", fp, int(size), resize, DECODER_VERSION)


def prepare_dir_for(key: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache folder of the prepared array with ``key``."""
    return resolve_cache_dir(cache_dir) / "prepared" / key


def prepared_dir(dataset: Dataset, size: int = 224, resize: str = "aspect",
                 cache_dir: str | os.PathLike[str] | None = None) -> Path:
    return prepare_dir_for(prepared_key(dataset, size, resize), cache_dir)


def is_prepared(dataset: Dataset, size: int = 224, resize: str = "aspect",
                cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether a complete prepared array for this dataset and transform is cached."""
    return (prepared_dir(dataset, size, resize, cache_dir) / "meta.json").is_file()


def default_workers() -> int:
    """Decoding workers: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def dataset_channels(records: Sequence[Record], workers: int = 1) -> int:
    """1 if every image is greyscale (read from headers), else 3."""
    paths = [r.path for r in records]
    if workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(workers) as pool:
            modes = pool.map(image_channels, paths, chunksize=64)
            return 1 if all(c == 1 for c in modes) else 3
    return 1 if all(image_channels(p) == 1 for p in paths) else 3


# --------------------------------------------------------------------------- prepare

def prepare(
    dataset: Dataset,
    *,
    size: int = 224,
    resize: str = "aspect",
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    executor: str = "thread",
) -> PreparedImages:
    """Decode every image of ``dataset`` once into a cached uint8 memmap (resumable).

    ``workers``: decoding workers (None = all cores; 0 or 1 = in this thread). ``executor``:
    ``"thread"`` (Pillow releases the GIL while decoding and resizing) or ``"process"``.
    A bad image raises :class:`ImageReadError` naming the file and record index, or with
    ``skip_bad`` is recorded in ``bad`` / ``meta["problems"]`` and left as zeros.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    if executor not in _EXECUTORS:
        raise ValueError(f"executor must be one of {sorted(_EXECUTORS)}, got {executor!r}")
    n = len(dataset.records)
    if n == 0:
        raise ValueError(f"dataset {dataset.info.name!r} has no records to prepare")
    workers = default_workers() if workers is None else max(0, int(workers))
    fingerprint = dataset.fingerprint()  # stats every file: once per call
    key = prepared_key(dataset, size, resize, fingerprint)
    out = prepare_dir_for(key, cache_dir)
    meta_path = out / "meta.json"
    if meta_path.is_file():
        prepared = _load(dataset, out, key, size)
        _check_bad(prepared, skip_bad)
        log.info("prepared %s: cached at %s", dataset.info.name, out)
        return prepared

    out.mkdir(parents=True, exist_ok=True)
    images_path, state_path, problems_path = out / "images.npy", out / "state.npy", out / "problems.json"
    array, state, problems = _open_partial(images_path, state_path, problems_path, n, size)
    if array is None:
        channels = dataset_channels(dataset.records, workers)
        array = np.lib.format.open_memmap(images_path, mode="w+", dtype=np.uint8, shape=(n, size, size, channels))
        state = np.zeros(n, dtype=np.int8)
        problems = {}
        save_npy_atomic(state_path, state)
    channels = int(array.shape[-1])
    todo = np.flatnonzero(state == STATE_TODO)
    if len(todo) < n:
        log.info("prepared %s: resuming, %d of %d images left", dataset.info.name, len(todo), n)

    t0 = time.perf_counter()
    paths = [dataset.records[i].path for i in todo]
    bar = tqdm(total=n, initial=n - len(todo), desc=f"prepare {dataset.info.name}", unit="img",
               disable=not progress, leave=False)
    try:
        since_flush = 0
        for i, (img, err) in zip(todo, _decode_all(paths, size, resize, channels, workers, executor)):
            if err is not None:
                if not skip_bad:
                    raise ImageReadError(f"record {int(i)} of dataset {dataset.info.name!r}: {err}")
                array[i] = 0
                state[i] = STATE_BAD
                problems[str(int(i))] = err
            else:
                array[i] = img
                state[i] = STATE_DONE
            since_flush += 1
            bar.update(1)
            if since_flush >= FLUSH_EVERY:
                _flush(array, state, problems, state_path, problems_path)
                since_flush = 0
    finally:
        bar.close()
        _flush(array, state, problems, state_path, problems_path)
    seconds = time.perf_counter() - t0

    if (state == STATE_TODO).any():  # cannot happen unless the state file was tampered with
        raise RuntimeError(f"prepare {dataset.info.name}: {(state == STATE_TODO).sum()} images left undone")
    bad = [int(i) for i in np.flatnonzero(state == STATE_BAD)]
    meta = {
        "dataset": dataset.info.name,
        "fingerprint": fingerprint,
        "n": n, "size": size, "resize": resize, "channels": channels,
        "decoder_version": DECODER_VERSION,
        "class_names": list(dataset.info.class_names),
        "headline_metric": dataset.info.headline_metric,
        "bad": bad,
        "problems": [f"record {i}: {problems[str(i)]}" for i in bad],
        "seconds": round(seconds, 3),
        "images_decoded": int(len(todo)),
        "workers": workers, "executor": executor,
    }
    del array
    write_json_atomic(meta_path, meta)
    log.info("prepared %s: %d images in %.1fs -> %s", dataset.info.name, len(todo), seconds, out)
    prepared = _load(dataset, out, key, size)
    _check_bad(prepared, skip_bad)
    return prepared


def _decode_all(paths: list[str], size: int, resize: str, channels: int, workers: int,
                executor: str) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Decoded crops in order, computed by ``workers`` parallel workers (bounded in flight)."""
    if workers <= 1:
        for p in paths:
            yield _decode_task(p, size, resize, channels)
        return
    with _EXECUTORS[executor](workers) as pool:
        window = 8 * workers
        pending = []
        it = iter(paths)
        for p in it:
            pending.append(pool.submit(_decode_task, p, size, resize, channels))
            if len(pending) >= window:
                break
        for p in it:
            yield pending.pop(0).result()
            pending.append(pool.submit(_decode_task, p, size, resize, channels))
        for fut in pending:
            yield fut.result()


def _process_pool(workers: int) -> Executor:
    return ProcessPoolExecutor(workers)


def _thread_pool(workers: int) -> Executor:
    return ThreadPoolExecutor(workers)


_EXECUTORS: dict[str, Callable[[int], Executor]] = {"thread": _thread_pool, "process": _process_pool}


def _flush(array: np.ndarray, state: np.ndarray, problems: dict[str, str], state_path: Path,
           problems_path: Path) -> None:
    """Pixels to disk first, then the messages, then the state that declares them done."""
    if isinstance(array, np.memmap):
        array.flush()
    write_json_atomic(problems_path, problems)
    save_npy_atomic(state_path, state)


def _open_partial(images_path: Path, state_path: Path, problems_path: Path, n: int,
                  size: int) -> tuple[np.ndarray | None, np.ndarray, dict[str, str]]:
    """Reopen an interrupted prepare, or (None, ...) when there is nothing usable."""
    empty = np.zeros(n, dtype=np.int8)
    if not (images_path.is_file() and state_path.is_file()):
        return None, empty, {}
    try:
        array = np.load(images_path, mmap_mode="r+")
        state = np.load(state_path)
        problems = json.loads(problems_path.read_text()) if problems_path.is_file() else {}
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable partial prepare (%s); starting again", images_path.parent, exc)
        return None, empty, {}
    if array.shape[:3] != (n, size, size) or state.shape != (n,):
        log.warning("%s: partial prepare has the wrong shape; starting again", images_path.parent)
        return None, empty, {}
    done_bad = {str(i) for i in np.flatnonzero(state == STATE_BAD)}
    return array, state.astype(np.int8), {k: v for k, v in problems.items() if k in done_bad}


def _load(dataset: Dataset, out: Path, key: str, size: int) -> PreparedImages:
    meta = json.loads((out / "meta.json").read_text())
    array = np.load(out / "images.npy", mmap_mode="r")
    if array.shape[:3] != (len(dataset.records), size, size):
        raise RuntimeError(f"{out}: cached prepared array has shape {array.shape}, "
                           f"expected {len(dataset.records)} x {size} x {size}; delete the folder")
    return PreparedImages(
        array=array, records=list(dataset.records), key=key, path=out, size=size,
        class_names=tuple(dataset.info.class_names), dataset=dataset.info.name,
        bad=list(meta.get("bad", [])), meta=meta,
    )


def _check_bad(prepared: PreparedImages, skip_bad: bool) -> None:
    """A cache made with ``skip_bad`` that holds bad images still errors without it."""
    if prepared.bad and not skip_bad:
        i = prepared.bad[0]
        msg = prepared.meta["problems"][0]
        raise ImageReadError(f"dataset {prepared.dataset!r}: {len(prepared.bad)} unreadable image(s), "
                             f"first {msg} (record {i}); pass skip_bad=True to leave them out")
