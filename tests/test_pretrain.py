"""In-domain pretraining: views, the four methods, registration across processes, resume to
identical weights, and the real samples (ResNet-18 on iChallenge-PM + EyePACS, then `medxfer run`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("lightly")

from medxfer.cli import main
from medxfer.config import DatasetArg, RunSpec
from medxfer.errors import UsageError
from medxfer.models import MODELS, load_model
from medxfer.pretrain import PretrainParams, parse_data, pretrain
from medxfer.testing import write_stripes_blobs
from medxfer.training.augment import NATURAL, VIEW_POLICIES, hed_jitter, make_views, policy_for

TINY = dict(steps=6, batch_size=8, size=32, queue=64, out_dim=256, n_local=2, checkpoint_every=2)


@pytest.fixture
def toy(tmp_path: Path) -> DatasetArg:
    return parse_data(f"toy=folder:{write_stripes_blobs(tmp_path / 'data', n_per_class=10, size=48)}")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ----------------------------------------------------------------------------- views
@pytest.mark.parametrize("name", sorted(n for n, _ in VIEW_POLICIES.items()))
def test_views_are_seeded_shaped_and_never_the_padding(name: str) -> None:
    canvas = torch.zeros(3, 3, 60, 90, dtype=torch.uint8)
    extents = np.array([[40, 90], [60, 30], [20, 20]])
    for i, (h, w) in enumerate(extents):
        canvas[i, :, :h, :w] = 200
    policy = policy_for(name, "dino")
    a = make_views(list(canvas), extents, policy, torch.Generator().manual_seed(0), size=24, n_local=2, local_size=12)
    b = make_views(list(canvas), extents, policy, torch.Generator().manual_seed(0), size=24, n_local=2, local_size=12)
    c = make_views(list(canvas), extents, policy, torch.Generator().manual_seed(1), size=24, n_local=2, local_size=12)
    assert [tuple(v.shape) for v in a] == [(3, 3, 24, 24)] * 2 + [(3, 3, 12, 12)] * 2
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and not all(torch.equal(x, y) for x, y in zip(a, c))
    if not policy.rotation and not policy.jitter_p and not policy.hed:  # geometric only: pixels stay the image's
        assert all(int(v.min()) >= 150 for v in a)


def test_view_policies_say_what_they_do() -> None:
    cxr = VIEW_POLICIES.get("cxr")
    assert cxr.rotation == 10.0 and cxr.jitter_p == 0.0 and cxr.crop_scale[0] >= 0.8 and cxr.blur == (0.0,)
    assert VIEW_POLICIES.get("histology").hed > 0 and VIEW_POLICIES.get("histology").dihedral
    assert policy_for("natural", "simclr") is NATURAL["simclr"] and policy_for("natural", "dino").local_scale == (0.05, 0.4)
    assert policy_for("fundus", "byol") is VIEW_POLICIES.get("fundus")


def test_hed_jitter_is_stain_space_and_identity_at_zero() -> None:
    img = torch.randint(30, 250, (3, 16, 16), dtype=torch.uint8)
    same = hed_jitter(img, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert (same.int() - img.int()).abs().max() <= 1
    more_h = hed_jitter(img, torch.tensor([0.3, 0.0, 0.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert more_h.float().mean() < img.float().mean()  # more haematoxylin absorbs more light


# ----------------------------------------------------------------------------- methods and registration
@pytest.mark.parametrize("method", ["moco-v2", "simclr", "byol", "dino"])
def test_every_method_trains_and_registers_a_model(method: str, toy: DatasetArg, tmp_path: Path) -> None:
    parent = load_model("test-tiny", weights="random")
    rng_before = torch.random.get_rng_state()
    out = pretrain(f"tiny-{method}", "test-tiny", [toy], PretrainParams(method=method, **TINY), weights="random",
                   cache_dir=tmp_path / "cache", device="cpu")
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # no global seeding
    rec = out.record
    assert out.computed and rec["steps"] == 6 and len(rec["loss_curve"]) == 6
    assert all(np.isfinite(loss) for _, loss in rec["loss_curve"]) and rec["method"] == method
    assert rec["data"]["images"] == 16  # train split only (the test images are left out by default)
    spec = MODELS.get(f"tiny-{method}")
    assert spec.family == "self-supervised (in-domain)" and spec.parent == "test-tiny"
    assert spec.extra["method"] == method and spec.extra["data_fingerprint"] == rec["data"]["fingerprint"]
    model = load_model(f"tiny-{method}", cache_dir=tmp_path / "cache")
    assert model.weights_hash == rec["weights_hash"] != parent.weights_hash
    assert model.spec.normalization == parent.spec.normalization
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.isfinite(model.features(x)).all()


def test_same_settings_reuse_other_settings_need_overwrite(toy: DatasetArg, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    kw = dict(weights="random", cache_dir=cache, device="cpu")
    first = pretrain("mine", "test-tiny", [toy], PretrainParams(**TINY), **kw)
    again = pretrain("mine", "test-tiny", [toy], PretrainParams(**TINY), **kw)
    assert first.computed and not again.computed and again.weights_path == first.weights_path
    with pytest.raises(UsageError, match="already exists"):
        pretrain("mine", "test-tiny", [toy], PretrainParams(**{**TINY, "steps": 4}), **kw)
    assert pretrain("mine", "test-tiny", [toy], PretrainParams(**{**TINY, "steps": 4}), overwrite=True, **kw).computed
    with pytest.raises(UsageError, match="zoo"):
        pretrain("supervised-r50", "test-tiny", [toy], PretrainParams(**TINY), **kw)


class Killed(Exception):
    pass


@pytest.mark.parametrize("method,extra", [("moco-v2", {}), ("dino", {"accumulate": 2})])
def test_killed_run_resumes_to_identical_weights(method: str, extra: dict, toy: DatasetArg, tmp_path: Path) -> None:
    """MoCo's queue is a non-persistent buffer, DINO's centre a buffer, its teacher an EMA:
    all must survive the resume, as must the optimiser, schedule and view generator."""
    p = PretrainParams(method=method, **{**TINY, **extra})
    ref = pretrain("ref", "test-tiny", [toy], p, weights="random", cache_dir=tmp_path / "a", device="cpu")

    def kill(step: int) -> None:
        if step == 4:
            raise Killed

    with pytest.raises(Killed):
        pretrain("resumed", "test-tiny", [toy], p, weights="random", cache_dir=tmp_path / "b", device="cpu",
                 on_checkpoint=kill)
    assert list((tmp_path / "b" / "pretrain" / "resumed").glob("*/checkpoint.pt"))
    out = pretrain("resumed", "test-tiny", [toy], p, weights="random", cache_dir=tmp_path / "b", device="cpu")
    assert out.record["resumed_from"] == 4 and out.record["loss_curve"] == ref.record["loss_curve"]
    a, b = _weights(ref.weights_path), _weights(out.weights_path)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # and a run that did not resume differs from a run with another seed (the check can fail)
    other = pretrain("other", "test-tiny", [toy], PretrainParams(method=method, **{**TINY, **extra, "seed": 1}),
                     weights="random", cache_dir=tmp_path / "c", device="cpu")
    c = _weights(other.weights_path)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_new_process_knows_the_model_and_run_specs_name_it(toy: DatasetArg, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    pretrain("known", "test-tiny", [toy], PretrainParams(**TINY), weights="random", cache_dir=cache, device="cpu")
    env = {**os.environ, "MEDXFER_CACHE": str(cache), "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-m", "medxfer", "ls", "models", "--json"], capture_output=True, text=True,
                         env=env, check=True)
    row = next(r for r in json.loads(out.stdout) if r["name"] == "known")
    assert row["family"] == "self-supervised (in-domain)" and row["parent"] == "test-tiny"
    assert row["method"] == "moco-v2" and row["steps"] == "6" and row["cached"] and row["data_fingerprint"]
    # a model file can name it by its record (e.g. copied with its weights to another machine)
    MODELS.unregister("known")
    (tmp_path / "models.yaml").write_text(f"models:\n  - record: {cache / 'pretrained' / 'known.json'}\n")
    from medxfer.models.custom import load_model_file

    assert load_model_file(tmp_path / "models.yaml") == ["known"]
    MODELS.unregister("known")
    from medxfer.grid import build_cells

    spec = RunSpec(models=("known",), datasets=(toy,), cache_dir=str(cache), weights="pretrained")
    assert build_cells(spec)[0].model == "known"  # the run's cache registers it


def test_missing_lightly_is_one_clear_error(monkeypatch: pytest.MonkeyPatch, toy: DatasetArg, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "lightly.loss", None)
    with pytest.raises(UsageError, match=r"pip install --no-deps \"lightly>=1.5\""):
        pretrain("x", "test-tiny", [toy], PretrainParams(**TINY), weights="random", cache_dir=tmp_path, device="cpu")


def test_cli_unlabelled_folder_and_bad_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images = tmp_path / "unlabelled" / "deep" / "er"
    write_stripes_blobs(images, n_per_class=5, size=40)
    cache = tmp_path / "cache"
    rc = main(["pretrain", "--init", "test-tiny", "--weights", "random", "--data", f"u=images:{tmp_path / 'unlabelled'}",
               "--out", "from-folder", "--steps", "3", "--batch-size", "4", "--size", "32", "--set", "queue=32",
               "--augment", "fundus", "--cache-dir", str(cache), "--device", "cpu", "-q"])
    text = capsys.readouterr().out
    assert rc == 0 and "model from-folder: moco-v2 for 3 steps from test-tiny" in text and "loss curve" in text
    assert MODELS.get("from-folder").extra["augment"] == "fundus"
    assert main(["pretrain", "--init", "test-tiny", "--data", f"u=images:{tmp_path}", "--out", "y",
                 "--set", "qeue=3", "--cache-dir", str(cache), "-q"]) == 2
    assert "Did you mean '--set queue'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the real samples
def _fake_supervised_r18(tmp_path: Path) -> None:
    """supervised-r18's original torchvision file, fabricated (random values, real keys), fetched."""
    from medxfer.models.backbone import build_trunk
    from medxfer.models.fetch import fetch

    sd = build_trunk("resnet18", seed=5).state_dict()
    sd = {k: v for k, v in sd.items()}
    g = torch.Generator().manual_seed(0)
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 512, generator=g), torch.randn(1000, generator=g)
    torch.save(sd, tmp_path / "resnet18-f37072fd.pth")
    fetch("supervised-r18", source=tmp_path / "resnet18-f37072fd.pth", verify_hash=False)


def test_real_fundus_samples_pretrain_then_run_beside_the_parent(shared_data: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    cache = Path(os.environ["MEDXFER_CACHE"])
    _fake_supervised_r18(tmp_path)
    rc = main(["pretrain", "--method", "moco-v2", "--init", "supervised-r18", "--out", "r18-fundus",
               "--data", f"pm=folder:{shared_data / 'ichallenge-pm' / 'PALM-Training400'}".replace("folder:", "images:"),
               "--data", f"eyepacs={shared_data / 'eyepacs-sample'}", "--data-option", "eyepacs.allow_missing=true",
               "--augment", "fundus", "--steps", "3", "--batch-size", "8", "--size", "64", "--set", "queue=64",
               "--device", "cpu", "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rec = json.loads((cache / "pretrained" / "r18-fundus.json").read_text())
    assert [d["label"] for d in rec["data"]["datasets"]] == ["pm", "eyepacs"]
    assert rec["data"]["images"] == 400 + 40 and rec["parent_weights"] == "pretrained (supervised-r18)"
    rc = main(["run", "--models", "r18-fundus,supervised-r18", "--dataset", f"ichallenge-pm={shared_data / 'ichallenge-pm'}",
               "--protocols", "fewshot", "--set", "fewshot.episodes=100", "--image-size", "64",
               "--out", str(tmp_path / "run"), "--device", "cpu", "-q"])
    summary = capsys.readouterr().out
    assert rc == 0, summary
    results = {json.loads(p.read_text())["model"]: json.loads(p.read_text())
               for p in (tmp_path / "run" / "results").glob("*.json")}
    mine = results["r18-fundus"]["model_info"]
    assert mine["family"] == "self-supervised (in-domain)" and mine["parent"] == "supervised-r18"
    assert mine["pretraining"]["method"] == "moco-v2" and len(mine["pretraining"]["loss_curve"]) == 3
    assert results["r18-fundus"]["model_info"]["weights_hash"] != results["supervised-r18"]["model_info"]["weights_hash"]
    assert "## In-domain pretraining" in summary
    assert "| fewshot (episodes=100, image_size=64) | ichallenge-pm | r18-fundus | parent supervised-r18 |" in summary
    assert "(paired, 100 episodes)" in summary
