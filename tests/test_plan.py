"""``--plan``: grid, images to prepare, features to extract, cache state, probe estimate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medxfer.config import DatasetArg, RunSpec
from medxfer.data import load_dataset
from medxfer.extract import extract_features
from medxfer.models import load_model
from medxfer.plan import make_plan
from medxfer.prepare import prepare


def image_folder(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for cls in ("benign", "malignant"):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def spec_for(tmp_path: Path, **changes) -> RunSpec:
    root = image_folder(tmp_path / "mine")
    base = dict(models=("test-tiny",), datasets=(DatasetArg.parse(f"mine=folder:{root}"),),
                protocols=("fewshot", "linear"), seeds=(0, 1), weights="random", cache_dir=str(tmp_path / "cache"),
                image_size=32, out=str(tmp_path / "out"))
    base.update(changes)
    return RunSpec(**base)


def describe_plan(spec: RunSpec, probe: bool = True) -> str:
    return make_plan(spec, probe=probe).text


def test_plan_lists_grid_work_and_estimate(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    plan = make_plan(spec)
    assert plan.runnable
    text = plan.text
    assert "1 model(s) x 1 dataset(s) x 2 protocol(s) x 2 seed(s) = 4 cell(s)" in text
    assert "mine: 6 images" in text and "6 of 6 images to prepare" in text
    assert "on mine: 6 of 6 images to extract" in text
    assert "images/s measured on cpu" in text and "estimated time: prepare" in text


def test_plan_sees_the_caches(tmp_path: Path) -> None:
    spec = spec_for(tmp_path)
    arg = spec.datasets[0]
    ds = load_dataset(arg.kind, arg.root, **arg.options)
    prepared = prepare(ds, size=32, cache_dir=spec.cache_dir, progress=False)
    text = describe_plan(spec, probe=False)
    assert "prepared (cached)" in text and "6 of 6 images to extract" in text
    extract_features(load_model("test-tiny", weights="random"), prepared, cache_dir=spec.cache_dir, progress=False)
    text = describe_plan(spec, probe=False)
    assert "on mine: features cached" in text and "estimated time" not in text
    # another precision is another feature cache
    assert "6 of 6 images to extract" in describe_plan(spec.with_(precision="bf16"), probe=False)


def test_plan_reports_unavailable_weights_and_bad_datasets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDXFER_OFFLINE", "1")
    spec = spec_for(tmp_path, models=("supervised-r18",), weights="pretrained",
                    datasets=(DatasetArg.parse(f"gone=folder:{tmp_path / 'missing'}"),), image_size=32)
    plan = make_plan(spec, probe=False)
    assert "weights not cached and cannot be downloaded here" in plan.text
    assert "gone: CANNOT LOAD: dataset root not found" in plan.text
    assert not plan.runnable and "nothing in this plan can run" in plan.text


def test_plan_never_downloads_and_exits_non_zero_when_nothing_can_run(tmp_path: Path, capsys) -> None:
    from medxfer.cli import main

    # online but uncached: the plan says it would download, and does not (nothing appears in the cache)
    spec = spec_for(tmp_path, models=("supervised-r18",), weights="pretrained")
    plan = make_plan(spec, probe=False)
    assert "the run would download them from https://download.pytorch.org" in plan.text and plan.runnable
    assert not list((tmp_path / "cache").rglob("*.pth")) and not (tmp_path / "cache" / "downloads").exists()
    rc = main(["run", "--plan", "--models", "test-tiny", "--weights", "random", "--dataset",
               f"gone=folder:{tmp_path / 'nowhere'}", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert rc == 1 and "dataset root not found" in out and not (tmp_path / "o").exists()


def test_plan_shows_cells_that_would_fail_their_label_checks(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, protocols=("fewshot",), seeds=(0,))  # 3 images per class, 35 needed
    plan = make_plan(spec, probe=False)
    assert not plan.runnable and "need 35 images per class" in plan.text
