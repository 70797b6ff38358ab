"""Prepare stage: decode every image once into a uint8 memmap of evaluation crops.

The evaluation transform (PROTOCOL.md): resize the shorter side to ``size`` (bicubic), centre
crop ``size`` x ``size``; the ``"squash"`` compat mode instead resizes both sides to
``round(size * 257 / 224)`` (bilinear, aspect distorting: the authors' few-shot code for the
small datasets) before the crop.
Large JPEGs are decoded at reduced size (``Image.draft``), greyscale stays one channel when
the whole dataset is greyscale. One prepared array serves every model; normalisation happens
per model on the device.

The array is a :class:`~medxfer.cache.ResumableArray` under ``<cache>/prepared/<key>/``; its
key covers the image files (paths, sizes, modification times, in record order) and the
transform only, so options that change labels alone reuse the decoded images.
"""
from __future__ import annotations

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

from medxfer.cache import (
    STATE_DONE,
    STATE_FAILED,
    ResumableArray,
    content_key,
    resolve_cache_dir,
)
from medxfer.data.images import SIXTEEN_BIT_RANGE, ImageReadError, image_header, open_image
from medxfer.data.records import Dataset, DatasetInfo, Record
from medxfer.errors import UsageError
from medxfer.progress import bar
from medxfer.registry import Registry

log = logging.getLogger(__name__)

# Bump when decoding/resizing changes in a way that changes prepared pixels.
DECODER_VERSION = "2"  # 2: 16-bit images scaled by a fixed range, not each image's maximum
SQUASH_REFERENCE = (257, 224)  # the authors' squash: 257 -> crop 224
CHECKPOINT_EVERY = 512  # records decoded between flushes of the memmap and the resume state
KEEP = "keep"  # the finetuning store: whole images, shorter side to the size, in a padded canvas
MAX_KEEP_ASPECT = 2.5


@dataclass
class PreparedImages:
    """Decoded, resized, centre-cropped images aligned row for row with ``records``.

    ``array`` is N x S x S x C uint8 (C = 1 for an all-greyscale dataset, else 3), usually a
    read-only memmap. ``key`` hashes the image files and the transform. ``info`` is the
    dataset's (class names, headline metric; None for arrays built by hand). ``bad`` lists
    record indices that could not be decoded (only with ``skip_bad``; their rows are zeros).
    ``built`` says whether this call decoded them (False: read from the cache). The ``keep``
    store (finetuning crops) holds whole images top-left in a padded canvas; ``extents`` gives
    each row's (height, width) there (None for the square evaluation crops).
    """

    array: np.ndarray
    records: list[Record]
    key: str
    path: Path | None
    size: int
    info: DatasetInfo | None = None
    bad: list[int] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    built: bool = False
    extents: np.ndarray | None = None

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
    def class_names(self) -> tuple[str, ...]:
        if self.info is not None:
            return tuple(self.info.class_names)
        return tuple(str(c) for c in range(int(self.labels.max()) + 1)) if self.records else ()

    @property
    def dataset(self) -> str:
        return self.info.name if self.info is not None else ""

    @property
    def headline_metric(self) -> str:
        return self.info.headline_metric if self.info is not None else "accuracy"


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
    """Both sides to ``round(size * 257 / 224)``, bilinear (torchvision's default, as in the
    authors' few-shot code), ignoring the aspect ratio."""
    side = int(round(size * SQUASH_REFERENCE[0] / SQUASH_REFERENCE[1]))
    return img if img.size == (side, side) else img.resize((side, side), Image.BILINEAR)


def center_crop(img: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """Centre crop ``size`` x ``size`` (or (width, height)) with torchvision's rounding of the offsets."""
    cw, ch = (size, size) if isinstance(size, int) else size
    w, h = img.size
    left = int(round((w - cw) / 2.0))
    top = int(round((h - ch) / 2.0))
    return img.crop((left, top, left + cw, top + ch))


def keep_extent(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) of an image after :func:`_keep_whole`: shorter side ``size`` (never
    enlarged), aspect kept up to :data:`MAX_KEEP_ASPECT` (a longer side is centre-cropped)."""
    short = min(width, height)
    target = min(size, short)
    if width <= height:
        w, h = target, int(target * height / width)
    else:
        w, h = int(target * width / height), target
    cap = int(MAX_KEEP_ASPECT * target)
    return min(w, cap), min(h, cap)


def _keep_whole(img: Image.Image, size: int) -> Image.Image:
    """The training store's transform: the whole image, shorter side to ``size`` (bicubic,
    never enlarged), aspect preserved (beyond :data:`MAX_KEEP_ASPECT` the long side is cropped)."""
    w, h = img.size
    target = min(size, w, h)
    resized = _resize_aspect(img, target) if target != min(w, h) else img
    cw, ch = keep_extent(w, h, size)
    return resized if resized.size == (cw, ch) else center_crop(resized, (cw, ch))


def _aspect_crop(img: Image.Image, size: int) -> Image.Image:
    return center_crop(_resize_aspect(img, size), size)


def _squash_crop(img: Image.Image, size: int) -> Image.Image:
    return center_crop(_resize_squash(img, size), size)


# name -> the whole transform from a decoded image to what is stored
RESIZES: Registry[Callable[[Image.Image, int], Image.Image]] = Registry("resize mode")
RESIZES.register("aspect", _aspect_crop)
RESIZES.register("squash", _squash_crop)
RESIZES.register(KEEP, _keep_whole)


def decode_record(path: str, size: int, resize: str, channels: int, high_range: int = SIXTEEN_BIT_RANGE) -> np.ndarray:
    """One image file -> S x S x C uint8 evaluation crop (raises ImageReadError); 16-bit
    greyscale is scaled by ``255 / high_range`` (see :func:`~medxfer.data.images.open_image`)."""
    img = open_image(path, draft_size=size, high_range=high_range)
    arr = np.asarray(RESIZES.get(resize)(img, size), dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.shape[2] != channels:
        if arr.shape[2] == 1 and channels == 3:
            arr = np.repeat(arr, 3, axis=2)  # a greyscale image in an RGB dataset
        else:
            raise ImageReadError(f"{path}: decoded {arr.shape[2]} channels, dataset has {channels}")
    return arr


def _decode_task(path: str, size: int, resize: str, channels: int,
                 high_range: int = SIXTEEN_BIT_RANGE) -> tuple[np.ndarray | None, str | None]:
    """Worker entry point: an array, or the error message (errors travel as data)."""
    try:
        return decode_record(path, size, resize, channels, high_range), None
    except ImageReadError as exc:
        return None, str(exc)


# --------------------------------------------------------------------------- keys and cache

def prepared_key(dataset: Dataset, size: int = 224, resize: str = "aspect") -> str:
    """The cache key of ``prepare(dataset, size=size, resize=resize)``: the image files (paths,
    sizes, modification times, in record order) and the transform, nothing else.

    Channels are not a separate part: they are a function of the image files, and reading
    every header just to look the cache up would cost more than the lookup on a large dataset.
    """
    RESIZES.get(resize)
    return content_key("prepared", dataset.files_fingerprint(), int(size), resize, DECODER_VERSION,
                       dataset.info.high_range)


def prepared_artifact(dataset: Dataset, size: int = 224, resize: str = "aspect",
                      cache_dir: str | os.PathLike[str] | None = None) -> ResumableArray:
    """The cache artifact of this dataset's prepared images (ask it ``progress()``, ``complete``)."""
    key = prepared_key(dataset, size, resize)
    return ResumableArray(resolve_cache_dir(cache_dir) / "prepared" / key,
                          f"prepared images of {dataset.info.name} ({size}px, {resize})",
                          about={"dataset": dataset.info.name, "size": int(size), "resize": resize})


def is_prepared(dataset: Dataset, size: int = 224, resize: str = "aspect",
                cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether a complete prepared array for this dataset and transform is cached."""
    return prepared_artifact(dataset, size, resize, cache_dir).complete


def default_workers() -> int:
    """Decoding workers: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _header_or_none(path: str) -> tuple[int, tuple[int, int]] | None:
    try:
        return image_header(path)
    except ImageReadError:  # reported, with its record, when the image is decoded
        return None


def dataset_geometry(records: Sequence[Record], workers: int = 1) -> tuple[int, list[tuple[int, int]]]:
    """(1 if every readable image is greyscale else 3, each readable image's (width, height)),
    from the headers; unreadable ones are left to the decoding step, which names them."""
    paths = [r.path for r in records]
    if workers > 1 and len(paths) > 1:
        with ThreadPoolExecutor(workers) as pool:
            heads = [h for h in pool.map(_header_or_none, paths, chunksize=64) if h is not None]
    else:
        heads = [h for h in map(_header_or_none, paths) if h is not None]
    return (1 if heads and all(c == 1 for c, _ in heads) else 3), [wh for _, wh in heads] or [(1, 1)]


# --------------------------------------------------------------------------- prepare

def prepare(
    dataset: Dataset,
    *,
    size: int = 224,
    resize: str = "aspect",
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    skip_bad: bool = False,
    progress: bool | None = None,
    executor: str = "thread",
    checkpoint_every: int = CHECKPOINT_EVERY,
    on_progress: Callable[[int, int], None] | None = None,
) -> PreparedImages:
    """Decode every image of ``dataset`` once into a cached uint8 memmap (resumable, locked).

    ``workers``: decoding workers (None = all cores; 0 or 1 = in this thread). ``executor``:
    ``"thread"`` (Pillow releases the GIL while decoding and resizing) or ``"process"``.
    ``progress``: a bar (None: when the ``medxfer`` logger shows INFO). ``checkpoint_every``:
    images between durable flushes; ``on_progress(done, total)`` is called after every image.
    A bad image raises :class:`ImageReadError` naming the file and record index, or with
    ``skip_bad`` is recorded in ``bad`` / ``meta["problems"]`` and left as zeros.
    """
    if size < 1:
        raise UsageError(f"size must be positive, got {size}")
    if executor not in _EXECUTORS:
        raise UsageError(f"executor must be one of {sorted(_EXECUTORS)}, got {executor!r}")
    n = len(dataset.records)
    if n == 0:
        raise UsageError(f"dataset {dataset.info.name!r} has no records to prepare")
    n_workers = default_workers() if workers is None else max(0, int(workers))
    art = prepared_artifact(dataset, size, resize, cache_dir)

    def build(a: ResumableArray) -> dict[str, Any]:
        channels, extent = dataset_geometry(dataset.records, n_workers)
        keep = resize == KEEP
        canvas = (size, size)
        if keep:  # the largest (height, width) of a whole image after the transform, one pixel of slack
            hw = [keep_extent(w, h, size)[::-1] for w, h in extent]
            canvas = (max(h for h, _ in hw) + 1, max(w for _, w in hw) + 1)
        part = a.start((n, *canvas, channels), np.uint8, checkpoint_every=checkpoint_every,
                       on_progress=on_progress, row_fields=2 if keep else 0)
        channels = int(part.array.shape[-1])
        todo = part.todo
        t0 = time.perf_counter()
        paths = [dataset.records[i].path for i in todo]
        steps = bar(total=n, initial=n - len(todo), desc=f"prepare {dataset.info.name}", unit="img", enabled=progress)
        try:
            decoded = _decode_all(paths, size, resize, channels, n_workers, executor, dataset.info.high_range)
            for i, (img, err) in zip(todo, decoded):
                if err is not None:
                    if not skip_bad:
                        raise ImageReadError(f"record {int(i)} of dataset {dataset.info.name!r}: {err}")
                    part.array[i] = 0
                    part.mark(i, STATE_FAILED, err)
                else:
                    h, w = min(img.shape[0], canvas[0]), min(img.shape[1], canvas[1])
                    if keep:
                        part.array[i, :h, :w] = img[:h, :w]
                        part.rows[i] = (h, w)
                    else:
                        part.array[i] = img
                    part.mark(i, STATE_DONE)
                steps.update(1)
        finally:
            steps.close()
            part.flush()
        seconds = time.perf_counter() - t0
        bad = [int(i) for i in np.flatnonzero(part.state == STATE_FAILED)]
        meta = {
            "n": n, "size": size, "resize": resize, "channels": channels, "decoder_version": DECODER_VERSION,
            "files_fingerprint": dataset.files_fingerprint(), "first_dataset": dataset.info.name,
            "bad": bad, "problems": [f"record {i}: {part.notes[str(i)]}" for i in bad],
            "seconds": round(seconds, 3), "images_decoded": int(len(todo)),
            "workers": n_workers, "executor": executor,
        }
        a.finish(part, meta)
        log.info("prepared %s: %d images decoded in %.1fs -> %s", dataset.info.name, len(todo), seconds, a.folder)
        return meta

    array, meta, built = art.get_or_build(build)
    if not built:
        log.info("prepared %s: cached at %s", dataset.info.name, art.folder)
    extents = meta.pop("rows", None)
    if array.shape[0] != n or (resize != KEEP and array.shape[1:3] != (size, size)):
        raise UsageError(f"{art.folder}: cached prepared array has shape {array.shape}, "
                         f"expected {n} x {size} x {size}")
    prepared = PreparedImages(array=array, records=list(dataset.records), key=art.folder.name, path=art.folder,
                              size=size, info=dataset.info, bad=list(meta.get("bad", [])), meta=meta, built=built,
                              extents=extents)
    _check_bad(prepared, skip_bad)
    return prepared


def _decode_all(paths: list[str], size: int, resize: str, channels: int, workers: int,
                executor: str, high_range: int = SIXTEEN_BIT_RANGE) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Decoded crops in order, computed by ``workers`` parallel workers (bounded in flight)."""
    if workers <= 1:
        for p in paths:
            yield _decode_task(p, size, resize, channels, high_range)
        return
    with _EXECUTORS[executor](workers) as pool:
        window = 8 * workers
        pending = []
        it = iter(paths)
        for p in it:
            pending.append(pool.submit(_decode_task, p, size, resize, channels, high_range))
            if len(pending) >= window:
                break
        for p in it:
            yield pending.pop(0).result()
            pending.append(pool.submit(_decode_task, p, size, resize, channels, high_range))
        for fut in pending:
            yield fut.result()


def _process_pool(workers: int) -> Executor:
    return ProcessPoolExecutor(workers)


def _thread_pool(workers: int) -> Executor:
    return ThreadPoolExecutor(workers)


_EXECUTORS: dict[str, Callable[[int], Executor]] = {"thread": _thread_pool, "process": _process_pool}


def _check_bad(prepared: PreparedImages, skip_bad: bool) -> None:
    """A cache made with ``skip_bad`` that holds bad images still errors without it."""
    if prepared.bad and not skip_bad:
        i = prepared.bad[0]
        msg = prepared.meta["problems"][0]
        raise ImageReadError(f"dataset {prepared.dataset!r}: {len(prepared.bad)} unreadable image(s), "
                             f"first {msg} (record {i}); pass skip_bad=True to leave them out")
