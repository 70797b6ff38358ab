"""Every zoo model loads from a checkpoint fabricated in its exact original format.

Each fabricator takes a random trunk state dict (torchvision names) and wraps it the way the
published file does: containers, prefixes, heads, momentum encoders, queues, optimiser
state; BYOL as a Haiku pickle built by inverting the documented mapping; DenseNet with
legacy key names. The test asserts the converted trunk equals the source exactly.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import pickle
import re
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medxfer.models import ARCHS, MODELS, build_trunk, is_cached, load_model
from medxfer.models.fetch import fetch
from medxfer.models.spec import ModelSpec

SD = dict[str, torch.Tensor]


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("MEDXFER_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # these tests move large tensors; one thread is fastest on a shared CPU
    yield
    torch.set_num_threads(threads)


def _rand_like(sd: SD, seed: int) -> SD:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()) for k, v in sd.items()}


def source_trunk(spec: ModelSpec, seed: int = 1) -> SD:
    return dict(_source_trunk(spec.arch, seed))


@functools.lru_cache(maxsize=4)
def _source_trunk(arch: str, seed: int) -> SD:
    """Random weights for the trunk: a seeded initialisation plus noise on every float tensor
    (running statistics included, variances kept positive), so nothing equals a default."""
    sd = build_trunk(arch, seed=seed).state_dict()
    noise = _rand_like(sd, seed + 100)
    out: SD = {}
    for k, v in sd.items():
        if k.endswith("num_batches_tracked"):
            out[k] = torch.tensor(1234)
        elif k.endswith("running_var"):
            out[k] = 1.0 + 0.1 * noise[k].abs()
        else:
            out[k] = v + 0.01 * noise[k]
    return out


def _linear(prefix: str, out_f: int, in_f: int, seed: int) -> SD:
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}weight": torch.randn(out_f, in_f, generator=g), f"{prefix}bias": torch.randn(out_f, generator=g)}


def _head_in(spec: ModelSpec) -> int:
    return ARCHS.get(spec.arch).feature_dim


def _prefixed(prefix: str, sd: SD) -> SD:
    return {prefix + k: v for k, v in sd.items()}


@contextlib.contextmanager
def fake_module(name: str, **attrs: object) -> Iterator[types.ModuleType]:
    """Temporarily make ``name`` importable (with its parents) so pickle can save by reference."""
    parts = name.split(".")
    added = []
    for i in range(1, len(parts) + 1):
        mod_name = ".".join(parts[:i])
        if mod_name not in sys.modules:
            sys.modules[mod_name] = types.ModuleType(mod_name)
            added.append(mod_name)
    mod = sys.modules[name]
    for k, v in attrs.items():
        v.__module__ = name  # type: ignore[attr-defined]
        v.__qualname__ = k  # type: ignore[attr-defined]
        setattr(mod, k, v)
    try:
        yield mod
    finally:
        for mod_name in reversed(added):
            del sys.modules[mod_name]


def _save(obj: object, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def _to_legacy_densenet(sd: SD) -> SD:
    """The 2017 torchvision file's names: denselayerN.norm.1.weight instead of norm1."""
    pat = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))([12])\.(.*)$")
    return {(pat.sub(r"\1.\2.\3", k)): v for k, v in sd.items()}


# ----------------------------------------------------------------------------- fabricators
def fab_torchvision(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    head = {"resnet": "fc.", "densenet": "classifier.", "vit_b_16": "heads.head."}
    key = next(v for k, v in head.items() if spec.arch.startswith(k))
    full = {**sd, **_linear(key, 1000, _head_in(spec), 7)}
    if spec.arch.startswith("densenet"):
        full = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}  # 2017 file
        full = _to_legacy_densenet(full)
        assert any(".norm.1." in k for k in full)
    return _save(full, tmp / spec.filename)


def fab_simclr_converted(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    return _save({"state_dict": {**sd, **_linear("fc.", 1000, 2048, 3)}}, tmp / "resnet50-1x.pth")


def _moco_state(spec: ModelSpec, sd: SD, root: str, head: str) -> SD:
    dim = _head_in(spec)
    q = {**sd, **_linear(f"{head}0.", dim, dim, 4), **_linear(f"{head}2.", 128, dim, 5)}
    k = _rand_like(q, 9)
    return {**_prefixed(f"{root}encoder_q.", q), **_prefixed(f"{root}encoder_k.", k),
            f"{root}queue": torch.randn(128, 4096), f"{root}queue_ptr": torch.zeros(1, dtype=torch.long)}


def _optimizer_state() -> dict:
    return {"state": {0: {"momentum_buffer": torch.randn(3)}},
            "param_groups": [{"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "params": [0]}]}


def fab_moco(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    head = "classifier." if spec.arch.startswith("densenet") else "fc."
    ckpt = {"epoch": 200, "arch": spec.arch, "state_dict": _moco_state(spec, sd, "module.", head),
            "optimizer": _optimizer_state()}
    return _save(ckpt, tmp / spec.filename, legacy=spec.name == "moco-v2")  # MoCo v2 predates zip files


def fab_pycontrast(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    model = {**_prefixed("module.encoder.", sd), **_linear("module.head.fc.", 128, 2048, 11),
             **_linear("module.head_jig.fc1.", 128, 2048 * 9, 12)}
    ckpt = {"model": model, "contrast": {"memory": torch.randn(16, 128), "params": torch.tensor([-1.0, 0.07])},
            "optimizer": _optimizer_state(), "epoch": 800}
    return _save(ckpt, tmp / spec.filename)


def fab_swav(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    extra: SD = {}
    if spec.name == "swav":
        extra = {**_linear("module.projection_head.0.", 2048, 2048, 13), "module.projection_head.1.weight": torch.randn(2048),
                 **_linear("module.projection_head.3.", 128, 2048, 14), "module.prototypes.weight": torch.randn(3000, 128)}
        return _save({**_prefixed("module.", sd), **extra}, tmp / spec.filename)
    return _save(dict(sd), tmp / spec.filename)  # DINO / Barlow Twins / VICReg: bare trunk


def fab_lightning(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    """A Lightning checkpoint whose hyper_parameters need classes torch won't load by default."""
    class AttributeDict(dict):
        pass

    with fake_module("pytorch_lightning.utilities.parsing", AttributeDict=AttributeDict):
        hp = AttributeDict(arch="densenet121", learning_rate=float(spec.name.split("lr")[1]), feature_dim=128,
                           queue_size=65536, args=argparse.Namespace(batch_size=128, data="mimic"))
        ckpt = {"epoch": 199, "global_step": 12345, "pytorch-lightning_version": "1.1.8",
                "state_dict": _moco_state(spec, sd, "model.", "classifier."),
                "callbacks": {}, "optimizer_states": [_optimizer_state()], "lr_schedulers": [],
                "hparams_name": "kwargs", "hyper_parameters": hp}
        path = _save(ckpt, tmp / spec.filename)
    with pytest.raises(pickle.UnpicklingError):  # the fallback is really exercised
        torch.load(path, weights_only=True)
    return path


def haiku_from_torchvision(sd: SD) -> tuple[dict, dict]:
    """Invert the documented BYOL mapping: torchvision R50 -> Haiku (params, state)."""
    params: dict[str, dict[str, np.ndarray]] = {}
    state: dict[str, dict[str, np.ndarray]] = {}

    def module_name(tv: str) -> str:
        if tv in ("conv1", "bn1"):
            return {"conv1": "initial_conv", "bn1": "initial_batchnorm"}[tv]
        m = re.match(r"layer(\d)\.(\d+)\.(conv|bn|downsample\.)(\d)", tv)
        assert m, tv
        g, b, kind, k = int(m[1]) - 1, int(m[2]), m[3], int(m[4])
        inner = {"conv": f"conv_{k - 1}", "bn": f"batchnorm_{k - 1}",
                 "downsample.": "shortcut_conv" if k == 0 else "shortcut_batchnorm"}[kind]
        return f"block_group_{g}/~/block_{b}/~/{inner}"

    for key, t in sd.items():
        mod, leaf = key.rsplit(".", 1)
        path = "res_net50/~/" + module_name(mod)
        a = t.numpy()
        if leaf == "num_batches_tracked":
            continue
        if leaf == "weight" and a.ndim == 4:
            params.setdefault(path, {})["w"] = np.ascontiguousarray(a.transpose(2, 3, 1, 0))
        elif leaf in ("weight", "bias"):
            params.setdefault(path, {})["scale" if leaf == "weight" else "offset"] = a.reshape(1, 1, 1, -1).copy()
        else:
            ema = "mean_ema" if leaf == "running_mean" else "var_ema"
            state[f"{path}/~/{ema}"] = {"counter": np.array(1000, np.int32), "hidden": a.reshape(1, 1, 1, -1) * 0.9,
                                        "average": a.reshape(1, 1, 1, -1).copy()}
    return params, state


def fab_byol_haiku(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    params, state = haiku_from_torchvision(sd)
    rng = np.random.default_rng(0)
    # heads (shrunk: only their presence matters) that the prefix must drop
    params["projector/~/linear"] = {"w": rng.standard_normal((32, 16)).astype(np.float32), "b": np.zeros(16, np.float32)}
    params["predictor/~/linear_1"] = {"w": rng.standard_normal((16, 8)).astype(np.float32)}
    params["classifier/~/linear"] = {"w": rng.standard_normal((32, 10)).astype(np.float32)}
    # the target network differs (and is a subset here): taking it instead of the online one fails
    target = {k: {n: a * 0.5 for n, a in v.items()} for k, v in list(params.items())[:5]}
    State = collections.namedtuple("_ByolExperimentState", "online_params target_params online_state target_state opt_state")
    LarsState = collections.namedtuple("LarsState", "mu")
    with fake_module("byol.byol_experiment", _ByolExperimentState=State), \
            fake_module("byol.utils.optimizers", LarsState=LarsState):
        exp = State(params, target, state, state, LarsState(mu=target))
        path = tmp / spec.filename
        with open(path, "wb") as f:
            pickle.dump({"experiment_state": exp, "step": np.int64(300000),
                         "rng": np.array([0, 42], np.uint32)}, f, protocol=2)
    return path


def fab_dinov2(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    return _save({**sd, "mask_token": torch.zeros(1, ARCHS.get(spec.arch).feature_dim)}, tmp / spec.filename)


def timm_to_hf_dinov2(sd: SD) -> SD:
    """Invert the documented HuggingFace Dinov2Model mapping (transformers' modeling_dinov2 names)."""
    top = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    inner = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.fc1",
             "mlp.fc2": "mlp.fc2"}
    out: SD = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v.clone()
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", k)
        assert m, k
        i, mod, leaf = m.groups()
        base = f"encoder.layer.{i}."
        if mod == "attn.qkv":
            for name, part in zip(("query", "key", "value"), v.chunk(3, dim=0)):
                out[f"{base}attention.attention.{name}.{leaf}"] = part.clone()
        elif mod in ("ls1", "ls2"):
            out[f"{base}layer_scale{mod[-1]}.lambda1"] = v.clone()
        else:
            out[f"{base}{inner[mod]}.{leaf}"] = v.clone()
    return out


def fab_hf_dinov2(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    """The hub's model.safetensors of a Dinov2Model (RAD-DINO, Phikon-v2): HF names, a mask token."""
    from safetensors.torch import save_file

    hf = timm_to_hf_dinov2(sd)
    assert "encoder.layer.0.attention.attention.query.weight" in hf and "encoder.layer.0.layer_scale1.lambda1" in hf
    hf["embeddings.mask_token"] = torch.zeros(1, ARCHS.get(spec.arch).feature_dim)
    path = tmp / spec.filename
    save_file(hf, str(path))
    return path


def fab_mae(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    """An MAE pretraining checkpoint (RETFound_cfp_weights.pth): encoder + decoder under 'model',
    optimiser, epoch, loss scaler and the argparse Namespace of its run."""
    d = ARCHS.get(spec.arch).feature_dim
    g = torch.Generator().manual_seed(21)
    dec = 32  # the real decoder is 512-d, 8 blocks: only its names matter here
    decoder = {"mask_token": torch.randn(1, 1, dec, generator=g), "decoder_pos_embed": torch.randn(1, 5, dec, generator=g),
               **_linear("decoder_embed.", dec, d, 22), "decoder_norm.weight": torch.ones(dec),
               "decoder_norm.bias": torch.zeros(dec), **_linear("decoder_pred.", 16 * 16 * 3, dec, 23),
               **_linear("decoder_blocks.0.attn.qkv.", 3 * dec, dec, 24), "decoder_blocks.0.norm1.weight": torch.ones(dec)}
    ckpt = {"model": {**sd, **decoder}, "optimizer": _optimizer_state(), "epoch": 799,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 0},
            "args": argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75, norm_pix_loss=True,
                                       data_path="/data/fundus", blr=1.5e-4)}
    path = _save(ckpt, tmp / spec.filename)
    with pytest.raises(pickle.UnpicklingError):  # the Namespace needs the restricted unpickler
        torch.load(path, weights_only=True)
    return path


def fab_xrv_pickle(spec: ModelSpec, sd: SD, tmp: Path) -> Path:
    """torch.save(model) of a torchxrayvision.models.DenseNet: the module classes pickled by
    reference (torchxrayvision.models.DenseNet, _DenseBlock, _DenseLayer, _Transition and
    torch.nn's), the 18-pathology classifier, a None op_threshs buffer, 1-channel conv0."""
    model = build_trunk(spec.arch)
    model.classifier = torch.nn.Linear(1024, 18)
    model.register_buffer("op_threshs", None)
    full = {**sd, **_linear("classifier.", 18, 1024, 25)}
    model.load_state_dict(full)
    classes: dict[str, type] = {}
    for tv_name in ("DenseNet", "_DenseBlock", "_DenseLayer", "_Transition"):
        base = next(type(m) for m in model.modules() if type(m).__name__ == tv_name)
        classes[tv_name] = type(tv_name, (base,), {})
    with fake_module("torchxrayvision.models", **classes):
        for mod in model.modules():
            cls = classes.get(type(mod).__name__)
            if cls is not None:
                mod.__class__ = cls
        path = tmp / spec.filename
        torch.save(model, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    return path


FABRICATORS: dict[str, Callable[[ModelSpec, SD, Path], Path]] = {
    "torchvision": fab_torchvision, "simclr-converted": fab_simclr_converted, "moco": fab_moco,
    "pycontrast": fab_pycontrast, "swav": fab_swav, "lightning": fab_lightning, "byol-haiku": fab_byol_haiku,
    "dinov2": fab_dinov2, "hf-dinov2": fab_hf_dinov2, "mae": fab_mae, "xrv-pickle": fab_xrv_pickle,
}
LARGE_ARCHS = ("dinov2_vitl16", "mae_vitl16")  # ViT-L: 1.2 GB per copy, exercised in the slow suite
ZOO = [pytest.param(n, marks=pytest.mark.slow) if s.arch in LARGE_ARCHS else n
       for n, s in MODELS.items() if s.base is None and s.fmt in FABRICATORS and s.path is None]
ZOO_NAMES = [n for n, s in MODELS.items() if s.base is None and s.fmt in FABRICATORS and s.path is None]


def test_every_downloadable_spec_has_a_fabricator() -> None:
    untested = [n for n, s in MODELS.items() if s.base is None and s.fmt not in ("none",) and s.fmt not in FABRICATORS
                and s.path is None]
    assert untested == []
    assert {n for n, s in MODELS.items() if s.in_paper} <= set(ZOO_NAMES)
    assert {"xrv-densenet121-all", "rad-dino", "retfound-mae", "phikon-v2"} <= set(ZOO_NAMES)
    assert len([n for n, s in MODELS.items() if s.in_paper]) == 13


def _input_size(arch: str) -> int:
    return {"vit_b_16": 224, "dinov2_vits14": 28, "dinov2_vitb14": 28}.get(arch, 32)  # ViT-L/16s: 32 = 2 x 2 patches


@pytest.mark.parametrize("name", ZOO)
def test_loads_from_fabricated_original(name: str, tmp_path: Path) -> None:
    spec = MODELS.get(name)
    src = source_trunk(spec)
    path = FABRICATORS[spec.fmt](spec, src, tmp_path)
    assert not is_cached(spec)
    out = fetch(name, source=path, verify_hash=False)
    assert is_cached(spec) and out.is_file()

    model = load_model(name)  # from the cache, no network
    loaded = model.state_dict()
    assert set(loaded) == set(src)
    for k, v in src.items():
        if k.endswith("num_batches_tracked") and k not in loaded:
            continue
        if spec.fmt == "torchvision" and spec.arch.startswith("densenet") and k.endswith("num_batches_tracked"):
            assert loaded[k].item() == 0  # the 2017 file has none: default kept
            continue
        if spec.fmt == "byol-haiku" and k.endswith("num_batches_tracked"):
            continue
        assert torch.equal(loaded[k], v), k
    cached = load_file(str(out))
    assert set(cached) == set(loaded) and all(torch.equal(cached[k], loaded[k]) for k in cached)
    assert model.weights == f"pretrained ({name})" and not model.is_random

    s = _input_size(spec.arch)
    x = torch.randint(0, 256, (1, 3, s, s), dtype=torch.uint8)
    feats = model.features(x)
    assert feats.shape == (1, spec.feature_dim) == (1, ARCHS.get(spec.arch).feature_dim)
    assert torch.isfinite(feats).all()


def test_byol_round_trip_is_exact() -> None:
    from medxfer.models.checkpoint import keep_prefix
    from medxfer.models.haiku import haiku_to_torchvision

    spec = MODELS.get("byol")
    src = {k: v for k, v in source_trunk(spec).items() if not k.endswith("num_batches_tracked")}
    params, state = haiku_from_torchvision(src)
    flat = {f"{m}/{p}": torch.from_numpy(a) for tree in (params, state) for m, d in tree.items() for p, a in d.items()}
    back = haiku_to_torchvision(keep_prefix(flat, "res_net50/~/", "test"), "test")
    assert set(back) == set(src) and all(torch.equal(back[k], src[k]) for k in src)


def test_byol_unknown_haiku_parameter_is_named(tmp_path: Path) -> None:
    from medxfer.models.checkpoint import CheckpointError
    from medxfer.models.haiku import haiku_to_torchvision

    with pytest.raises(CheckpointError, match="block_group_9/~/mystery"):
        haiku_to_torchvision({"block_group_9/~/mystery/w": torch.zeros(1)}, "x.pkl")


def test_densenet_legacy_regex_only_touches_legacy_keys() -> None:
    from medxfer.models.checkpoint import fix_densenet_legacy

    t = torch.zeros(1)
    out = fix_densenet_legacy({"features.denseblock1.denselayer1.norm.1.weight": t,
                               "features.denseblock1.denselayer12.conv.2.weight": t,
                               "features.norm5.weight": t, "features.denseblock1.denselayer1.norm1.bias": t})
    assert sorted(out) == ["features.denseblock1.denselayer1.norm1.bias", "features.denseblock1.denselayer1.norm1.weight",
                           "features.denseblock1.denselayer12.conv2.weight", "features.norm5.weight"]


def test_native_normalisation_variant_shares_weights_not_features(tmp_path: Path) -> None:
    spec = MODELS.get("moco-cxr-r18")
    fetch(spec.name, source=fab_moco(spec, source_trunk(spec), tmp_path), verify_hash=False)
    base, native = load_model("moco-cxr-r18"), load_model("moco-cxr-r18-native")
    assert is_cached(MODELS.get("moco-cxr-r18-native"))
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), native.state_dict().values()))
    assert native.spec.normalization == "chexpert"
    assert base.weights_hash == native.weights_hash and base.fingerprint != native.fingerprint
    x = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    assert not torch.allclose(base.features(x), native.features(x))
    override = load_model("moco-cxr-r18", normalization="chexpert")
    assert override.fingerprint == native.fingerprint
    assert torch.allclose(override.features(x), native.features(x))


def test_byol_params_in_haiku_flatmap_containers(tmp_path: Path) -> None:
    """Older Haiku stored params in immutable FlatMap objects pickled as FlatMap(dict)."""
    from collections.abc import Mapping

    from medxfer.models.haiku import extract_byol
    from medxfer.models.safe_pickle import load_pickle

    class FlatMap(Mapping):
        def __init__(self, d: dict) -> None:
            self._d = dict(d)

        def __getitem__(self, k):
            return self._d[k]

        def __iter__(self):
            return iter(self._d)

        def __len__(self) -> int:
            return len(self._d)

        def __reduce__(self):
            return FlatMap, (self._d,)

    w = np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4)
    with fake_module("haiku._src.data_structures", FlatMap=FlatMap):
        params = FlatMap({"res_net50/~/initial_conv": FlatMap({"w": w})})
        state = FlatMap({"res_net50/~/initial_batchnorm/~/mean_ema": FlatMap({"average": w[..., :1]})})
        path = tmp_path / "flat.pkl"
        path.write_bytes(pickle.dumps({"experiment_state": (params, params, state, state, ())}, protocol=4))
    flat = extract_byol(load_pickle(path), str(path))
    assert sorted(flat) == ["res_net50/~/initial_batchnorm/~/mean_ema/average", "res_net50/~/initial_conv/w"]
    assert torch.equal(flat["res_net50/~/initial_conv/w"], torch.from_numpy(w))
