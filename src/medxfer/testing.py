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
                in_domain: bool = False, metric: str = "accuracy", metrics: dict[str, float] | None = None,
                higher_is_better: bool = True, params: dict[str, Any] | None = None,
                details: dict[str, Any] | None = None, artifacts: list[Any] | None = None,
                display_name: str | None = None, dataset_name: str | None = None,
                dataset_display_name: str | None = None, imagenet_top1: float | None = None,
                synthetic: bool = False, counts: dict[str, dict[str, int]] | None = None,
                class_names: list[str] | None = None, warnings: list[str] | None = None,
                episodes_sha256: str = "fabricated", inputs: dict[str, dict[str, Any]] | None = None,
                spec: dict[str, Any] | None = None) -> Any:
    """A fabricated :class:`~medxfer.results.Result` (for report and statistics tests).

    ``metrics`` are added to ``{metric: value, "ci95": ci95}``; ``details`` to the episode
    fields; ``artifacts`` are paths relative to the run folder (size 0, a zero hash) or
    :class:`~medxfer.results.ArtifactRecord` objects. ``dataset_name`` is the registered name
    (default: the label ``dataset``).
    """
    from medxfer.protocols.base import Headline
    from medxfer.results import SCHEMA, ArtifactRecord, DatasetFacts, ModelFacts, Result, library_versions

    det: dict[str, Any] = {}
    if episode_accuracies is not None:
        det = {"episode_accuracies": list(episode_accuracies), "episodes_sha256": episodes_sha256}
    det.update(details or {})
    all_metrics = {metric: value, **({"ci95": ci95} if ci95 is not None else {}), **(metrics or {})}
    arts = [a if isinstance(a, ArtifactRecord) else ArtifactRecord(str(a), 0, "0" * 64) for a in artifacts or []]
    counts = dict(counts or {})
    classes = list(class_names or (list(next(iter(counts.values()))) if counts else ["a", "b"]))
    return Result(
        model=model, dataset=dataset, protocol=protocol, protocol_version="1", seed=seed,
        run_key=f"fake-{model}-{dataset}-{protocol}-{seed}", cell_id=f"{model}__{dataset}__{protocol}__seed{seed}",
        variant=dict(variant or {}), headline=Headline(metric, value, ci95, higher_is_better), metrics=all_metrics,
        params=dict(params or {}), details=det, warnings=list(warnings or []), artifacts=arts,
        inputs=dict(inputs or {}),
        model_info=ModelFacts(name=model, display_name=display_name or model, arch="resnet50", family=family,
                              imagenet_top1=imagenet_top1, normalization="imagenet",
                              weights="random init (seed 0)" if random_weights else f"pretrained ({model})",
                              weights_hash="0" * 16, fingerprint="0" * 16, random_weights=random_weights,
                              feature_dim=2048, licence="n/a"),
        dataset_info=DatasetFacts(label=dataset, name=dataset_name or dataset,
                                  display_name=dataset_display_name or dataset, kind=dataset_name or dataset,
                                  root="/fake", modality=modality, in_domain=in_domain, class_names=classes,
                                  counts=counts, images=sum(sum(c.values()) for c in counts.values()),
                                  headline_metric=metric, fingerprint="0" * 16, synthetic=synthetic),
        timings={}, versions=library_versions(), git_revision=None, device="cpu", created="2026-01-01T00:00:00+00:00",
        spec=dict(spec or {}), schema=SCHEMA)


DIFFUSION_METRIC = "attentive_diffusion"
#: Sizes (total images per class) used by :func:`write_fake_paper_run`: roughly the real datasets'.
_FAKE_CLASS_SIZES = {"chexpert": 5000, "chestx-ray14": 2000, "shenzhen": 331, "montgomery": 69, "bach": 100,
                     "eyepacs": 2000, "ichallenge-amd": 200, "ichallenge-pm": 200}


def _fake_png(path: Path, rng: np.random.Generator, size: int = 48) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    cx, cy = rng.uniform(0.3, 0.7, 2) * size
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (size / 6) ** 2))
    img = np.stack([255 * blob, 80 + 100 * (1 - blob), 200 * (1 - blob)], axis=-1)
    Image.fromarray(np.clip(img + rng.normal(0, 4, img.shape), 0, 255).astype(np.uint8)).save(path)


def write_fake_paper_run(out: Path, *, models: list[str] | None = None, datasets: list[str] | None = None,
                         analyses: bool = True, episodes: int = 600, seed: int = 0) -> Path:
    """A run folder of fabricated ``medxfer.result/2`` JSONs for the paper's grid (13 models x 8
    datasets by default): few-shot (per-episode accuracies on shared episodes), linear and
    finetune, and with ``analyses`` saliency (with PNG overlays), invariance, reconstruction
    (with PNG reconstructions) and transferability. The numbers are made up (a model skill plus
    noise): for report tests and timings only."""
    from medxfer.data import DATASETS
    from medxfer.models import MODELS
    from medxfer.presets import load_preset
    from medxfer.results import DatasetFacts, ModelFacts, write_result

    rng = np.random.default_rng(seed)
    preset = load_preset("paper")
    models = models or list(preset["models"])
    datasets = datasets or [str(d).partition("=")[0] for d in preset["datasets"]]
    out = Path(out)
    (out / "results").mkdir(parents=True, exist_ok=True)
    skill = {m: rng.normal(0, 3) for m in models}
    for d in datasets:
        info = DATASETS.get(d).info
        k = info.num_classes
        per_class = _FAKE_CLASS_SIZES.get(d, 100)
        counts = {"train": {c: int(per_class * 0.8) for c in info.class_names},
                  "test": {c: per_class - int(per_class * 0.8) for c in info.class_names}}
        base = rng.uniform(55, 85)
        way = info.fewshot_way
        steps = way * 15
        n_train = sum(counts["train"].values())
        pool = min(info.fewshot_pool, n_train) if info.fewshot_pool else per_class * k
        best_eps = np.clip(rng.normal(base / 100, 0.08, episodes), 0, 1)
        for m in models:
            spec = MODELS.get(m)
            facts = ModelFacts(name=m, display_name=spec.label, arch=spec.arch, family=spec.family,
                               imagenet_top1=spec.imagenet_top1, normalization=spec.normalization,
                               weights=f"pretrained ({m}, fabricated)", weights_hash="0" * 16,
                               fingerprint="0" * 16, random_weights=False, feature_dim=spec.feature_dim,
                               licence=spec.licence, in_paper=spec.in_paper)
            dfacts = DatasetFacts(label=d, name=d, display_name=info.label, kind=d, root=f"/fake/{d}",
                                  modality=info.modality, in_domain=info.in_domain, class_names=list(info.class_names),
                                  counts=counts, images=per_class * k, headline_metric=info.headline_metric,
                                  fingerprint="0" * 16)
            eps = np.clip(np.round((best_eps + skill[m] / 100 + rng.normal(0, 0.05, episodes)) * steps) / steps, 0, 1)
            acc, half = 100 * eps.mean(), 100 * 1.96 * eps.std() / np.sqrt(episodes)
            lin = float(np.clip(base + 8 + skill[m] + rng.normal(0, 2), 0, 100))
            ft = float(np.clip(lin + 4 + rng.normal(0, 2), 0, 100))
            test_n = sum(counts["test"].values())
            cells: list[tuple[str, dict[str, Any]]] = [
                ("fewshot", dict(value=float(acc), ci95=float(half), episode_accuracies=eps.tolist(),
                                 params={"n_way": way, "n_shot": 20, "n_query": 15, "episodes": episodes,
                                         "pool_size": info.fewshot_pool, "small_classes": "error"},
                                 details={"pool_images": pool, "episode_seed": 0},
                                 episodes_sha256=f"episodes-{d}")),
                ("linear", dict(value=lin, ci95=float(rng.uniform(1, 3)), metrics={"auroc": min(100.0, lin + 5),
                                "test_n": test_n, "C": 1.0}, details={"c_at_grid_edge": bool(rng.random() < 0.1)})),
                ("finetune", dict(value=ft, ci95=float(rng.uniform(1, 3)), metrics={"auroc": min(100.0, ft + 4),
                                  "test_n": test_n})),
            ]
            if analyses:
                diff = float(rng.uniform(35, 60))
                cell = f"{m}__{d}__saliency__seed0"
                _fake_png(out / "artifacts" / cell / "overlay_0.png", rng)
                cells.append(("saliency", dict(value=diff, ci95=float(rng.uniform(0.5, 2)), metric=DIFFUSION_METRIC,
                                               artifacts=[f"artifacts/{cell}/overlay_0.png"])))
                inv = {"rotation": float(rng.uniform(0.2, 0.9)), "hflip": float(rng.uniform(0.5, 0.99)),
                       "hue": float(rng.uniform(0.3, 0.95))}
                if d in ("chexpert", "eyepacs"):
                    inv["multiview"] = float(rng.uniform(0.1, 0.6))
                cells.append(("invariance", dict(value=float(np.mean(list(inv.values()))), metric="mean_invariance",
                                                 metrics=inv)))
                lp = {f"lpips_{n}": float(rng.uniform(0.2, 0.7)) for n in ("alex", "squeeze", "vgg")}
                lp["lpips_mean"] = float(np.mean(list(lp.values())))
                cell = f"{m}__{d}__reconstruction__seed0"
                _fake_png(out / "artifacts" / cell / "reconstruction_0.png", rng)
                cells.append(("reconstruction", dict(value=lp["lpips_mean"], metric="lpips_mean", metrics=lp,
                                                     higher_is_better=False,
                                                     artifacts=[f"artifacts/{cell}/reconstruction_0.png"])))
                cells.append(("transferability", dict(value=float(lin / 20 + rng.normal(0, 0.5)), metric="logme",
                                                      metrics={"hscore": float(lin / 10 + rng.normal(0, 1))})))
            for proto, kw in cells:
                metric = kw.pop("metric", info.headline_metric if proto in ("linear", "finetune") else "accuracy")
                r = fake_result(m, d, kw.pop("value"), kw.pop("ci95", None), protocol=proto, metric=metric,
                                random_weights=False, **kw)
                r.model_info = facts
                r.dataset_info = dfacts
                write_result(out / "results" / f"{r.cell_id}.json", r)
    return out



__all__ = ["fake_result", "gaussian_features", "half_bright_prepared", "random_image_dataset", "relu_blobs", "tiny_model",
           "write_fake_paper_run", "write_stripes_blobs"]
