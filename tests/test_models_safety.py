"""Untrusted checkpoints: no code execution, clear errors for corrupt or mismatched files."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from medxfer.models import MODELS, CheckpointError, UnsafeCheckpointError, build_trunk, load_model
from medxfer.models.checkpoint import (
    drop_heads,
    keep_prefix,
    load_trunk_state,
    read_converted,
    read_torch,
    trunk_from_state,
)
from medxfer.models.fetch import fetch
from medxfer.models.safe_pickle import load_pickle


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDXFER_OFFLINE", "1")


class _Evil:
    """Unpickling this runs a shell command (if the unpickler lets it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


def _r18_state() -> dict[str, torch.Tensor]:
    return build_trunk("resnet18", seed=3).state_dict()


@pytest.mark.parametrize("evil_cls", [_Evil, _EvalEvil])
def test_malicious_pickle_is_refused_without_executing(tmp_path: Path, evil_cls: type) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "pretrain_res50x1.pkl"
    with open(path, "wb") as f:
        pickle.dump({"experiment_state": (evil_cls(marker),), "step": 1}, f)
    with pytest.raises(UnsafeCheckpointError, match=r"refusing to load global (posix|os|nt|builtins)\.(system|eval)"):
        load_pickle(path)
    with pytest.raises(CheckpointError):  # through the BYOL pipeline too
        fetch("byol", source=path, verify_hash=False)
    assert not marker.exists()


def test_malicious_torch_checkpoint_is_refused_without_executing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save({"state_dict": _r18_state(), "extra": _Evil(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_torch(path)
    with pytest.raises(CheckpointError):
        fetch("supervised-r18", source=path, verify_hash=False)
    assert not marker.exists()


def test_framework_classes_become_inert(tmp_path: Path) -> None:
    """argparse.Namespace in a checkpoint is data only: it is replaced, its methods never run."""
    import argparse

    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    obj = read_torch(path)
    assert torch.equal(obj["state_dict"]["w"], torch.ones(2))
    assert type(obj["args"]).__module__.startswith("medxfer.inert.")
    assert not isinstance(obj["args"], argparse.Namespace)


def test_plain_state_dict_uses_weights_only_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import argparse

    path = tmp_path / "sd.pth"
    torch.save(_r18_state(), path)
    with caplog.at_level("INFO", logger="medxfer"):
        assert set(read_torch(path)) == set(_r18_state())
    assert "restricted unpickler" not in caplog.text  # torch.load(weights_only=True) was enough
    extra = tmp_path / "extra.pth"
    torch.save({"state_dict": _r18_state(), "args": argparse.Namespace(lr=0.1)}, extra)
    with caplog.at_level("INFO", logger="medxfer"):
        read_torch(extra)
    assert "retrying with the restricted unpickler" in caplog.text  # and the log says when it is not


def test_numpy_only_pickle_loads(tmp_path: Path) -> None:
    path = tmp_path / "x.pkl"
    data = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": [np.int64(3), {"c": np.ones(2)}]}
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=4)
    out = load_pickle(path)
    np.testing.assert_array_equal(out["a"], data["a"])
    assert out["b"][0] == 3


@pytest.mark.parametrize("cut", [0.5, 0.99])
def test_truncated_torch_checkpoint(tmp_path: Path, cut: float) -> None:
    full = tmp_path / "full.pth"
    torch.save({"state_dict": _r18_state()}, full)
    data = full.read_bytes()
    bad = tmp_path / "moco-cut.pth.tar"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match="moco-cut.pth.tar"):
        read_torch(bad)


def test_truncated_and_garbage_pickles(tmp_path: Path) -> None:
    good = tmp_path / "g.pkl"
    with open(good, "wb") as f:
        pickle.dump({"experiment_state": ({"x": np.ones(100)},)}, f)
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(good.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="cut.pkl"):
        load_pickle(cut)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="junk.pth"):
        read_torch(junk)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_torch(empty)
    with pytest.raises(CheckpointError, match="not found"):
        read_torch(tmp_path / "nope.pth")


def test_mismatched_architecture_lists_keys(tmp_path: Path) -> None:
    path = tmp_path / "r18.pth"
    torch.save(_r18_state(), path)
    with pytest.raises(CheckpointError) as info:
        fetch("supervised-r50", source=path, verify_hash=False)
    msg = str(info.value)
    assert "r18.pth" in msg and "missing" in msg and "shape mismatch" in msg
    assert "layer1.0.conv3.weight" in msg  # an R50-only key named


def test_missing_and_unexpected_keys_are_named() -> None:
    sd = _r18_state()
    del sd["layer4.1.bn2.running_var"]
    sd["layer5.0.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as info:
        trunk_from_state("resnet18", sd, source="mine.pth")
    msg = str(info.value)
    assert "1 missing: ['layer4.1.bn2.running_var']" in msg
    assert "1 unexpected: ['layer5.0.weight']" in msg
    assert msg.startswith("mine.pth")


def test_only_num_batches_tracked_may_be_missing() -> None:
    sd = {k: v for k, v in _r18_state().items() if not k.endswith("num_batches_tracked")}
    trunk = trunk_from_state("resnet18", sd, source="x")
    assert all(torch.equal(trunk.state_dict()[k], v) for k, v in sd.items())
    assert trunk.state_dict()["bn1.num_batches_tracked"].item() == 0
    target = build_trunk("resnet18", seed=9)
    load_trunk_state(target, sd, source="x")
    assert torch.equal(target.state_dict()["conv1.weight"], sd["conv1.weight"])


def test_non_finite_weights_refused() -> None:
    sd = _r18_state()
    sd["conv1.weight"] = sd["conv1.weight"].clone()
    sd["conv1.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="non-finite.*conv1.weight"):
        trunk_from_state("resnet18", sd, source="nan.pth")


def test_prefix_and_heads_match_by_prefix_not_substring() -> None:
    t = torch.zeros(1)
    sd = {"module.encoder_q.conv1.weight": t, "module.encoder_k.conv1.weight": t, "module.queue": t}
    assert list(keep_prefix(sd, "module.encoder_q.", "x")) == ["conv1.weight"]
    with pytest.raises(CheckpointError, match="prefix 'model.encoder_q.'"):
        keep_prefix(sd, "model.encoder_q.", "x")
    kept = drop_heads({"fc.0.weight": t, "fc_norm.weight": t, "layer1.fc.weight": t}, ("fc.",))
    assert sorted(kept) == ["fc_norm.weight", "layer1.fc.weight"]


def test_wrong_container_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "moco.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet18", "state_dict": {"module.encoder_q.conv1.weight": "oops"}}, path)
    with pytest.raises(CheckpointError, match="not tensors"):
        fetch("moco-cxr-r18", source=path, verify_hash=False)


def test_from_file_is_verified_against_published_hash(tmp_path: Path) -> None:
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(_r18_state(), path)
    with pytest.raises(CheckpointError, match=r"sha256 .* f37072fd.*--no-verify"):
        fetch("supervised-r18", source=path)
    assert fetch("supervised-r18", source=path, verify_hash=False).is_file()


def test_load_model_from_converted_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    sd = _r18_state()
    st = tmp_path / "t.safetensors"
    save_file(sd, str(st))
    pth = tmp_path / "t.pth"
    torch.save({"state_dict": sd}, pth)
    for path in (st, pth):
        m = load_model("supervised-r18", weights=str(path))
        assert m.weights == f"file {path}" and not m.is_random
        assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_converted(bad)


def test_random_weights_labelled_and_seeded() -> None:
    state = torch.random.get_rng_state()
    a, b = load_model("supervised-r18", "random", seed=5), load_model("supervised-r18", "random", seed=5)
    c = load_model("supervised-r18", "random", seed=6)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert a.is_random and a.weights == "random init (seed 5)"
    assert a.weights_hash == b.weights_hash != c.weights_hash
    assert not any(m.training for m in a.modules())
    assert not any(p.requires_grad for p in a.parameters())


def test_test_tiny_has_no_pretrained_weights() -> None:
    from medxfer.models import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="--weights random"):
        load_model("test-tiny")
    assert MODELS.get("test-tiny").family == "random"


@pytest.mark.parametrize("protocol", [2, 4])
def test_dangerous_globals_refused_and_plain_types_allowed(tmp_path: Path, protocol: int) -> None:
    import builtins
    import pathlib
    import subprocess
    import typing

    for evil in (getattr, builtins.__import__, eval, exec, open, subprocess.Popen, os.system):
        path = tmp_path / "evil.pkl"
        path.write_bytes(pickle.dumps({"x": evil}, protocol=protocol))
        with pytest.raises(UnsafeCheckpointError, match="nothing was executed"):
            load_pickle(path)
    path = tmp_path / "ok.pkl"
    path.write_bytes(pickle.dumps({"any": typing.Any, "t": dict, "s": {1, 2}, "b": b"\x00\xff",
                                   "p": pathlib.PurePosixPath("/data")}, protocol=protocol))
    out = load_pickle(path)
    assert out["any"] is typing.Any and out["t"] is dict and out["s"] == {1, 2} and out["b"] == b"\x00\xff"
    assert type(out["p"]).__module__ == "medxfer.inert.pathlib"  # a stand-in, not a real path object
