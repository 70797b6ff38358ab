"""Finetuning: contract, determinism, restoring the best weights, resume, search."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medxfer
from medxfer.models.backbone import state_dict_hash
from medxfer.protocols import finetune as ft
from medxfer.protocols.base import PROTOCOLS
from medxfer.testing import half_bright_prepared

FAST = dict(image_size=32, batch_size=8, max_steps=24, val_every=4, patience=2, eval_batch_size=64,
            crop_scale=[0.5, 1.0])


def tiny_prepared(n: int = 60, size: int = 32, seed: int = 0, channels: int = 3,
                  splits: tuple[str, ...] = ("train", "val", "test")):
    return half_bright_prepared(n, size, seed, channels, splits)


@pytest.fixture
def model():
    return medxfer.load_model("test-tiny", weights="random")


def test_result_contract_and_callers_model_untouched(model) -> None:
    prep = tiny_prepared()
    before = state_dict_hash(model.trunk)
    res = medxfer.finetune(model, prep, seed=0, device="cpu", **FAST)
    assert state_dict_hash(model.trunk) == before
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert res.protocol == "finetune"
    for key in ("accuracy", "mean_per_class_accuracy", "balanced_accuracy", "auroc", "headline", "lr"):
        assert key in res.metrics
    d = res.details
    assert d["restored"] and d["best_step"] in [c["step"] for c in d["val_curve"]]
    assert d["splits"] == {"n_train": 30, "n_val": 15, "n_test": 15, "val_source": "dataset"}
    json.dumps({"m": res.metrics, "p": res.params, "d": d}, allow_nan=False)
    assert PROTOCOLS.get("finetune").needs.images and PROTOCOLS.get("finetune").needs.accelerator == "gpu"


def test_learns_the_toy_task(model) -> None:
    res = medxfer.finetune(model, tiny_prepared(n=80), seed=0, device="cpu",
                           **{**FAST, "max_steps": 40, "patience": 10, "lr": 0.05})
    assert res.details["best_val"] >= 80.0


def test_deterministic_given_seed(model) -> None:
    prep = tiny_prepared()
    short = {**FAST, "max_steps": 8}
    a = medxfer.finetune(model, prep, seed=3, device="cpu", **short)
    b = medxfer.finetune(model, prep, seed=3, device="cpu", **short)
    c = medxfer.finetune(model, prep, seed=4, device="cpu", **short)
    assert a.metrics == b.metrics and a.details["val_curve"] == b.details["val_curve"]
    assert [v["loss"] for v in a.details["val_curve"]] != [v["loss"] for v in c.details["val_curve"]]


def test_augment_is_seeded_and_shaped() -> None:
    x = torch.from_numpy(tiny_prepared().array[:6]).permute(0, 3, 1, 2)
    a = ft.augment(x, 24, torch.Generator().manual_seed(0))
    b = ft.augment(x, 24, torch.Generator().manual_seed(0))
    c = ft.augment(x, 24, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == (6, 3, 24, 24)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = ft._crop_params(30, 40, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and h > 0 and w > 0


def _restore_check(model, monkeypatch, aliased: bool) -> tuple[float, float, dict]:
    """Finetune until early stopping; return (val loss of the returned net, recorded best val loss, details)."""
    # aliased: the original code's bug, a "best" state dict that references the live tensors
    snapshot = (lambda net: net.state_dict()) if aliased else ft.snapshot_state
    prep = tiny_prepared(n=64)
    params = ft.FinetuneParams(**{**FAST, "lr": 0.3, "patience": 1, "val_every": 2, "max_steps": 200,
                                  "crop_scale": (0.5, 1.0)})
    net, res = ft.finetune_model(model, prep, params, seed=0, device="cpu", snapshot=snapshot)
    sp = ft.many_shot_splits(prep.splits, prep.labels, val_fraction=0.2, val_seed=0, stratified=True)
    _, loss, _ = ft.evaluate_net(net, prep, sp.val, prep.labels, size=32, batch_size=64,
                                 device=torch.device("cpu"), amp=False, headline="accuracy")
    return loss, res.details["best_val_loss"], res.details


def test_best_weights_are_restored(model, monkeypatch) -> None:
    loss, best_loss, d = _restore_check(model, monkeypatch, aliased=False)
    assert d["stopped_early"] and d["best_step"] < d["steps"]  # the last weights are not the best
    assert loss == pytest.approx(best_loss, rel=1e-5, abs=1e-6)


def test_restore_check_catches_aliased_best_state(model, monkeypatch) -> None:
    loss, best_loss, d = _restore_check(model, monkeypatch, aliased=True)
    assert d["stopped_early"] and d["best_step"] < d["steps"]
    last_loss = d["val_curve"][-1]["loss"]
    # with aliasing the "restored" net is the last one: the check above would fail
    assert loss != pytest.approx(best_loss, rel=1e-5, abs=1e-6)
    assert loss == pytest.approx(last_loss, rel=1e-5, abs=1e-6)


class Killed(Exception):
    pass


def test_killed_run_resumes_to_the_same_result(model, tmp_path) -> None:
    prep = tiny_prepared()
    params = {**FAST, "patience": 100}
    reference = medxfer.finetune(model, prep, seed=1, device="cpu", **params)

    def kill(step: int) -> None:
        if step == 12:
            raise Killed

    typed = PROTOCOLS.get("finetune").make_params(params)
    with pytest.raises(Killed):
        ft.finetune_model(model, prep, typed, seed=1, device="cpu", workdir=tmp_path, on_checkpoint=kill)
    assert (tmp_path / ft.CHECKPOINT).is_file()
    resumed = medxfer.finetune(model, prep, seed=1, device="cpu", workdir=tmp_path, **params)
    assert resumed.details["resumed_from"] == 12
    assert resumed.metrics == reference.metrics
    assert resumed.details["val_curve"] == reference.details["val_curve"]
    assert (tmp_path / ft.FINAL).is_file() and not (tmp_path / ft.CHECKPOINT).exists()
    again = medxfer.finetune(model, prep, seed=1, device="cpu", workdir=tmp_path, **params)  # reuses final.pt
    assert again.metrics == reference.metrics
    other = medxfer.finetune(model, prep, seed=1, device="cpu", workdir=tmp_path, **{**params, "lr": 0.02})
    assert other.details["resumed_from"] is None  # different settings: the old run is not reused


def test_grid_search_records_trials_and_picks_best_on_validation(model, tmp_path) -> None:
    prep = tiny_prepared()
    res = medxfer.finetune(model, prep, seed=0, device="cpu", workdir=tmp_path,
                           search={"lr": [0.001, 0.05], "weight_decay": [1e-8]}, **FAST)
    trials = res.details["trials"]
    assert [(t["lr"], t["weight_decay"]) for t in trials] == [(0.001, 1e-8), (0.05, 1e-8)]
    best = max(range(2), key=lambda i: (trials[i]["best_val"], -trials[i]["best_val_loss"]))
    assert res.details["chosen_trial"] == best and res.metrics["lr"] == trials[best]["lr"]
    assert (tmp_path / "trial-00" / ft.FINAL).is_file() and (tmp_path / "trial-01" / ft.FINAL).is_file()


def test_random_search_is_seeded() -> None:
    spec = {"random": 4, "lr": [1e-4, 1e-1], "weight_decay": [1e-8, 1e-3]}
    a = ft.search_trials(spec, 0.01, 1e-8, seed=0)
    assert a == ft.search_trials(spec, 0.01, 1e-8, seed=0) and a != ft.search_trials(spec, 0.01, 1e-8, seed=1)
    assert all(1e-4 <= lr <= 1e-1 and 1e-8 <= wd <= 1e-3 for lr, wd in a)
    assert len(ft.search_trials(True, 0.01, 1e-8, seed=0)) == 9
    with pytest.raises(ValueError, match="unknown search key"):
        ft.search_trials({"momentum": [0.9]}, 0.01, 1e-8, seed=0)


def test_greyscale_and_carved_validation(model) -> None:
    prep = tiny_prepared(channels=1, splits=("train", "test"))
    res = medxfer.finetune(model, prep, seed=0, device="cpu", **{**FAST, "max_steps": 8})
    assert res.details["splits"]["val_source"] == "carved"


def test_bad_images_are_left_out(model) -> None:
    prep = tiny_prepared()
    prep.bad = [0, 1, 40]  # rows prepare could not decode (zeros)
    res = medxfer.finetune(model, prep, seed=0, device="cpu", **{**FAST, "max_steps": 4})
    assert res.details["splits"]["n_train"] == 28 and res.details["splits"]["n_val"] == 14
    assert res.details["splits"]["n_test"] == 15 and res.details["skipped_bad_images"] == 3


def test_clear_errors(model) -> None:
    prep = tiny_prepared(splits=("train", "val"))
    with pytest.raises(ValueError, match="no 'test' split"):
        medxfer.finetune(model, prep, device="cpu", **FAST)
    with pytest.raises(ValueError, match="unknown '--set finetune.learning_rate'"):
        medxfer.finetune(model, tiny_prepared(), device="cpu", learning_rate=0.1)
    with pytest.raises(ValueError, match="crop_scale=0.5: expected"):
        medxfer.finetune(model, tiny_prepared(), device="cpu", crop_scale=0.5)
    with pytest.raises(ValueError, match="unknown search key"):
        medxfer.finetune(model, tiny_prepared(), device="cpu", search={"momentum": [0.9]})


def test_autocast_precision_enters_the_run_key() -> None:
    """bf16/fp16 autocast on a GPU and fp32 on a CPU give different numbers: different keys."""
    proto = PROTOCOLS.get("finetune")
    p = proto.make_params()
    assert proto.key_extras(p, "cpu") == {"autocast": "fp32"}
    assert proto.key_extras(proto.make_params({"amp": False}), "cuda") == {"autocast": "fp32"}
    if torch.cuda.is_available():
        assert proto.key_extras(p, "cuda")["autocast"] in ("bf16", "fp16")


def test_finetune_shows_progress(model, capfd) -> None:
    from medxfer.progress import forced

    with forced(True):
        medxfer.finetune(model, tiny_prepared(), seed=0, device="cpu", **{**FAST, "max_steps": 4})
    assert "finetune test-tiny" in capfd.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_run(model) -> None:
    res = medxfer.finetune(model, tiny_prepared(), seed=0, device="cuda", **FAST)
    assert res.details["amp"] and res.details["device"].startswith("cuda")


def test_training_crops_come_from_whole_images_not_the_padding() -> None:
    """With a whole-image store every RandomResizedCrop lies inside the image's own extent."""
    g = torch.Generator().manual_seed(0)
    canvas = torch.zeros(4, 3, 60, 90, dtype=torch.uint8)
    extents = np.array([[40, 90], [60, 30], [20, 20], [60, 90]])
    for i, (h, w) in enumerate(extents):
        canvas[i, :, :h, :w] = 200
    for _ in range(20):
        out = ft.augment(canvas, 24, g, extents=extents)
        assert out.shape == (4, 3, 24, 24) and int(out.min()) >= 150  # never the zero padding


def test_pipeline_finetunes_from_the_whole_image_store(tmp_path) -> None:
    from medxfer.config import DatasetArg, RunSpec
    from medxfer.pipeline import run
    from medxfer.testing import write_stripes_blobs

    data = write_stripes_blobs(tmp_path / "data", n_per_class=16, size=48)
    spec = RunSpec(models=("test-tiny",), datasets=(DatasetArg.parse(f"toy=folder:{data}"),), protocols=("finetune",),
                   weights="random", image_size=32, out=str(tmp_path / "out"),
                   protocol_params={"finetune": {**{k: v for k, v in FAST.items() if k != "eval_batch_size"},
                                                 "max_steps": 4, "train_size": 40}})
    r = run(spec, progress=False).results[0]
    assert r.details["train_crops_from"].startswith("whole images, shorter side 40")
    assert "prepared:40:keep" in r.inputs and not any("evaluation crops" in w for w in r.warnings)
    direct = medxfer.finetune(medxfer.load_model("test-tiny", weights="random"), tiny_prepared(), device="cpu",
                              **{**FAST, "max_steps": 4})
    assert any("evaluation crops" in w for w in direct.warnings)  # said so when there is no training store
