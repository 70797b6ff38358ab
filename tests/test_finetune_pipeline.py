"""`medxfer run --protocols linear,finetune` end to end on synthetic and real sample data."""
from __future__ import annotations

import json
from pathlib import Path

from medxfer.cli import main

FAST = ["--set", "finetune.max_steps=6", "--set", "finetune.val_every=3", "--set", "finetune.batch_size=8",
        "--set", "finetune.image_size=48", "--image-size", "48"]


def _run(dataset: str, out: Path, extra: list[str] = ()) -> list[dict]:
    rc = main(["run", "--quiet", "--models", "test-tiny", "--weights", "random", "--dataset", dataset,
               "--protocols", "linear,finetune", "--out", str(out), *FAST, *extra])
    assert rc == 0
    results = [json.loads(p.read_text()) for p in sorted((out / "results").glob("*.json"))]
    assert {r["protocol"] for r in results} == {"linear", "finetune"}
    for r in results:
        assert 0.0 <= r["metrics"]["accuracy"] <= 100.0
        assert r["metrics"]["headline"] == r["metrics"][r["details"]["headline_metric"]] == r["headline"]["value"]
    return results


def test_run_linear_and_finetune_on_synthetic_layout(tmp_path: Path) -> None:
    from medxfer.data.synthetic import write_synthetic

    root = write_synthetic("shenzhen", tmp_path / "data" / "shenzhen", n_per_class=16, size=48, seed=0)
    results = _run(f"shenzhen={root}", tmp_path / "out")
    lin = next(r for r in results if r["protocol"] == "linear")
    assert len(lin["details"]["val_curve"]) == 45 and lin["metrics"]["C"] in lin["details"]["grid_C"]
    # the finetune work folder holds the finished run, listed as the result's artifact
    assert any((tmp_path / "out" / "work").rglob("final.pt"))
    ft = next(r for r in results if r["protocol"] == "finetune")
    assert [a["path"] for a in ft["artifacts"]] == [f"work/{ft['cell_id']}/final.pt"]
    assert ft["artifacts"][0]["size"] == (tmp_path / "out" / ft["artifacts"][0]["path"]).stat().st_size


def test_run_linear_and_finetune_on_real_samples(shared_data: Path, tmp_path: Path) -> None:
    results = _run(f"eyepacs={shared_data / 'eyepacs-sample'}", tmp_path / "out", ["--skip-bad"])
    assert all(r["details"]["headline_metric"] == "mean_per_class_accuracy" for r in results)
