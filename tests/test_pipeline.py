"""End to end: datasets -> prepare -> extract -> few-shot -> result JSONs -> summary, via API and CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import medxfer
from medxfer.cli import main
from medxfer.config import DatasetArg, RunSpec
from medxfer.pipeline import run


def _write_folder(root: Path, n_per_class: int = 24, size: int = 48) -> Path:
    """Two classes with different structure (stripes vs blobs), greyscale PNGs."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
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


def _spec(tmp_path: Path, data: Path, **kw) -> RunSpec:
    base = dict(models=("test-tiny",), datasets=(DatasetArg.parse(f"toy=folder:{data}"),), protocols=("fewshot",),
                weights="random", out=str(tmp_path / "out"), image_size=32,
                protocol_params={"fewshot": {"n_shot": 5, "n_query": 5, "episodes": 50}})
    base.update(kw)
    return RunSpec(**base)


def test_run_writes_results_and_resumes(tmp_path):
    data = _write_folder(tmp_path / "data")
    spec = _spec(tmp_path, data)
    first = run(spec, progress=False)
    assert len(first.computed) == 1 and not first.reused
    result_file = Path(spec.out) / "results" / "test-tiny__toy__fewshot__seed0.json"
    r = json.loads(result_file.read_text())
    for key in ("model", "dataset", "protocol", "run_key", "metrics", "spec", "episode_accuracies", "seed",
                "timings", "versions", "git_revision", "device"):
        assert key in r, key
    assert r["metrics"]["episodes"] == 50 and len(r["episode_accuracies"]) == 50
    assert r["model_info"]["random_weights"] is True
    assert r["metrics"]["accuracy"] > 70  # stripes vs blobs are easy even for random features
    assert (Path(spec.out) / "summary.md").read_text().count("test-tiny") >= 1
    # same spec: reused, not recomputed
    again = run(spec, progress=False)
    assert not again.computed and len(again.reused) == 1
    assert again.results[0]["metrics"] == r["metrics"]
    # a changed protocol parameter changes the run key and recomputes
    changed = run(_spec(tmp_path, data, protocol_params={"fewshot": {"n_shot": 4, "n_query": 5, "episodes": 50}}),
                  progress=False)
    assert len(changed.computed) == 1
    assert json.loads(result_file.read_text())["run_key"] != r["run_key"]


def test_replaced_image_invalidates_the_cell(tmp_path):
    data = _write_folder(tmp_path / "data")
    spec = _spec(tmp_path, data)
    first = run(spec, progress=False)
    img = data / "normal" / "normal_000.png"
    Image.fromarray(np.zeros((48, 48), np.uint8), mode="L").save(img)
    second = run(spec, progress=False)
    assert len(second.computed) == 1
    assert second.results[0]["run_key"] != first.results[0]["run_key"]


def test_api_mirrors_the_cli(tmp_path):
    data = _write_folder(tmp_path / "data")
    ds = medxfer.load_dataset("folder", data)
    model = medxfer.load_model("test-tiny", weights="random")
    feats = medxfer.extract_features(model, ds, size=32)
    assert feats.features.shape == (48, 32) and feats.features.dtype == np.float32
    assert len(feats.labels) == 48 and len(feats.records) == 48
    res = medxfer.evaluate("fewshot", feats, n_way=2, n_shot=5, n_query=5, episodes=40, seed=1)
    assert set(res.metrics) >= {"accuracy", "ci95"} and len(res.details["episode_accuracies"]) == 40
    # the same model gives the same numbers; same seed, same episodes
    again = medxfer.evaluate("fewshot", medxfer.extract_features(model, ds, size=32), n_way=2, n_shot=5,
                             n_query=5, episodes=40, seed=1)
    assert again.metrics == res.metrics


def test_random_weights_are_deterministic_and_labelled():
    a = medxfer.load_model("test-tiny", weights="random")
    b = medxfer.load_model("test-tiny", weights="random")
    c = medxfer.load_model("test-tiny", weights="random", seed=1)
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert a.weights.startswith("random") and a.is_random
    assert not a.training


def test_cli_run_validate_ls(tmp_path, capsys):
    data = _write_folder(tmp_path / "data")
    out = tmp_path / "cli-out"
    rc = main(["run", "--quiet", "--models", "test-tiny", "--dataset", f"toy=folder:{data}", "--protocols",
               "fewshot", "--weights", "random", "--image-size", "32", "--set", "fewshot.n_shot=5",
               "--set", "fewshot.n_query=5", "--set", "fewshot.episodes=30", "--out", str(out)])
    assert rc == 0
    assert "test-tiny" in capsys.readouterr().out
    assert (out / "results" / "test-tiny__toy__fewshot__seed0.json").is_file()
    rc = main(["validate", f"toy=folder:{data}", "--json"])
    v = json.loads(capsys.readouterr().out)
    assert rc == 0 and v["total"] == 48 and v["pairs"] is None
    assert sum(sum(c.values()) for c in v["counts"].values()) == 48
    for what in ("models", "datasets", "protocols"):
        assert main(["ls", what, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)
    assert main(["report", str(out)]) == 0
    assert (out / "results.csv").is_file() and (out / "table_fewshot.tex").is_file()


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["run", "--models", "test-tiny", "--dataset", "shenzen=/nowhere", "--weights", "random",
                 "--out", str(tmp_path)]) == 2
    assert "Did you mean 'shenzhen'" in capsys.readouterr().err
    assert main(["run", "--models", "resnet-51", "--dataset", f"x=folder:{tmp_path}", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["validate", f"x=folder:{tmp_path / 'missing'}"]) != 0


def test_too_small_class_is_reported_not_a_crash(tmp_path, capsys):
    data = _write_folder(tmp_path / "data", n_per_class=8)
    rc = main(["run", "--quiet", "--models", "test-tiny", "--dataset", f"toy=folder:{data}", "--weights", "random",
               "--image-size", "32", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "need 35 images per class" in capsys.readouterr().err


def test_real_ichallenge_pm_sample_end_to_end(shared_data, tmp_path):
    root = shared_data / "ichallenge-pm"
    out = tmp_path / "pm"
    rc = main(["run", "--quiet", "--models", "test-tiny", "--dataset", f"ichallenge-pm={root}", "--weights",
               "random", "--set", "fewshot.episodes=100", "--out", str(out)])
    assert rc == 0
    r = json.loads((out / "results" / "test-tiny__ichallenge-pm__fewshot__seed0.json").read_text())
    assert r["params"]["n_way"] == 2 and r["params"]["n_shot"] == 20
    assert 0 <= r["metrics"]["accuracy"] <= 100 and r["dataset_info"]["images"] >= 400


def test_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "medxfer", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "validate" in proc.stdout and "run" in proc.stdout


def test_cli_run_with_a_custom_checkpoint(tmp_path, capsys):
    import torch
    import torchvision

    data = _write_folder(tmp_path / "data", n_per_class=12)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        net = torchvision.models.resnet18(weights=None)
    ckpt = tmp_path / "mine.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, ckpt)
    out = tmp_path / "o"
    rc = main(["run", "--quiet", "--models", f"mine=resnet18:{ckpt}:module.", "--dataset", f"toy=folder:{data}",
               "--image-size", "32", "--set", "fewshot.n_shot=3", "--set", "fewshot.n_query=3",
               "--set", "fewshot.episodes=20", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "results" / "mine__toy__fewshot__seed0.json").read_text())
    assert r["model_info"]["random_weights"] is False and r["model_info"]["arch"] == "resnet18"
    loaded = medxfer.load_model("mine")
    for k, v in net.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(loaded.state_dict()[k], v), k
