"""Synthetic datasets: determinism, every official name, and class structure that random
CNN features can see (so few-shot results on synthetic data are meaningful)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medxfer.data import load_dataset
from medxfer.data.images import open_image
from medxfer.data.synthetic import WRITERS, write_synthetic
from medxfer.data.synthetic_images import synthetic_image
from medxfer.testing import write_stripes_blobs

OFFICIAL = ["bach", "chestx-ray14", "chexpert", "eyepacs", "ichallenge-amd", "ichallenge-pm", "montgomery",
            "shenzhen"]


def test_every_official_dataset_has_a_writer() -> None:
    assert sorted(WRITERS.names()) == OFFICIAL


def test_generation_is_deterministic_and_seeded() -> None:
    a = synthetic_image(np.random.default_rng(3), 1, 4, 48, "histology")
    b = synthetic_image(np.random.default_rng(3), 1, 4, 48, "histology")
    c = synthetic_image(np.random.default_rng(4), 1, 4, 48, "histology")
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert synthetic_image(np.random.default_rng(0), 0, 2, 40, "chest-xray").shape == (40, 40)


def test_written_files_identical_for_same_seed(tmp_path: Path) -> None:
    p1 = write_synthetic("shenzhen", tmp_path / "a", n_per_class=4, size=24, seed=7)
    p2 = write_synthetic("shenzhen", tmp_path / "b", n_per_class=4, size=24, seed=7)
    files = sorted(q.relative_to(p1) for q in p1.rglob("*") if q.is_file())
    assert files == sorted(q.relative_to(p2) for q in p2.rglob("*") if q.is_file())
    assert all((p1 / f).read_bytes() == (p2 / f).read_bytes() for f in files)
    with pytest.raises(ValueError, match="at least 4"):
        write_synthetic("shenzhen", tmp_path / "c", n_per_class=2)


def _features(paths: list[str]) -> np.ndarray:
    from medxfer.models import load_model

    model = load_model("test-tiny", weights="random")
    imgs = []
    for p in paths:
        a = np.asarray(open_image(p).convert("RGB").resize((48, 48)))
        imgs.append(a)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        return model.features(x).float().numpy()


def _loo_nearest_centroid(f: np.ndarray, y: np.ndarray) -> float:
    hits = []
    for i in range(len(y)):
        keep = np.arange(len(y)) != i
        cents = np.stack([f[keep & (y == k)].mean(0) for k in np.unique(y)])
        hits.append(np.unique(y)[np.argmin(((cents - f[i]) ** 2).sum(1))] == y[i])
    return float(np.mean(hits))


@pytest.mark.parametrize("name,chance", [("shenzhen", 0.5), ("bach", 0.25)])
def test_random_cnn_features_separate_synthetic_classes(tmp_path: Path, name: str, chance: float) -> None:
    root = write_synthetic(name, tmp_path / name, n_per_class=10, size=48, seed=0)
    ds = load_dataset(name, root)
    y = np.array(ds.labels)
    acc = _loo_nearest_centroid(_features([r.path for r in ds.records]), y)
    assert acc >= chance + 0.3, f"nearest-centroid accuracy {acc:.2f} on random features (chance {chance})"


def test_synthetic_data_says_so_in_its_info_results_and_summary(tmp_path: Path) -> None:
    from medxfer.config import DatasetArg, RunSpec
    from medxfer.data import load_dataset
    from medxfer.pipeline import run

    root = write_synthetic("shenzhen", tmp_path / "shenzhen", n_per_class=12, size=48)
    assert load_dataset("shenzhen", root).info.synthetic
    outcome = run(RunSpec(models=("test-tiny",), datasets=(DatasetArg("shenzhen", "shenzhen", str(root)),),
                          weights="random", image_size=32, out=str(tmp_path / "out"),
                          protocol_params={"fewshot": {"n_shot": 4, "n_query": 4, "episodes": 10}}), progress=False)
    assert outcome.results[0].dataset_info.synthetic is True
    assert "SYNTHETIC DATA" in outcome.summary
    real = write_stripes_blobs(tmp_path / "real", n_per_class=4, size=32)
    assert load_dataset("folder", real).info.synthetic  # the toy sets say so too
    (real / "MEDXFER_SYNTHETIC.txt").unlink()
    assert not load_dataset("folder", real).info.synthetic


def test_signal_controls_how_separable_the_classes_are(tmp_path: Path) -> None:
    """The demo's synthetic classes overlap (signal < 1): harder than the test sets, not at ceiling."""
    import medxfer

    model = medxfer.load_model("test-tiny", weights="random")
    acc = {}
    for signal in (1.0, 0.3):
        root = write_synthetic("ichallenge-amd", tmp_path / str(signal), n_per_class=30, size=64, signal=signal)
        feats = medxfer.extract_features(model, medxfer.load_dataset("ichallenge-amd", root), size=64)
        acc[signal] = medxfer.evaluate("fewshot", feats, n_shot=10, n_query=10, episodes=200).headline.value
    assert acc[1.0] > acc[0.3] + 10
    with pytest.raises(ValueError, match="signal"):
        write_synthetic("bach", tmp_path / "x", signal=0.0)
