"""Custom checkpoints: --models NAME=ARCH:PATH[:prefix], YAML entries, plugins, the fetch verb."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medxfer.models import (
    MODELS,
    CheckpointError,
    ModelSpec,
    build_trunk,
    is_cached,
    load_model,
    load_model_file,
    resolve_model_arg,
)
from medxfer.registry import Registry, UnknownNameError


@pytest.fixture(autouse=True)
def _restore_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Custom models registered by a test are removed afterwards."""
    monkeypatch.setenv("MEDXFER_OFFLINE", "1")
    items, aliases = dict(MODELS._items), dict(MODELS._aliases)
    yield
    MODELS._items.clear()
    MODELS._items.update(items)
    MODELS._aliases.clear()
    MODELS._aliases.update(aliases)


@pytest.fixture
def r18() -> dict[str, torch.Tensor]:
    return build_trunk("resnet18", seed=11).state_dict()


def _same(model_sd: dict, src: dict) -> bool:
    return all(torch.equal(model_sd[k], v) for k, v in src.items())


def test_registered_names_and_aliases() -> None:
    assert resolve_model_arg("moco") == "moco-v2"
    assert resolve_model_arg(" SimCLR ") == "simclr-v1"
    with pytest.raises(UnknownNameError, match="Did you mean 'byol'"):
        resolve_model_arg("byo")


def test_custom_plain_checkpoint_with_head(tmp_path: Path, r18: dict) -> None:
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": {**r18, "fc.weight": torch.zeros(3, 512), "fc.bias": torch.zeros(3)}}, path)
    assert resolve_model_arg(f"mine=resnet18:{path}") == "mine"
    assert resolve_model_arg(f"mine=resnet18:{path}") == "mine"  # idempotent
    spec = MODELS.get("mine")
    assert spec.prefix == "" and spec.feature_dim == 512 and spec.family == "custom"
    assert not is_cached(spec)
    model = load_model("mine")  # converted from the local file, no network
    assert is_cached(spec) and _same(model.state_dict(), r18)
    assert model.features(torch.zeros(1, 1, 32, 32, dtype=torch.uint8)).shape == (1, 512)


def test_custom_moco_checkpoint_needs_a_prefix_choice(tmp_path: Path, r18: dict) -> None:
    k = {n: v + 1 if v.is_floating_point() else v for n, v in r18.items()}
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": {**{f"module.encoder_q.{n}": v for n, v in r18.items()},
                               **{f"module.encoder_k.{n}": v for n, v in k.items()},
                               "module.queue": torch.zeros(128, 16)}}, path)
    with pytest.raises(CheckpointError, match="several prefixes.*module.encoder_k.*module.encoder_q"):
        resolve_model_arg(f"cxr=resnet18:{path}")
    assert resolve_model_arg(f"cxr=resnet18:{path}:module.encoder_q.") == "cxr"
    assert _same(load_model("cxr").state_dict(), r18)
    with pytest.raises(ValueError, match="already registered with different settings"):
        resolve_model_arg(f"cxr=resnet18:{path}:module.encoder_k.")


def test_custom_model_cache_follows_the_file(tmp_path: Path, r18: dict) -> None:
    path = tmp_path / "mine.pth"
    torch.save(r18, path)
    resolve_model_arg(f"mine=resnet18:{path}")
    first = load_model("mine").weights_hash
    other = build_trunk("resnet18", seed=12).state_dict()
    before = path.stat()
    torch.save(other, path)  # the user retrains and overwrites the file
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))  # robust on coarse clocks
    MODELS._items.pop("mine")
    resolve_model_arg(f"mine=resnet18:{path}")
    second = load_model("mine")
    assert second.weights_hash != first and _same(second.state_dict(), other)


def test_custom_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="NAME=ARCH:/path"):
        resolve_model_arg("bad=resnet18")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model_arg(f"x=resnet18:{tmp_path / 'missing.pth'}")
    path = tmp_path / "d.pth"
    torch.save(build_trunk("resnet18").state_dict(), path)
    with pytest.raises(UnknownNameError, match="architecture"):
        resolve_model_arg(f"x=resnet5O:{path}")
    with pytest.raises(CheckpointError, match="no key prefix holds a complete densenet121"):
        resolve_model_arg(f"x=densenet121:{path}")
    with pytest.raises(ValueError, match="built-in model"):
        resolve_model_arg(f"byol=resnet18:{path}")


def test_yaml_model_file(tmp_path: Path, r18: dict) -> None:
    (tmp_path / "ckpts").mkdir()
    torch.save({"model": {f"backbone.{k}": v for k, v in r18.items()}}, tmp_path / "ckpts" / "a.pth")
    yml = tmp_path / "models.yaml"
    yml.write_text(
        "models:\n"
        "  - name: my-cxr\n"
        "    arch: resnet18\n"
        "    checkpoint: ckpts/a.pth\n"
        "    prefix: backbone.\n"
        "    normalization: histeq\n"
        "    licence: CC-BY 4.0\n"
    )
    assert load_model_file(yml) == ["my-cxr"]
    spec = MODELS.get("my-cxr")
    assert spec.normalization == "histeq" and spec.licence == "CC-BY 4.0"
    assert _same(load_model("my-cxr").state_dict(), r18)

    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: x\n    arch: resnet18\n    checkpont: a.pth\n")
    with pytest.raises(ValueError, match=r"bad.yaml: models\[0\]: unknown keys \['checkpont'\], missing keys \['checkpoint'\]"):
        load_model_file(bad)
    bad.write_text("name: x\n")
    with pytest.raises(ValueError, match="models:"):
        load_model_file(bad)


def test_register_model_from_python(tmp_path: Path, r18: dict) -> None:
    path = tmp_path / "p.pth"
    torch.save(r18, path)
    import medxfer

    medxfer.register_model(ModelSpec(name="py-model", arch="resnet18", family="custom",
                                     path=str(path), fmt="auto", drop=("fc.",)))
    assert _same(load_model("py-model").state_dict(), r18)


def test_entry_point_plugin_registers_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib import metadata

    class FakeEntryPoint:
        name = "myplugin"

        def load(self):
            def hook(registry: Registry) -> None:
                registry.register("plugin-r18", ModelSpec(name="plugin-r18", arch="resnet18", family="custom",
                                                          fmt="none"))
            return hook

    calls = []

    def fake_entry_points(group: str):
        calls.append(group)
        return [FakeEntryPoint()] if group == "medxfer.models" else []

    monkeypatch.setattr(metadata, "entry_points", fake_entry_points)
    registry: Registry[ModelSpec] = Registry("model", MODELS.entry_point_group)
    assert "plugin-r18" in registry.names() and calls == ["medxfer.models"]


def test_fetch_cli(tmp_path: Path, r18: dict, capsys: pytest.CaptureFixture[str]) -> None:
    from medxfer.cli import main

    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save({**r18, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    cache = tmp_path / "cache"
    assert main(["fetch", "supervised-r18", "--from", str(path), "--cache-dir", str(cache)]) == 1  # hash differs
    assert "--no-verify" in capsys.readouterr().err
    assert main(["fetch", "r18", "--from", str(path), "--no-verify", "--cache-dir", str(cache), "-q"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("supervised-r18: ") and str(cache) in out
    assert _same(load_model("supervised-r18", cache_dir=cache).state_dict(), r18)
    assert main(["fetch", "byol", "--offline", "--cache-dir", str(cache)]) == 1
    err = capsys.readouterr().err
    assert "medxfer fetch byol --from" in err and "pretrain_res50x1.pkl" in err
    assert main(["fetch", "byol", "swav", "--from", str(path)]) == 2
