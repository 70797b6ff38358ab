"""Toy inputs for tests and plugin authors: image datasets, prepared images, feature sets, a tiny model.

Everything is seeded and small, so a test of a protocol, an adapter or a plugin runs in
seconds without downloads. The golden regression tests pin numbers computed from
:func:`write_stripes_blobs`; do not change what it writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medxfer.data.records import Dataset, DatasetInfo, Record
from medxfer.features import FeatureSet
from medxfer.prepare import PreparedImages


def write_stripes_blobs(root: Path, n_per_class: int = 24, size: int = 48, seed: int = 0) -> Path:
    """An image folder of two classes of greyscale PNGs: sinusoidal stripes (``normal``) vs a
    central blob (``abnormal``), with noise; easy even for random convolutional features."""
    from medxfer.data.synthetic import SYNTHETIC_MARKER

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    root.mkdir(parents=True, exist_ok=True)
    (root / SYNTHETIC_MARKER).write_text("Toy images written by medxfer.testing.write_stripes_blobs: not real data.\n")
    for cls in ("normal", "abnormal"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            if cls == "normal":
                img = 127 + 100 * np.sin(xx / (2.0 + rng.random()))
            else:
                img = 60 + 150 * np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size * (2 + rng.random())))
            img = np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img, mode="L").save(root / cls / f"{cls}_{i:03d}.png")
    return root


def random_image_dataset(root: Path, n: int = 8, grey: bool = False, sizes: list[tuple[int, int]] | None = None,
                         fmt: str = "png", seed: int = 0, headline_metric: str = "auroc") -> Dataset:
    """``n`` random-noise images of varied shapes saved as files, labels alternating 0/1,
    every fourth image in test (a Dataset built directly, without an adapter)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        w, h = sizes[i] if sizes else (40 + 7 * i, 30 + 5 * (i % 3))
        shape = (h, w) if grey else (h, w, 3)
        path = root / f"img{i}.{fmt}"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
        recs.append(Record(path=str(path), label=i % 2, split="train" if i % 4 else "test"))
    info = DatasetInfo(name="toy", task="binary", class_names=("neg", "pos"), headline_metric=headline_metric)
    return Dataset(info=info, records=recs, root=str(root))


def half_bright_prepared(n: int = 60, size: int = 32, seed: int = 0, channels: int = 3,
                         splits: tuple[str, ...] = ("train", "val", "test")) -> PreparedImages:
    """Prepared images in memory: bright left half (class 0) vs bright right half (class 1),
    plus noise; half train, a quarter val, a quarter test."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    img = rng.integers(0, 90, size=(n, size, size, channels)).astype(np.uint8)
    half = size // 2
    img[labels == 0, :, :half] += 120
    img[labels == 1, :, half:] += 120
    names = [splits[0]] * (n // 2) + [splits[1 % len(splits)]] * (n // 4) + [splits[-1]] * (n - n // 2 - n // 4)
    records = [Record(path=f"<array>#{i}", label=int(labels[i]), split=names[i]) for i in range(n)]
    info = DatasetInfo(name="tiny", task="binary", class_names=("left", "right"))
    return PreparedImages(array=img, records=records, key=f"tiny{seed}", path=None, size=size, info=info)


def gaussian_features(n_per_class: int = 40, classes: int = 3, dim: int = 16, sep: float = 1.0,
                      seed: int = 0, **kwargs: Any) -> FeatureSet:
    """A feature set of Gaussian class clusters (centres ``sep`` apart on average)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = rng.normal(size=(classes, dim)) * sep
    x = centres[labels] + rng.normal(size=(len(labels), dim))
    return FeatureSet.from_arrays(x.astype(np.float32), labels, **kwargs)


def relu_blobs(n: int, d: int, k: int, seed: int = 0, sep: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Overlapping non-negative class clusters (like pooled post-ReLU features): (x, y)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(k, d)) * sep
    y = rng.integers(0, k, n)
    x = np.maximum(means[y] + rng.normal(size=(n, d)) + 1.0, 0.0)
    return x.astype(np.float32), y


def tiny_model(seed: int = 0) -> Any:
    """The registered 3-block test CNN (``test-tiny``, 32-d features) with seeded random weights."""
    from medxfer.models import load_model

    return load_model("test-tiny", weights="random", seed=seed)


def fake_result(model: str, dataset: str, value: float, ci95: float | None = None, *, protocol: str = "fewshot",
                seed: int = 0, random_weights: bool = True, episode_accuracies: list[float] | None = None,
                variant: dict[str, Any] | None = None, family: str = "supervised", modality: str = "fundus",
                in_domain: bool = False, metric: str = "accuracy") -> Any:
    """A fabricated :class:`~medxfer.results.Result` (for report and statistics tests)."""
    from medxfer.protocols.base import Headline
    from medxfer.results import SCHEMA, DatasetFacts, ModelFacts, Result, library_versions

    details: dict[str, Any] = {}
    if episode_accuracies is not None:
        details = {"episode_accuracies": list(episode_accuracies), "episodes_sha256": "fabricated"}
    metrics = {metric: value, **({"ci95": ci95} if ci95 is not None else {})}
    return Result(
        model=model, dataset=dataset, protocol=protocol, protocol_version="1", seed=seed,
        run_key=f"fake-{model}-{dataset}-{protocol}-{seed}", cell_id=f"{model}__{dataset}__{protocol}__seed{seed}",
        variant=dict(variant or {}), headline=Headline(metric, value, ci95, True), metrics=metrics, params={},
        details=details, warnings=[], artifacts=[], inputs={},
        model_info=ModelFacts(name=model, display_name=model, arch="resnet50", family=family, imagenet_top1=None,
                              normalization="imagenet",
                              weights="random init (seed 0)" if random_weights else f"pretrained ({model})",
                              weights_hash="0" * 16, fingerprint="0" * 16, random_weights=random_weights,
                              feature_dim=2048, licence="n/a"),
        dataset_info=DatasetFacts(label=dataset, name=dataset, display_name=dataset, kind=dataset, root="/fake",
                                  modality=modality, in_domain=in_domain, class_names=["a", "b"], counts={},
                                  images=0, headline_metric=metric, fingerprint="0" * 16),
        timings={}, versions=library_versions(), git_revision=None, device="cpu", created="2026-01-01T00:00:00+00:00",
        spec={}, schema=SCHEMA)


__all__ = ["fake_result", "gaussian_features", "half_bright_prepared", "random_image_dataset", "relu_blobs", "tiny_model",
           "write_stripes_blobs"]
