"""Every synthetic official layout goes through prepare -> extract -> few-shot, and random
CNN features do clearly better than chance on it (the synthetic classes are learnable)."""
from __future__ import annotations

from pathlib import Path

import pytest

from medxfer.api import evaluate, extract_features
from medxfer.data import load_dataset, write_synthetic
from medxfer.models import load_model

OFFICIAL = ["bach", "chestx-ray14", "chexpert", "eyepacs", "ichallenge-amd", "ichallenge-pm", "montgomery",
            "shenzhen"]


@pytest.mark.parametrize("name", OFFICIAL)
def test_fewshot_on_synthetic_layout(tmp_path: Path, name: str) -> None:
    root = write_synthetic(name, tmp_path / "data", n_per_class=8, size=40, seed=0)
    ds = load_dataset(name, root)
    model = load_model("test-tiny", weights="random")
    feats = extract_features(model, ds, cache_dir=tmp_path / "cache", size=32, progress=False)
    way = ds.info.fewshot_way
    result = evaluate("fewshot", feats, seed=0, n_way=way, n_shot=3, n_query=3, episodes=60, pool_size=None)
    chance = 100.0 / way
    assert result.metrics["accuracy"] > chance + 15, (name, result.metrics)
