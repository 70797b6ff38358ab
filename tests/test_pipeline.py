"""End to end: datasets -> prepare -> extract -> protocols -> typed results -> summary, via API and CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import medxfer
from medxfer.cli import main
from medxfer.config import DatasetArg, RunSpec
from medxfer.pipeline import run
from medxfer.testing import write_stripes_blobs

REPO = Path(__file__).resolve().parents[1]
FAST = {"fewshot": {"n_shot": 5, "n_query": 5, "episodes": 50}}


def _write_folder(root: Path, n_per_class: int = 24, size: int = 48) -> Path:
    return write_stripes_blobs(root, n_per_class, size)


def _spec(tmp_path: Path, data: Path, **kw) -> RunSpec:
    base = dict(models=("test-tiny",), datasets=(DatasetArg.parse(f"toy=folder:{data}"),), protocols=("fewshot",),
                weights="random", out=str(tmp_path / "out"), image_size=32, protocol_params=FAST)
    base.update(kw)
    return RunSpec(**base)


def test_run_writes_results_and_resumes(tmp_path):
    data = _write_folder(tmp_path / "data")
    spec = _spec(tmp_path, data)
    first = run(spec, progress=False)
    assert len(first.computed) == 1 and not first.reused and not first.failed
    r = first.results[0]
    result_file = Path(spec.out) / "results" / f"{r.cell_id}.json"
    d = json.loads(result_file.read_text())
    assert d["schema"] == "medxfer.result/2" and d["protocol_version"] == "1"
    assert d["headline"]["metric"] == "accuracy" and d["headline"]["higher_is_better"] is True
    assert d["metrics"]["episodes"] == 50 and len(d["details"]["episode_accuracies"]) == 50
    assert d["model_info"]["random_weights"] is True and d["model_info"]["family"] == "random"
    assert d["dataset_info"]["label"] == "toy" and d["dataset_info"]["class_names"] == ["abnormal", "normal"]
    assert d["variant"] == {"episodes": 50, "image_size": 32, "n_query": 5, "n_shot": 5}
    assert d["inputs"]["features:pooled"]["built"] is True and d["timings"]["extract_s"] > 0
    assert r.headline.value > 70  # stripes vs blobs are easy even for random features
    assert (Path(spec.out) / "summary.md").read_text().count("test-tiny") >= 1
    assert json.loads((Path(spec.out) / "run.json").read_text())["cells"][0]["status"] == "computed"
    again = run(spec, progress=False)  # same spec: reused, not recomputed
    assert not again.computed and len(again.reused) == 1
    assert again.results[0].metrics == r.metrics


def test_cells_that_differ_only_in_parameters_do_not_overwrite_each_other(tmp_path):
    data = _write_folder(tmp_path / "data")
    first = run(_spec(tmp_path, data), progress=False)
    changed = run(_spec(tmp_path, data, protocol_params={"fewshot": {**FAST["fewshot"], "n_shot": 4}}), progress=False)
    assert len(changed.computed) == 1
    a, b = first.results[0], changed.results[0]
    assert a.cell_id != b.cell_id and a.run_key != b.run_key
    files = sorted((tmp_path / "out" / "results").glob("*.json"))
    assert len(files) == 2
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "n_shot=5" in summary and "n_shot=4" in summary  # two tables, never averaged together


def test_replaced_image_invalidates_the_cell(tmp_path):
    data = _write_folder(tmp_path / "data")
    spec = _spec(tmp_path, data)
    first = run(spec, progress=False)
    img = data / "normal" / "normal_000.png"
    Image.fromarray(np.zeros((48, 48), np.uint8), mode="L").save(img)
    second = run(spec, progress=False)
    assert len(second.computed) == 1
    assert second.results[0].run_key != first.results[0].run_key


def test_api_mirrors_the_cli(tmp_path):
    data = _write_folder(tmp_path / "data")
    ds = medxfer.load_dataset("folder", root=data)
    model = medxfer.load_model("test-tiny", weights="random")
    feats = medxfer.extract_features(model, ds, size=32)
    assert feats.features.shape == (48, 32) and feats.features.dtype == np.float32
    assert len(feats.labels) == 48 and len(feats.records) == 48 and feats.info is ds.info
    res = medxfer.evaluate("fewshot", feats, n_way=2, n_shot=5, n_query=5, episodes=40, seed=1)
    assert set(res.metrics) >= {"accuracy", "ci95"} and len(res.details["episode_accuracies"]) == 40
    again = medxfer.evaluate("fewshot", medxfer.extract_features(model, ds, size=32), n_way=2, n_shot=5,
                             n_query=5, episodes=40, seed=1)
    assert again.metrics == res.metrics
    with pytest.raises(medxfer.MedxferError, match="needs prepared images|runs the backbone"):
        medxfer.evaluate("finetune", feats)


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
    assert len(list((out / "results").glob("test-tiny__toy__fewshot__seed0__v*.json"))) == 1
    rc = main(["validate", f"toy=folder:{data}", "--json"])
    v = json.loads(capsys.readouterr().out)
    assert rc == 0 and v["total"] == 48 and v["pairs"] is None
    assert sum(sum(c.values()) for c in v["counts"].values()) == 48
    for what in ("models", "datasets", "protocols"):
        assert main(["ls", what, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (out / "report" / "results.csv").is_file() and list((out / "report").glob("table_fewshot*.tex"))
    assert str(out / "report" / "report.html") in printed and str(out / "report" / "stats.json") in printed


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["run", "--models", "test-tiny", "--dataset", "shenzen=/nowhere", "--weights", "random",
                 "--out", str(tmp_path)]) == 2
    assert "Did you mean 'shenzhen'" in capsys.readouterr().err
    assert main(["run", "--models", "resnet-51", "--dataset", f"x=folder:{tmp_path}", "--out", str(tmp_path)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["validate", f"x=folder:{tmp_path / 'missing'}"]) != 0


def test_unknown_protocol_or_parameter_in_set_is_an_error_with_a_suggestion(tmp_path, capsys):
    data = _write_folder(tmp_path / "data", n_per_class=4)
    base = ["run", "--models", "test-tiny", "--weights", "random", "--dataset", f"toy=folder:{data}",
            "--out", str(tmp_path / "o")]
    assert main([*base, "--set", "fewshto.n_shot=10"]) == 2
    err = capsys.readouterr().err
    assert "unknown protocol 'fewshto'" in err and "Did you mean 'fewshot'" in err
    assert main([*base, "--set", "fewshot.n_shto=10"]) == 2
    assert "Did you mean '--set fewshot.n_shot'" in capsys.readouterr().err
    assert main([*base, "--dataset-option", "toy.colour=red"]) == 2
    assert "unknown '--dataset-option toy.colour'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_cell_that_cannot_run_fails_alone_before_any_image_is_decoded(tmp_path, capsys):
    """A class too small for 20-shot episodes is known from the labels: that cell fails first,
    without decoding; the other cells of the run still run; the exit status says some failed."""
    small = _write_folder(tmp_path / "small", n_per_class=8)
    big = _write_folder(tmp_path / "big", n_per_class=40)
    rc = main(["run", "--quiet", "--models", "test-tiny", "--dataset", f"small=folder:{small}", "--dataset",
               f"big=folder:{big}", "--weights", "random", "--image-size", "32", "--out", str(tmp_path / "o"),
               "--cache-dir", str(tmp_path / "cache")])
    captured = capsys.readouterr()
    assert rc == 1
    assert "need 35 images per class" in captured.err and "--set fewshot.small_classes=drop" in captured.err
    assert "failed 1" in captured.err
    results = list((tmp_path / "o" / "results").glob("*.json"))
    assert len(results) == 1 and "__big__" in results[0].name
    run_record = json.loads((tmp_path / "o" / "run.json").read_text())
    assert sorted(c["status"] for c in run_record["cells"]) == ["computed", "failed"]
    prepared = list((tmp_path / "cache" / "prepared").iterdir())
    assert len(prepared) == 1  # only the dataset whose cell could run was decoded


def test_a_run_where_nothing_ran_leaves_nothing_behind(tmp_path, capsys):
    small = _write_folder(tmp_path / "small", n_per_class=8)
    out = tmp_path / "never"
    rc = main(["run", "--quiet", "--models", "test-tiny", "--dataset", f"small=folder:{small}", "--weights",
               "random", "--image-size", "32", "--out", str(out)])
    assert rc == 1 and not out.exists()
    assert "nothing was written" in capsys.readouterr().err


def test_unwritable_output_or_cache_is_one_clear_line(tmp_path, capsys):
    data = _write_folder(tmp_path / "data", n_per_class=4)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    base = ["run", "--models", "test-tiny", "--weights", "random", "--dataset", f"toy=folder:{data}"]
    assert main([*base, "--out", str(blocker / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output folder" in err[0] and "is a file, not a folder" in err[0]
    assert main([*base, "--out", str(tmp_path / "o"), "--cache-dir", str(blocker)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cache folder" in err[0] and "a file is in the way" in err[0]


@pytest.fixture
def read_only_dir(tmp_path: Path):
    """A read-only tmpfs (root only: mounting needs the privilege); skipped elsewhere."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a read-only file system needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {res.stderr.decode().strip()}")
    yield target
    subprocess.run(["umount", str(target)], check=False)


def test_read_only_output_or_cache_is_one_clear_line(tmp_path, read_only_dir, capsys):
    data = _write_folder(tmp_path / "data", n_per_class=4)
    base = ["run", "--models", "test-tiny", "--weights", "random", "--dataset", f"toy=folder:{data}"]
    assert main([*base, "--out", str(read_only_dir / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "read-only file system" in err[0]
    assert main([*base, "--out", str(tmp_path / "o"), "--cache-dir", str(read_only_dir / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cache folder" in err[0] and "read-only" in err[0]


def test_device_cpu_keeps_the_linear_probe_on_the_cpu(tmp_path):
    data = _write_folder(tmp_path / "data", n_per_class=20)
    outcome = run(_spec(tmp_path, data, protocols=("linear",), device="cpu", protocol_params={}), progress=False)
    r = outcome.results[0]
    assert r.device == "cpu" and r.details["solver_info"]["device"] == "cpu"


def test_quiet_prints_no_progress_bar(tmp_path):
    """Bars follow the medxfer logger: shown by default, silenced by --quiet (all of them)."""
    data = _write_folder(tmp_path / "data", n_per_class=12)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    args = [sys.executable, "-m", "medxfer", "run", "--models", "test-tiny", "--weights", "random", "--dataset",
            f"toy=folder:{data}", "--image-size", "32", "--protocols", "fewshot,finetune", "--set",
            "fewshot.n_shot=4", "--set", "fewshot.n_query=4", "--set", "fewshot.episodes=10",
            "--set", "finetune.max_steps=2", "--set", "finetune.val_every=1", "--set", "finetune.image_size=32",
            "--set", "finetune.batch_size=4"]
    loud = subprocess.run([*args, "--out", str(tmp_path / "a"), "--cache-dir", str(tmp_path / "c1")], env=env,
                          capture_output=True, text=True, timeout=300)
    quiet = subprocess.run([*args, "--quiet", "--out", str(tmp_path / "b"), "--cache-dir", str(tmp_path / "c2")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 0 and quiet.returncode == 0, loud.stderr + quiet.stderr
    for bar in ("prepare toy", "extract test-tiny", "finetune test-tiny"):
        assert bar in loud.stderr, bar
        assert bar not in quiet.stderr, bar
    assert "it/s" not in quiet.stderr and "img/s" not in quiet.stderr and "\r" not in quiet.stderr


def test_two_runs_at_once_on_one_cache_agree_and_decode_once(tmp_path):
    """Two `medxfer run` processes started together on one cache and one dataset: both finish,
    their results are identical, and the images are decoded (and features extracted) once."""
    data = _write_folder(tmp_path / "data", n_per_class=30)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), MEDXFER_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-m", "medxfer", "run", "--quiet", "--models", "test-tiny",
                               "--weights", "random", "--dataset", f"toy=folder:{data}", "--image-size", "32",
                               "--protocols", "fewshot,linear", "--set", "fewshot.n_shot=5",
                               "--set", "fewshot.episodes=100", "--out", str(tmp_path / name)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in ("one", "two")]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    results = {name: sorted((tmp_path / name / "results").glob("*.json")) for name in ("one", "two")}
    assert [f.name for f in results["one"]] == [f.name for f in results["two"]] and len(results["one"]) == 2
    built = {"prepared": 0, "features": 0}
    for a, b in zip(results["one"], results["two"]):
        ra, rb = json.loads(a.read_text()), json.loads(b.read_text())
        assert ra["metrics"] == rb["metrics"] and ra["run_key"] == rb["run_key"]
        for r in (ra, rb):
            for name, entry in r["inputs"].items():
                built[name.split(":")[0]] += int(entry["built"])
    assert built == {"prepared": 1, "features": 1}  # one process decoded and extracted, the other waited
    assert len(list((tmp_path / "cache" / "prepared").iterdir())) == 1


def test_real_ichallenge_pm_sample_end_to_end(shared_data, tmp_path):
    root = shared_data / "ichallenge-pm"
    out = tmp_path / "pm"
    rc = main(["run", "--quiet", "--models", "test-tiny", "--dataset", f"ichallenge-pm={root}", "--weights",
               "random", "--set", "fewshot.episodes=100", "--out", str(out)])
    assert rc == 0
    (result,) = (out / "results").glob("test-tiny__ichallenge-pm__fewshot__seed0__v*.json")
    r = json.loads(result.read_text())
    assert r["params"]["n_way"] == 2 and r["params"]["n_shot"] == 20
    assert 0 <= r["metrics"]["accuracy"] <= 100 and r["dataset_info"]["images"] >= 400
    assert r["dataset_info"]["modality"] == "fundus" and r["dataset_info"]["in_domain"] is False


def test_module_entry_point_help_and_light_import():
    proc = subprocess.run([sys.executable, "-m", "medxfer", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "validate" in proc.stdout and "run" in proc.stdout
    code = "import sys, medxfer; medxfer.RunSpec; assert 'torch' not in sys.modules, 'torch imported'"
    light = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                           env=dict(os.environ, PYTHONPATH=str(REPO / "src")))
    assert light.returncode == 0, light.stderr


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
    (result,) = (out / "results").glob("mine__toy__fewshot__seed0__v*.json")
    r = json.loads(result.read_text())
    assert r["model_info"]["random_weights"] is False and r["model_info"]["arch"] == "resnet18"
    loaded = medxfer.load_model("mine")
    for k, v in net.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(loaded.state_dict()[k], v), k


def test_paper_preset_is_the_papers_grid(tmp_path, monkeypatch):
    """Few-shot on all 8 datasets; linear and finetune on CheXpert and EyePACS only, without the
    domain-specific models on EyePACS; finetune batch 16 for the DenseNet-121 models."""
    from collections import Counter

    from medxfer.grid import build_cells
    from medxfer.presets import load_preset

    monkeypatch.setenv("MEDXFER_DATA", str(tmp_path))
    spec = RunSpec.from_dict(load_preset("paper"), where="preset paper")
    cells = build_cells(spec)
    per_protocol = Counter(c.protocol for c in cells)
    assert per_protocol == {"fewshot": 13 * 8, "linear": 13 + 8, "finetune": 13 + 8}
    many = [c for c in cells if c.protocol != "fewshot"]
    assert {c.dataset.label for c in many} == {"chexpert", "eyepacs"}
    assert not [c for c in many if c.dataset.label == "eyepacs" and c.model.startswith(("mimic", "moco-cxr"))]
    batch = {c.model: c.params.get("batch_size", 64) for c in many if c.protocol == "finetune"}
    assert {m for m, b in batch.items() if b == 16} == {"supervised-d121", "mimic-chexpert-lr0.01",
                                                        "mimic-chexpert-lr0.1", "mimic-chexpert-lr1.0", "moco-cxr-d121"}
    assert all(not c.variant for c in many)  # one table per protocol, as the paper's Table 4


def test_grid_blocks_and_overrides_are_checked(tmp_path):
    from medxfer.errors import SpecError
    from medxfer.grid import build_cells

    data = _write_folder(tmp_path / "data", n_per_class=4)
    with pytest.raises(SpecError, match=r"blocks\[0\].datasets: 'nope' is not one of this run's datasets"):
        build_cells(_spec(tmp_path, data, blocks=({"datasets": ["nope"]},)))
    with pytest.raises(SpecError, match=r"overrides\[0\]: expected a mapping with keys"):
        _spec(tmp_path, data, overrides=({"modles": ["test-tiny"]},))


def test_compat_paper_squashes_the_small_datasets_for_few_shot(tmp_path):
    data = _write_folder(tmp_path / "data", n_per_class=12)
    spec = _spec(tmp_path, data, compat="paper",
                 protocol_params={"fewshot": {"n_shot": 4, "n_query": 4, "episodes": 20}})
    r = run(spec, progress=False).results[0]
    assert r.variant["compat"] == "paper" and r.params["paper_squash"] is True
    assert "features:pooled:squash" in r.inputs and "prepared:32:squash" in r.inputs


def test_ichallenge_pm_few_shot_pool_is_the_400_training_images(shared_data, tmp_path):
    ds = medxfer.load_dataset("ichallenge-pm", shared_data / "ichallenge-pm")
    assert len(ds) == 800
    feats = medxfer.extract_features(medxfer.load_model("test-tiny", weights="random"), ds, size=32)
    paper = medxfer.evaluate("fewshot", feats, episodes=20)
    assert paper.details["pool_images"] == 400 and paper.params["pool_splits"] == ["train"]
    everything = medxfer.evaluate("fewshot", feats, episodes=20, pool_splits=None)
    assert everything.details["pool_images"] == 800


@pytest.mark.parametrize("error,status", [(KeyboardInterrupt(), "interrupted"),
                                          (OSError(28, "No space left on device"), "stopped")])
def test_a_run_that_stops_part_way_says_so_in_run_json(tmp_path, monkeypatch, error, status):
    import medxfer.executors.local as local

    data = _write_folder(tmp_path / "data")
    spec = _spec(tmp_path, data, seeds=(0, 1))
    real, started = local.execute_cell, []

    def second_cell_stops(cell, session):
        started.append(cell.id)
        if len(started) == 2:
            raise error
        return real(cell, session)

    monkeypatch.setattr(local, "execute_cell", second_cell_stops)
    with pytest.raises(type(error)):
        run(spec, progress=False)
    record = json.loads((Path(spec.out) / "run.json").read_text())
    assert record["status"] == status
    assert [c["status"] for c in record["cells"]] == ["computed", "pending"]
    assert ("No space left on device" in record.get("stopped_by", "")) == (status == "stopped")
    monkeypatch.setattr(local, "execute_cell", real)
    again = run(spec, progress=False)  # the stopped run resumes: the first cell is reused
    assert len(again.reused) == 1 and len(again.computed) == 1
    assert json.loads((Path(spec.out) / "run.json").read_text())["status"] == "finished"
