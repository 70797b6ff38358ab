"""The analyses as registered protocols: run through medxfer run / evaluate, typed results, artifacts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

import medxfer
from medxfer.config import DatasetArg, RunSpec
from medxfer.pipeline import run
from medxfer.protocols import PROTOCOLS
from medxfer.testing import gaussian_features, write_stripes_blobs


def test_transferability_scores_rank_separable_features_higher() -> None:
    good = gaussian_features(n_per_class=60, classes=3, dim=12, sep=3.0, seed=1)
    bad = gaussian_features(n_per_class=60, classes=3, dim=12, sep=0.1, seed=1)
    a, b = medxfer.evaluate("transferability", good), medxfer.evaluate("transferability", bad)
    for score in ("logme", "hscore_shrinkage", "gbc"):
        assert a.metrics[score] > b.metrics[score], score
    assert a.headline.metric == "logme" and a.headline.higher_is_better
    with pytest.raises(medxfer.MedxferError, match="unknown score"):
        medxfer.evaluate("transferability", good, scores=("leep",))


@pytest.fixture
def lpips_squeeze(tmp_path: Path) -> Path:
    """torchvision's squeezenet1_1 file fabricated in its format (random weights), put in the cache
    the way a user would: `medxfer fetch lpips --from DIR --no-verify` (the name's hash cannot match)."""
    from medxfer.cli import main

    src = tmp_path / "tv"
    src.mkdir()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = torchvision.models.squeezenet1_1(weights=None)
    torch.save(net.state_dict(), src / "squeezenet1_1-b8a52dc0.pth")
    rc = main(["fetch", "lpips", "--from", str(src), "--no-verify", "--offline"])
    assert rc == 1  # alex and vgg are not in DIR: reported, squeeze fetched
    from medxfer.models.auxiliary import recorded_sha256

    assert recorded_sha256("lpips-squeeze") is not None and recorded_sha256("lpips-alex") is None
    return src


def _spec(tmp_path: Path, data: Path, protocols: tuple[str, ...], **params) -> RunSpec:
    return RunSpec(models=("test-tiny",), datasets=(DatasetArg.parse(f"toy=folder:{data}"),), protocols=protocols,
                   weights="random", image_size=32, out=str(tmp_path / "out"), protocol_params=params)


def test_reconstruction_runs_in_the_pipeline_and_lists_its_images(tmp_path: Path, lpips_squeeze: Path) -> None:
    data = write_stripes_blobs(tmp_path / "data", n_per_class=6, size=40)
    spec = _spec(tmp_path, data, ("reconstruction", "transferability"),
                 reconstruction={"steps": 3, "images": 2, "lpips_nets": ["squeeze"]})
    outcome = run(spec, progress=False)
    assert not outcome.failed, outcome.failed
    rec = next(r for r in outcome.results if r.protocol == "reconstruction")
    assert rec.headline.metric == "lpips_mean" and rec.headline.higher_is_better is False
    assert set(rec.metrics) >= {"lpips_squeeze", "lpips_mean", "final_loss"} and rec.metrics["images"] == 2
    paths = [a.path for a in rec.artifacts]
    assert len(paths) == 4 and all(p.startswith(f"artifacts/{rec.cell_id}/") and p.endswith(".png") for p in paths)
    for a in rec.artifacts:
        assert (tmp_path / "out" / a.path).stat().st_size == a.size
    again = run(spec, progress=False)
    assert len(again.reused) == 2 and not again.computed  # re-running reuses the analyses


def test_reconstruction_images_do_not_depend_on_the_model(tmp_path: Path, lpips_squeeze: Path) -> None:
    from medxfer.analysis._select import choose_rows

    data = write_stripes_blobs(tmp_path / "data", n_per_class=6, size=40)
    ds = medxfer.load_dataset("folder", data)
    flipped = list(reversed(ds.records))
    picked = [ds.records[i].path for i in choose_rows(ds.records, 3, 0, splits=("test",))]
    assert [flipped[i].path for i in choose_rows(flipped, 3, 0, splits=("test",))] == picked  # not file order
    spec = _spec(tmp_path, data, ("reconstruction",), reconstruction={"steps": 2, "images": 2, "lpips_nets": ["squeeze"]})
    spec = spec.with_(models=("test-tiny", "supervised-r18"))
    results = run(spec, progress=False).results
    assert len(results) == 2
    assert [d["path"] for d in results[0].details["images"]] == [d["path"] for d in results[1].details["images"]]


def test_reconstruction_without_lpips_weights_names_the_fetch_command(tmp_path: Path) -> None:
    data = write_stripes_blobs(tmp_path / "data", n_per_class=6, size=40)
    outcome = run(_spec(tmp_path, data, ("reconstruction",), reconstruction={"steps": 2, "images": 1}), progress=False)
    assert outcome.failed and "medxfer fetch lpips" in outcome.failed[0].error


def test_histogram_normalised_models_get_a_differentiable_float_normalisation() -> None:
    from medxfer.analysis.reconstruction import float_normalizer

    model = medxfer.load_model("mimic-chexpert-lr0.01", weights="random")
    target = torch.randint(0, 256, (1, 3, 24, 24), dtype=torch.uint8)
    norm = float_normalizer(model, target)
    np.testing.assert_allclose(norm(target.float() / 255.0).numpy(), model.normalize(target).numpy(), atol=1e-3)
    x = (torch.rand(1, 3, 24, 24) * 0.8 + 0.1).requires_grad_(True)
    norm(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_analyses_are_registered_with_their_needs() -> None:
    assert PROTOCOLS.get("reconstruction").needs.accelerator == "gpu"
    assert PROTOCOLS.get("transferability").needs.features == ("pooled",)
    assert PROTOCOLS.get("reconstruction").make_params(compat="paper").normalize_input is False
    json.dumps(PROTOCOLS.get("reconstruction").make_params().to_dict())


def test_analyze_verb_runs_the_same_cells(tmp_path: Path, capsys) -> None:
    from medxfer.cli import main

    data = write_stripes_blobs(tmp_path / "data", n_per_class=6, size=40)
    args = ["--quiet", "--models", "test-tiny", "--weights", "random", "--dataset", f"toy=folder:{data}",
            "--image-size", "32", "--out", str(tmp_path / "o")]
    assert main(["analyze", "transferability", *args]) == 0
    (result,) = (tmp_path / "o" / "results").glob("test-tiny__toy__transferability__seed0*.json")
    assert json.loads(result.read_text())["protocol"] == "transferability"
    assert main(["run", "--protocols", "transferability", *args]) == 0  # the same cell: reused
    assert "reused 1" in capsys.readouterr().err
    assert main(["analyze", "fewshot", *args]) == 2
    assert "not an analysis" in capsys.readouterr().err


def test_saliency_protocol_writes_maps_and_attentive_diffusion(tmp_path: Path) -> None:
    data = write_stripes_blobs(tmp_path / "data", n_per_class=6, size=40)
    spec = _spec(tmp_path, data, ("saliency",), saliency={"images": 2, "image_size": 36, "window": 4})
    r = run(spec, progress=False).results[0]
    assert r.headline.metric == "attentive_diffusion" and 0 < r.metrics["attentive_diffusion"] < 100
    assert r.details["exact"] is True and r.params["occluder"] == "imagenet-mean"
    names = sorted(Path(a.path).name for a in r.artifacts)
    assert len(names) == 6 and any(n.endswith("_saliency_overlay.png") for n in names)
    npy = next(a for a in r.artifacts if a.path.endswith(".npy"))
    smap = np.load(tmp_path / "out" / npy.path)
    assert smap.shape == (36 - 2 * 3, 36 - 2 * 3) and smap.min() >= 0  # the fully covered region
    from medxfer.analysis.saliency import attentive_diffusion

    row = next(d for d in r.details["images"] if f"{d['row']:06d}" in npy.path)
    assert attentive_diffusion(smap.astype(np.float64)) == pytest.approx(row["attentive_diffusion"], abs=0.5)
    compat = PROTOCOLS.get("saliency").make_params(compat="paper")
    assert compat.occluder == "paper"


def test_invariance_protocol_on_toy_data(tmp_path: Path) -> None:
    data = write_stripes_blobs(tmp_path / "data", n_per_class=12, size=40)
    spec = _spec(tmp_path, data, ("invariance",), invariance={"families": ["rotation", "hflip", "hue", "multiview"],
                                                             "rotations": 4, "n_eval": 6, "n_stats": 18})
    r = run(spec, progress=False).results[0]
    for family in ("rotation", "hflip", "hue"):
        assert -1.0 <= r.metrics[family] <= 1.0, family
        assert r.details[family]["n_eval"] == 6 and r.details[family]["estimator"] == "ledoit-wolf"
    assert "multiview" not in r.metrics and "no multi-view pairs" in r.details["multiview"]
    assert r.headline.metric == "invariance_mean"


def test_invariance_across_the_real_eyepacs_left_right_pairs(shared_data: Path, tmp_path: Path) -> None:
    root = shared_data / "eyepacs-sample"
    spec = RunSpec(models=("test-tiny",), datasets=(DatasetArg("eyepacs", "eyepacs", str(root),
                                                                {"allow_missing": True}),),
                   protocols=("invariance",), weights="random", out=str(tmp_path / "out"), image_size=64,
                   protocol_params={"invariance": {"families": ["multiview", "hflip"], "n_eval": 4, "n_stats": 20}})
    outcome = run(spec, progress=False)
    assert not outcome.failed, outcome.failed
    r = outcome.results[0]
    assert r.details["multiview"]["n_eval"] == 4 and -1 <= r.metrics["multiview"] <= 1
    assert r.details["multiview"]["family"] == "multiview"
