"""Shared helpers for the benchmark scripts: machine description, datasets, timing.

Every benchmark runs ours and a baseline in the same process, prints human-readable lines
and ends with ``ratio=<float>``. Models use random weights (no network): throughput does not
depend on the weight values, and every figure says so.
"""
from __future__ import annotations

import csv
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from medxfer.data.records import Dataset, DatasetInfo, Record  # noqa: E402


def shared_data_dir() -> Path:
    env = os.environ.get("MEDXFER_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, cores, torch, threads, device."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu only"
    return (f"machine: {cpu_model()}, {cores} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads, device: {dev}, python {platform.python_version()}")


def load_average() -> str:
    try:
        return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average n/a"


def cpu_seconds() -> float:
    """CPU seconds used so far by this process and its reaped children (DataLoader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


@dataclass
class Timing:
    """Wall-clock and CPU seconds of one measured call."""

    wall: float
    cpu: float

    def pick(self, use_cpu: bool) -> float:
        return self.cpu if use_cpu else self.wall

    def __str__(self) -> str:
        return f"wall {self.wall:.2f}s, cpu {self.cpu:.2f}s"


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    c0, t0 = cpu_seconds(), time.perf_counter()
    out = fn()
    return out, Timing(time.perf_counter() - t0, cpu_seconds() - c0)


def eyepacs_sample(limit: int | None = None) -> Dataset:
    """The real EyePACS sample (full-size JPEGs) as a Dataset, labels from trainLabels.csv."""
    root = shared_data_dir() / "eyepacs-sample"
    files = sorted((root / "sample").glob("*.jpeg"))
    if not files:
        raise SystemExit(f"EyePACS sample not found under {root}")
    with open(root / "trainLabels.csv", newline="") as f:
        levels = {row["image"]: int(row["level"]) for row in csv.DictReader(f)}
    files = files[:limit] if limit else files
    recs = [Record(path=str(p), label=levels[p.stem]) for p in files]
    info = DatasetInfo(name="eyepacs-sample", task="multiclass", class_names=("0", "1", "2", "3", "4"),
                       headline_metric="mean_per_class_accuracy")
    return Dataset(info=info, records=recs, root=str(root))


def synthetic_xrays(folder: Path, n: int, side: int = 1024, seed: int = 0, signal: float = 0.25) -> Dataset:
    """Greyscale chest-X-ray-like PNGs (smooth anatomy-like structure plus noise), 2 classes.

    Odd images carry a bright basal "effusion" of amplitude ``signal``; exposure varies per image.
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    recs = []
    for i in range(n):
        img = 0.55 + 0.25 * np.cos(np.pi * (xx - 0.5)) * np.cos(np.pi * (yy - 0.45))
        for cx in (0.32, 0.68):  # two darker lung fields
            img -= 0.3 * np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.48) / 0.25) ** 2))
        img += 0.05 * np.sin(2 * np.pi * (yy * rng.uniform(8, 12) + 0.2 * np.abs(xx - 0.5)))  # ribs
        img += rng.normal(0, 0.03, img.shape).astype(np.float32)
        if i % 2:  # "effusion": a bright basal opacity
            img += signal * np.exp(-(((xx - 0.7) / 0.15) ** 2 + ((yy - 0.8) / 0.08) ** 2))
        img = img * rng.uniform(0.95, 1.05) + rng.uniform(-0.03, 0.03)  # exposure
        path = folder / f"cxr{i:04d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), mode="L").save(path)
        recs.append(Record(path=str(path), label=i % 2))
    info = DatasetInfo(name="synthetic-cxr", task="binary", class_names=("normal", "effusion"),
                       modality="chest-xray", in_domain=True)
    return Dataset(info=info, records=recs, root=str(folder))


def bf16_supported() -> bool:
    """Whether bf16 autocast runs natively here (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def ratio_line(value: float) -> str:
    return f"ratio={value:.3f}"



class LogregCertificate:
    """The linear probe's convergence certificate ``rel``, recomputed independently (float64
    numpy) from its definition in :mod:`medxfer.protocols.logreg`, for any solver's solutions
    on one training set ``x`` (N x D), ``y`` (N, labels < ``k``)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, k: int) -> None:
        self.x = np.asarray(x, dtype=np.float64)
        self.xc = self.x - self.x.mean(0)
        self.fro = float(np.linalg.norm(self.xc))
        self.onehot = np.eye(k)[np.asarray(y)]

    def __call__(self, coef: np.ndarray, intercept: np.ndarray, lambdas: np.ndarray) -> np.ndarray:
        """``rel`` per model for coef M x D x K, intercept M x K (multinomial coefficients)."""
        n, (m, d, k) = len(self.x), coef.shape
        z = (self.x @ coef.transpose(1, 0, 2).reshape(d, m * k)).reshape(n, m, k) + intercept[None]
        z -= z.max(2, keepdims=True)
        p = np.exp(z)
        p /= p.sum(2, keepdims=True)
        r = (p - self.onehot[:, None, :]) / n  # N x M x K
        mu = (np.asarray(lambdas, dtype=np.float64) / n)[:, None, None]
        g_w = (self.xc.T @ r.reshape(n, m * k)).reshape(d, m, k).transpose(1, 0, 2) + mu * coef
        r_k = np.sqrt((r ** 2).sum(0))  # M x K
        scale = self.fro * np.linalg.norm(r_k, axis=1) + mu[:, 0, 0] * np.linalg.norm(coef, axis=(1, 2))
        rel_w = np.linalg.norm(g_w, axis=(1, 2)) / scale
        rel_b = np.max(np.abs(r.sum(0)) / (np.sqrt(n) * r_k), axis=1)
        return np.maximum(rel_w, rel_b)
