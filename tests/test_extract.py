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

import medxfer.extract as ex
from medxfer.extract import FeatureError, extract_features, features_key
from medxfer.models import load_model
from medxfer.prepare import prepare
from test_prepare import make_dataset

REPO = Path(__file__).resolve().parents[1]


def direct_features(model, array: np.ndarray) -> np.ndarray:
    """The plain computation: whole prepared array through normalise + trunk at once."""
    x = torch.from_numpy(np.array(array)).permute(0, 3, 1, 2).contiguous()
    with torch.inference_mode():
        return model(model.normalize(x)).numpy()


def count_forwards(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Batch sizes of every forward pass the extraction runs."""
    calls: list[int] = []
    real = ex._Runner._forward

    def counting(self, part):
        calls.append(len(part))
        return real(self, part)

    monkeypatch.setattr(ex._Runner, "_forward", counting)
    return calls


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
    assert fs.headline_metric == "auroc" and fs.records == prepared.records
    np.testing.assert_array_equal(fs.labels, prepared.labels)
    assert fs.key == features_key(model, prepared.key, "fp32")
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


def test_cache_reused_and_invalidated(prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("test-tiny", weights="random")
    calls = count_forwards(monkeypatch)
    a = extract_features(model, prepared, cache_dir=tmp_path / "c", batch_size=5, progress=False)
    assert sum(calls) == 10
    b = extract_features(model, prepared, cache_dir=tmp_path / "c", batch_size=5, progress=False)
    assert sum(calls) == 10 and b.key == a.key  # cached: no forward pass
    np.testing.assert_array_equal(a.features, b.features)
    c = extract_features(model, prepared, cache_dir=tmp_path / "c", precision="bf16", progress=False)
    assert c.key != a.key and sum(calls) == 20
    other = load_model("test-tiny", weights="random", seed=1)
    d = extract_features(other, prepared, cache_dir=tmp_path / "c", progress=False)
    assert d.key != a.key and not np.allclose(d.features, a.features)


def test_dataset_input_is_prepared_with_same_cache(tmp_path: Path) -> None:
    ds = make_dataset(tmp_path / "imgs", n=6, grey=True)
    model = load_model("test-tiny", weights="random")
    fs = extract_features(model, ds, cache_dir=tmp_path / "c", size=24, progress=False)
    p = prepare(ds, size=24, cache_dir=tmp_path / "c", progress=False)
    assert p.channels == 1 and fs.meta["prepared_key"] == p.key
    np.testing.assert_allclose(fs.features, direct_features(model, p.array), rtol=1e-4, atol=1e-5)


def test_interrupted_extraction_resumes(prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("test-tiny", weights="random")
    ref = extract_features(model, prepared, cache_dir=tmp_path / "ref", batch_size=2, progress=False)
    monkeypatch.setattr(ex, "FLUSH_EVERY_BATCHES", 1)
    n_calls = [0]
    real = ex._Runner._forward

    def dying(self, part):
        n_calls[0] += 1
        if n_calls[0] == 3:
            raise KeyboardInterrupt
        return real(self, part)

    monkeypatch.setattr(ex._Runner, "_forward", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, prepared, cache_dir=tmp_path / "c2", batch_size=2, progress=False)
    monkeypatch.setattr(ex._Runner, "_forward", real)
    done = np.load(tmp_path / "c2" / "features" / ref.key / "done.npy")
    assert done.tolist() == [True] * 4 + [False] * 6
    calls = count_forwards(monkeypatch)
    fs = extract_features(model, prepared, cache_dir=tmp_path / "c2", batch_size=2, progress=False)
    assert sum(calls) == 6 and fs.meta["images_extracted"] == 6
    np.testing.assert_allclose(fs.features, ref.features, rtol=1e-5, atol=1e-6)


def test_killed_extraction_resumes(prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hard kill mid-run: the next run redoes only what the last flush had not recorded."""
    script = textwrap.dedent(f"""
        import os
        import medxfer.extract as ex
        from medxfer.models import load_model
        from medxfer.data.records import Dataset, DatasetInfo, Record
        from medxfer.prepare import prepare
        import json
        recs = [Record(**r) for r in json.loads({json_records(prepared)!r})]
        ds = Dataset(DatasetInfo("toy", "binary", ("neg", "pos"), headline_metric="auroc"), recs, "x")
        p = prepare(ds, size=32, cache_dir={str(tmp_path / "c")!r}, workers=1, progress=False)
        assert p.key == {prepared.key!r}
        ex.FLUSH_EVERY_BATCHES = 2
        model = load_model("test-tiny", weights="random")
        calls = []
        real = ex._Runner._forward
        def die(self, part):
            calls.append(1)
            if len(calls) == 4:
                os._exit(3)
            return real(self, part)
        ex._Runner._forward = die
        ex.extract_features(model, p, cache_dir={str(tmp_path / "c")!r}, batch_size=2, progress=False)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr
    model = load_model("test-tiny", weights="random")
    key = features_key(model, prepared.key)
    done = np.load(tmp_path / "c" / "features" / key / "done.npy")
    assert done.tolist() == [True] * 4 + [False] * 6
    calls = count_forwards(monkeypatch)
    fs = extract_features(model, prepared, cache_dir=tmp_path / "c", batch_size=2, progress=False)
    assert sum(calls) == 6
    np.testing.assert_allclose(fs.features, direct_features(model, prepared.array), rtol=1e-4, atol=1e-5)


def json_records(prepared) -> str:
    import json
    from dataclasses import asdict

    return json.dumps([asdict(r) for r in prepared.records])


def test_nan_features_name_model_and_record(prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model("test-tiny", weights="random")
    calls: list[int] = []
    real = ex._Runner._forward

    def poison(self, part):
        calls.append(1)
        out = real(self, part).clone()
        if len(calls) == 2:  # second batch of 4: row 1 is record 5
            out[1] = float("nan")
        return out

    monkeypatch.setattr(ex._Runner, "_forward", poison)
    with pytest.raises(FeatureError, match=r"test-tiny.*record 5 .*img5\.png"):
        extract_features(model, prepared, cache_dir=tmp_path / "c", batch_size=4, progress=False)
    key = features_key(model, prepared.key)
    assert not (tmp_path / "c" / "features" / key / "meta.json").exists()


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
    assert 0 < rel < ex.AUTOCAST_TOLERANCE["bf16"]  # bf16 really ran, and stayed within tolerance


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


def test_folded_trunk_made_once_per_model(prepared, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folds: list[int] = []
    real = ex.fold_batchnorm
    monkeypatch.setattr(ex, "fold_batchnorm", lambda trunk: (folds.append(1), real(trunk))[1])
    model = load_model("test-tiny", weights="random")
    extract_features(model, prepared, cache_dir=tmp_path / "a", progress=False)
    extract_features(model, prepared, cache_dir=tmp_path / "b", precision="bf16", progress=False)
    assert len(folds) == 1
    model.load_state_dict(load_model("test-tiny", weights="random", seed=2).state_dict())  # new weights
    fs = extract_features(model, prepared, cache_dir=tmp_path / "c", progress=False)
    assert len(folds) == 2
    np.testing.assert_allclose(fs.features, direct_features(model, prepared.array), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_compile_option_gives_same_features(prepared, tmp_path: Path) -> None:
    """torch.compile (inductor; about 30 s to compile on a small CPU) changes nothing but speed."""
    model = load_model("test-tiny", weights="random")
    a = extract_features(model, prepared, cache_dir=tmp_path / "a", compile=True, batch_size=5, progress=False)
    b = extract_features(model, prepared, cache_dir=tmp_path / "b", batch_size=5, progress=False)
    assert a.meta["compile"] and not b.meta["compile"]
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
