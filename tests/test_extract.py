"""Extract stage: correctness, eval mode, caching, resume, NaN checks, precision."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from medxfer import runtime
from medxfer.extract import AUTOCAST_TOLERANCE, FeatureError, extract_features, features_artifact, features_key
from medxfer.models import load_model
from medxfer.prepare import prepare
from medxfer.testing import random_image_dataset as make_dataset

REPO = Path(__file__).resolve().parents[1]


def direct_features(model, array: np.ndarray) -> np.ndarray:
    """The plain computation: whole prepared array through normalise + trunk at once."""
    x = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        return model(model.normalize(x)).numpy()


@pytest.fixture
def prepared(tmp_path: Path):
    return prepare(make_dataset(tmp_path / "imgs", n=10), size=32, cache_dir=tmp_path / "c",
                   workers=1, progress=False)


def test_features_match_direct_computation(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    fs = extract_features(model, prepared, cache_dir=tmp_path / "c", batch_size=4, progress=False)
    assert fs.features.shape == (10, 32) and fs.features.dtype == np.float32
    np.testing.assert_allclose(fs.features, direct_features(model, prepared.array), rtol=1e-4, atol=1e-5)
    assert fs.model == "test-tiny" and fs.dataset == "toy" and fs.class_names == ("neg", "pos")
    assert fs.headline_metric == "auroc" and fs.records == prepared.records and fs.info == prepared.info
    np.testing.assert_array_equal(fs.labels, prepared.labels)
    assert fs.key == features_key(model, prepared.key, "fp32") and fs.built
    for k in ("weights", "device", "precision", "batch_size", "seconds", "images_per_second"):
        assert k in fs.meta
    assert fs.meta["device"] == "cpu" and fs.meta["weights"].startswith("random")
    assert not model.training


def test_batch_size_and_workers_do_not_change_features(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    a = extract_features(model, prepared, cache_dir=tmp_path / "a", batch_size=3, num_workers=0, progress=False)
    b = extract_features(model, prepared, cache_dir=tmp_path / "b", batch_size=7, num_workers=3, progress=False)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)


def test_eval_mode_is_asserted(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    model.trunk.features[1].train()
    with pytest.raises(RuntimeError, match="eval mode"):
        extract_features(model, prepared, cache_dir=tmp_path / "c", progress=False)


def test_cache_reused_and_invalidated(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    a = extract_features(model, prepared, cache_dir=tmp_path / "c", batch_size=5, progress=False)
    assert a.built and a.meta["images_extracted"] == 10
    b = extract_features(model, prepared, cache_dir=tmp_path / "c", batch_size=5, progress=False)
    assert not b.built and b.key == a.key  # cached: no forward pass
    np.testing.assert_array_equal(a.features, b.features)
    c = extract_features(model, prepared, cache_dir=tmp_path / "c", precision="bf16", progress=False)
    assert c.key != a.key and c.built
    other = load_model("test-tiny", weights="random", seed=1)
    d = extract_features(other, prepared, cache_dir=tmp_path / "c", progress=False)
    assert d.key != a.key and not np.allclose(d.features, a.features)


def test_normalisation_is_part_of_the_feature_key(prepared, tmp_path: Path) -> None:
    """The same checkpoint under another normalisation gives other features, never stale ones."""
    imagenet = load_model("test-tiny", weights="random")
    raw = load_model("test-tiny", weights="random", normalization="none")
    assert imagenet.weights_hash == raw.weights_hash and imagenet.fingerprint != raw.fingerprint
    a = extract_features(imagenet, prepared, cache_dir=tmp_path / "c", progress=False)
    b = extract_features(raw, prepared, cache_dir=tmp_path / "c", progress=False)
    assert a.key != b.key and b.built and not np.allclose(a.features, b.features)
    np.testing.assert_allclose(b.features, direct_features(raw, prepared.array), rtol=1e-4, atol=1e-5)


def test_features_of_a_stage(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    fs = extract_features(model, prepared, cache_dir=tmp_path / "c", layer="block2", progress=False)
    x = torch.from_numpy(np.array(prepared.array)).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        want = model.feature_map(model.normalize(x), "block2").mean(dim=(-2, -1)).numpy()
    assert fs.features.shape == (10, 32) and fs.meta["layer"] == "block2"
    np.testing.assert_allclose(fs.features, want, rtol=1e-4, atol=1e-5)
    assert fs.key != extract_features(model, prepared, cache_dir=tmp_path / "c", progress=False).key


def test_dataset_input_is_prepared_with_same_cache(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=6, grey=True)
    model = load_model("test-tiny", weights="random")
    fs = extract_features(model, ds, cache_dir=tmp_path / "c", size=24, progress=False)
    p = prepare(ds, size=24, cache_dir=tmp_path / "c", progress=False)
    assert p.channels == 1 and fs.meta["prepared_key"] == p.key
    np.testing.assert_allclose(fs.features, direct_features(model, p.array), rtol=1e-4, atol=1e-5)


class Stop(Exception):
    pass


def test_interrupted_extraction_resumes(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    ref = extract_features(model, prepared, cache_dir=tmp_path / "ref", batch_size=2, progress=False)

    def stop(done: int, total: int) -> None:
        if done == 6:
            raise Stop

    with pytest.raises(Stop):
        extract_features(model, prepared, cache_dir=tmp_path / "c2", batch_size=2, progress=False,
                         checkpoint_every=2, on_progress=stop)
    art = features_artifact(model, prepared.key, cache_dir=tmp_path / "c2")
    assert art.progress() == (6, 10) and not art.complete
    fs = extract_features(model, prepared, cache_dir=tmp_path / "c2", batch_size=2, progress=False)
    assert fs.built and fs.meta["images_extracted"] == 4
    np.testing.assert_allclose(fs.features, ref.features, rtol=1e-5, atol=1e-6)


def test_killed_extraction_resumes(prepared, tmp_path: Path) -> None:
    """A hard kill mid-run: the next run redoes only what the last flush had not recorded."""
    import json
    from dataclasses import asdict

    records = json.dumps([asdict(r) for r in prepared.records])
    script = textwrap.dedent(f"""
        import json, os
        from medxfer.data.records import Dataset, DatasetInfo, Record
        from medxfer.extract import extract_features
        from medxfer.models import load_model
        from medxfer.prepare import prepare
        recs = [Record(**r) for r in json.loads({records!r})]
        ds = Dataset(DatasetInfo("toy", "binary", ("neg", "pos")), recs, "x")
        p = prepare(ds, size=32, cache_dir={str(tmp_path / "c")!r}, workers=1, progress=False)
        assert p.key == {prepared.key!r}
        def die(done, total):
            if done == 6:
                os._exit(3)
        extract_features(load_model("test-tiny", weights="random"), p, cache_dir={str(tmp_path / "c")!r},
                         batch_size=2, progress=False, checkpoint_every=4, on_progress=die)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    model = load_model("test-tiny", weights="random")
    art = features_artifact(model, prepared.key, cache_dir=tmp_path / "c")
    assert art.progress() == (4, 10)
    fs = extract_features(model, prepared, cache_dir=tmp_path / "c", batch_size=2, progress=False)
    assert fs.meta["images_extracted"] == 6
    np.testing.assert_allclose(fs.features, direct_features(model, prepared.array), rtol=1e-4, atol=1e-5)


def test_truncated_feature_file_is_detected_and_rebuilt(prepared, tmp_path: Path, caplog) -> None:
    model = load_model("test-tiny", weights="random")
    good = np.array(extract_features(model, prepared, cache_dir=tmp_path / "c", progress=False).features)
    art = features_artifact(model, prepared.key, cache_dir=tmp_path / "c")
    with open(art.array_path, "r+b") as f:
        f.truncate(art.array_path.stat().st_size - 64)
    with caplog.at_level("WARNING"):
        again = extract_features(model, prepared, cache_dir=tmp_path / "c", progress=False)
    assert "truncated" in caplog.text and again.built
    np.testing.assert_array_equal(again.features, good)


def test_nan_features_name_model_and_record(prepared, tmp_path: Path) -> None:
    """A trunk that returns NaN for one image (the brightest): the error names model and record."""
    from medxfer.models.backbone import Backbone

    class NanForBright(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = x.mean(dim=(2, 3)).repeat(1, 11)[:, :32]
            return torch.where(x.mean(dim=(1, 2, 3), keepdim=True)[:, :, 0, 0] > 1.5, float("nan"), out)

    bright = np.array(prepared.array)
    bright[5] = 255
    from medxfer.prepare import PreparedImages

    p = PreparedImages(bright, prepared.records, "bright", None, 32, prepared.info)
    model = Backbone(load_model("test-tiny", weights="random").spec, NanForBright(), "test trunk").eval()
    with pytest.raises(FeatureError, match=r"test-tiny.*record 5 .*img5\.png"):
        extract_features(model, p, cache_dir=tmp_path / "c", batch_size=4, progress=False, fuse=False)
    assert not features_artifact(model, "bright", cache_dir=tmp_path / "c").complete


def test_bad_records_are_listed(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=6)
    Path(ds.records[2].path).write_bytes(b"broken")
    p = prepare(ds, size=32, cache_dir=tmp_path / "c", workers=1, skip_bad=True, progress=False)
    model = load_model("test-tiny", weights="random")
    fs = extract_features(model, p, cache_dir=tmp_path / "c", progress=False)
    assert len(fs) == 6 and fs.meta["bad"] == [2] and fs.records == ds.records  # aligned, bad listed
    np.testing.assert_allclose(fs.features, direct_features(model, p.array), rtol=1e-4, atol=1e-5)


def test_bf16_close_to_fp32(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=6)
    p = prepare(ds, size=64, cache_dir=tmp_path / "c", workers=1, progress=False)
    model = load_model("supervised-r18", weights="random")
    a = extract_features(model, p, cache_dir=tmp_path / "c", precision="fp32", progress=False).features
    b = extract_features(model, p, cache_dir=tmp_path / "c", precision="bf16", progress=False).features
    rel = np.abs(a - b).max() / np.abs(a).max()
    assert 0 < rel < AUTOCAST_TOLERANCE["bf16"]  # bf16 really ran, and stayed within tolerance


def test_precision_errors(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    with pytest.raises(ValueError, match="precision"):
        extract_features(model, prepared, cache_dir=tmp_path / "c", precision="int8", progress=False)
    with pytest.raises(ValueError, match="CUDA"):
        extract_features(model, prepared, cache_dir=tmp_path / "c", precision="fp16", device="cpu", progress=False)


def test_model_returned_to_its_device_and_eval(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    extract_features(model, prepared, cache_dir=tmp_path / "c", progress=False)
    assert next(model.parameters()).device.type == "cpu" and not model.training


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(prepared, tmp_path: Path) -> None:
    model = load_model("supervised-r18", weights="random")
    a = extract_features(model, prepared, cache_dir=tmp_path / "a", device="cpu", progress=False).features
    b = extract_features(model, prepared, cache_dir=tmp_path / "b", device="cuda", progress=False).features
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * np.abs(a).max())


def test_batchnorm_folding_is_exact_and_leaves_model_alone(prepared, tmp_path: Path) -> None:
    model = load_model("supervised-r18", weights="random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = extract_features(model, prepared, cache_dir=tmp_path / "a", fuse=True, progress=False)
    b = extract_features(model, prepared, cache_dir=tmp_path / "b", fuse=False, progress=False)
    assert a.meta["fused_batchnorm"] and not b.meta["fused_batchnorm"]
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-4 * np.abs(b.features).max())
    np.testing.assert_allclose(b.features, direct_features(model, prepared.array), rtol=1e-4,
                               atol=1e-4 * np.abs(b.features).max())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_folded_trunk_made_once_per_model(prepared, tmp_path: Path) -> None:
    model = load_model("test-tiny", weights="random")
    first = runtime.folded_trunk(model)
    assert first is not None and runtime.folded_trunk(model) is first  # made once, reused
    extract_features(model, prepared, cache_dir=tmp_path / "a", progress=False)
    assert runtime.folded_trunk(model) is first
    model.load_state_dict(load_model("test-tiny", weights="random", seed=2).state_dict())  # new weights
    assert runtime.folded_trunk(model) is not first
    fs = extract_features(model, prepared, cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_allclose(fs.features, direct_features(model, prepared.array), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_option_gives_same_features(prepared, tmp_path: Path) -> None:
    """torch.compile (inductor; about 30 s to compile on a small CPU) changes nothing but speed."""
    model = load_model("test-tiny", weights="random")
    a = extract_features(model, prepared, cache_dir=tmp_path / "a", compile=True, batch_size=5, progress=False)
    b = extract_features(model, prepared, cache_dir=tmp_path / "b", batch_size=5, progress=False)
    assert a.meta["compile"] and not b.meta["compile"]
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
