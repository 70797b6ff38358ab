"""Prepare: reduced-size JPEG decoding vs full decoding on the real EyePACS sample.

EyePACS photographs are 2560x1920 to 4752x3168 JPEGs; the evaluation crop is 224x224. Full
decoding decompresses every pixel and then resizes; ``Image.draft`` lets libjpeg decode
directly at 1/2, 1/4 or 1/8 scale (keeping the shorter side >= 224) before the same bicubic
resize and centre crop. Both run single-threaded on the same files (CPU seconds); then the
parallel ``prepare()`` is timed with threads and with processes (which one is faster here
decides the default executor). ratio = full-decode seconds / reduced-size-decode seconds.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _common import eyepacs_sample, load_average, machine, ratio_line, timed
from medxfer.prepare import RESIZES, center_crop, decode_record, default_workers, prepare

TARGET = 3.0  # the DCT-domain downscaling must pay for itself several times over on photographs


def full_decode(path: str, size: int) -> np.ndarray:
    """The baseline: decode every pixel, then the same bicubic resize and centre crop."""
    with Image.open(path) as img:
        img = img.convert("RGB")
    return np.asarray(center_crop(RESIZES.get("aspect")(img, size), size))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    args = ap.parse_args()
    print(machine())
    print(load_average())
    ds = eyepacs_sample()
    paths = [r.path for r in ds.records]
    sizes = [Image.open(p).size for p in paths]
    print(f"{len(paths)} EyePACS JPEGs, {min(sizes)} to {max(sizes)} pixels, crop {args.size}")
    full, t_full = timed(lambda: [full_decode(p, args.size) for p in paths])
    print(f"full decode + resize + crop (1 thread): {t_full}; {len(paths) / t_full.cpu:.1f} img per CPU s")
    ours, t_ours = timed(lambda: [decode_record(p, args.size, "aspect", 3) for p in paths])
    print(f"reduced-size decode + resize + crop (1 thread): {t_ours}; {len(paths) / t_ours.cpu:.1f} img per CPU s")
    diff = np.mean([np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() for a, b in zip(full, ours)])
    print(f"mean |difference| between the two crops: {diff:.2f} grey levels of 255")
    workers = default_workers()
    with tempfile.TemporaryDirectory() as tmp:
        for executor in ("thread", "process"):
            _, t = timed(lambda: prepare(ds, size=args.size, cache_dir=Path(tmp) / executor, workers=workers,
                                         executor=executor, progress=False))
            print(f"prepare() with {workers} {executor} workers (decode, resize, memmap, resume state): "
                  f"{t}; {len(paths) / t.wall:.1f} img/s wall")
        _, t = timed(lambda: prepare(ds, size=args.size, cache_dir=Path(tmp) / "thread", progress=False))
        print(f"prepare() again (cached): {t}")
    ratio = t_full.cpu / t_ours.cpu
    print(f"speed-up of reduced-size decoding: {ratio:.2f}x (CPU seconds)")
    print(load_average())
    print(f"target={TARGET}")
    print(ratio_line(ratio))


if __name__ == "__main__":
    main()
