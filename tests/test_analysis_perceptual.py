"""LPIPS with fabricated torchvision ImageNet weights (random values, torchvision's exact keys):
distances behave, and a tampered head, a wrong trunk tensor, a wrong file or missing weights are
caught."""
from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from medxfer.analysis import perceptual as P


def fabricated_state(arch: str, seed: int, features_only: bool) -> dict[str, torch.Tensor]:
    """A torchvision ``arch`` state dict with its real keys and shapes and seeded random values."""
    with torch.device("meta"):
        keys = {k: (v.shape, v.dtype) for k, v in getattr(torchvision.models, arch)(weights=None).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, dtype) in keys.items():
        if features_only and not k.startswith("features."):
            continue
        if k.endswith("weight"):
            fan_in = math.prod(shape[1:])
            out[k] = torch.randn(shape, generator=g, dtype=dtype) * math.sqrt(2.0 / fan_in)
        else:
            out[k] = torch.randn(shape, generator=g, dtype=dtype) * 0.01
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("tv")
    squeeze = d / "squeeze.pth"  # the full torchvision layout, classifier included
    torch.save(fabricated_state("squeezenet1_1", 1, features_only=False), squeeze)
    vgg = d / "vgg.pth"  # features only (the real file's classifier is 400 MB)
    torch.save(fabricated_state("vgg16", 2, features_only=True), vgg)
    return {"alex": fabricated_state("alexnet", 0, features_only=True), "squeeze": squeeze, "vgg": vgg}


@pytest.fixture(scope="module")
def perc(weights: dict[str, object]) -> P.Perceptual:
    """All three trunks, any input size (the behaviour tests use 64 x 64 to stay fast on a CPU)."""
    return P.Perceptual(weights, size=None)  # type: ignore[arg-type]


SMALL = 64


def image(seed: int, size: int = SMALL) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 16, size // 16, generator=g)
    return nn.functional.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)


def test_backbone_keys_are_torchvision_features() -> None:
    alex = P.backbone_keys("alex")
    assert alex == tuple(f"features.{i}.{p}" for i in (0, 3, 6, 8, 10) for p in ("weight", "bias"))
    vgg = P.backbone_keys("vgg")
    assert len(vgg) == 26 and vgg[0] == "features.0.weight" and vgg[-1] == "features.28.bias"
    squeeze = P.backbone_keys("squeeze")
    assert "features.12.expand3x3.weight" in squeeze and len(squeeze) == 2 + 8 * 6


def test_shipped_heads_are_v01() -> None:
    for net, n in (("alex", 5), ("squeeze", 7), ("vgg", 5)):
        heads = P.shipped_heads(net)
        assert sorted(heads) == [f"lin{i}.model.1.weight" for i in range(n)]
        assert all(float(v.min()) >= 0.0 for v in heads.values())


def test_protocol_size(perc: P.Perceptual, weights: dict[str, object]) -> None:
    d = perc(image(0, 224), image(1, 224))
    assert set(d) == {"alex", "squeeze", "vgg", "mean"} and all(v > 0.0 for v in d.values())
    strict = P.Perceptual({"alex": weights["alex"]}, nets=["alex"])  # type: ignore[dict-item]
    assert strict.size == 224 and strict(image(0, 224), image(1, 224))["alex"] == pytest.approx(d["alex"])
    with pytest.raises(ValueError, match="224"):
        strict(image(0), image(1))


def test_identical_zero_different_positive_symmetric(perc: P.Perceptual) -> None:
    x, y = image(0), image(1)
    same = perc(x, x)
    assert set(same) == {"alex", "squeeze", "vgg", "mean"} and all(v == 0.0 for v in same.values())
    d, e = perc(x, y), perc(y, x)
    assert all(v > 0.0 for v in d.values())
    assert all(d[k] == pytest.approx(e[k], rel=1e-5, abs=1e-7) for k in d)
    assert d["mean"] == pytest.approx((d["alex"] + d["squeeze"] + d["vgg"]) / 3)
    assert perc(x, y) == d  # eval mode: the heads' dropout is off
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    small, large = perc((x + 0.02 * noise).clamp(0, 1), x), perc((x + 0.3 * noise).clamp(0, 1), x)
    assert all(0.0 < small[k] < large[k] for k in small)


def test_batch_clipping_and_input_checks(perc: P.Perceptual) -> None:
    x, y, z = image(0), image(1), image(2)
    batch = perc.distances(torch.stack([x, y]), torch.stack([z, z]))
    assert batch["vgg"].shape == (2,)
    assert batch["alex"][1].item() == pytest.approx(perc(y, z)["alex"], rel=1e-5)
    over = x * 1.5 - 0.2  # a reconstruction outside [0, 1] is clipped first
    assert perc(over, y) == pytest.approx(perc(over.clamp(0, 1), y))
    grey = x[:1]
    assert perc(grey, grey.expand(3, -1, -1))["mean"] == 0.0
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        perc(x, y + 0.5)
    with pytest.raises(ValueError, match="shape"):
        perc(x, y[:, :32])
    with pytest.raises(ValueError, match="one pair"):
        perc(torch.stack([x, y]), torch.stack([y, x]))


def test_missing_weights_name_the_fetch_command(weights: dict[str, object], tmp_path: Path) -> None:
    with pytest.raises(P.MissingPerceptualWeightsError, match="medxfer fetch lpips") as e:
        P.Perceptual({"alex": weights["alex"]})  # type: ignore[dict-item]
    assert isinstance(e.value, ValueError) and "squeezenet1_1-b8a52dc0.pth" in str(e.value)
    with pytest.raises(P.MissingPerceptualWeightsError, match="does not exist"):
        P.Perceptual({"alex": tmp_path / "nope.pth"}, nets=["alex"])
    only = P.Perceptual({"alex": weights["alex"]}, nets=["alex"], size=None)  # type: ignore[dict-item]
    assert set(only(image(0), image(1))) == {"alex", "mean"}


def test_digest_checks(weights: dict[str, object], tmp_path: Path) -> None:
    path = Path(str(weights["squeeze"]))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert P.load_backbone_state("squeeze", path, sha256=digest)
    assert P.load_backbone_state("squeeze", path, sha256=digest[:8].upper())
    with pytest.raises(P.PerceptualWeightsError, match="sha256"):
        P.load_backbone_state("squeeze", path, sha256="0" * 64)
    fake = tmp_path / P.TORCHVISION_WEIGHTS["squeeze"].filename  # real name, fabricated content
    fake.write_bytes(path.read_bytes())
    with pytest.raises(P.PerceptualWeightsError, match="b8a52dc0"):
        P.load_backbone_state("squeeze", fake)
    with pytest.raises(ValueError, match="pass the path"):
        P.load_backbone_state("alex", weights["alex"], sha256=digest)  # type: ignore[arg-type]


def test_key_checks(weights: dict[str, object]) -> None:
    alex = dict(weights["alex"])  # type: ignore[call-overload]
    assert set(P.load_backbone_state("alex", {**alex, "classifier.1.weight": torch.zeros(2)})) == set(alex)
    with pytest.raises(P.PerceptualWeightsError, match="missing"):
        P.load_backbone_state("alex", {k: v for k, v in alex.items() if k != "features.3.bias"})
    with pytest.raises(P.PerceptualWeightsError, match="unexpected"):
        P.load_backbone_state("alex", {**alex, "features.99.weight": torch.zeros(1)})
    with pytest.raises(P.PerceptualWeightsError, match="unexpected"):
        P.load_backbone_state("alex", {f"module.{k}": v for k, v in alex.items()})
    with pytest.raises(P.PerceptualWeightsError, match="keys"):
        P.load_backbone_state("alex", fabricated_state("vgg16", 0, features_only=True))  # wrong architecture


def test_tampered_heads_and_trunk_are_detected(weights: dict[str, object]) -> None:
    state = P.load_backbone_state("alex", weights["alex"])  # type: ignore[arg-type]
    model = P.build_lpips("alex", state)
    P.verify_lpips(model, "alex", state)
    with torch.no_grad():
        model.lin2.model[1].weight[0, 5] += 1e-3
    with pytest.raises(P.PerceptualWeightsError, match="lin2"):
        P.verify_lpips(model, "alex", state)
    model = P.build_lpips("alex", state)
    other = dict(state)
    other["features.6.weight"] = other["features.6.weight"] + 1e-4
    with pytest.raises(P.PerceptualWeightsError, match="features.6.weight"):
        P.verify_lpips(model, "alex", other)
    with torch.no_grad():
        getattr(model.net.slice5, "10").bias.mul_(2)
    with pytest.raises(P.PerceptualWeightsError, match="features.10.bias"):
        P.verify_lpips(model, "alex", state)
    model = P.build_lpips("alex", state)
    model.version = "0.0"  # v0.0 skips the input scaling
    with pytest.raises(P.PerceptualWeightsError, match="v0.1"):
        P.verify_lpips(model, "alex", state)


def test_heads_that_strict_false_failed_to_load_are_detected(weights: dict[str, object]) -> None:
    """What the package leaves behind when its strict=False load matches no key: random heads."""
    import lpips

    state = P.load_backbone_state("alex", weights["alex"])  # type: ignore[arg-type]
    with P._weightless_torchvision():
        model = lpips.LPIPS(net="alex", version="0.1", pretrained=False, pnet_rand=True, verbose=False)
    model.net.load_state_dict({k[4:]: state[P._trunk_key(k)] for k in model.state_dict() if k.startswith("net.")})
    with pytest.raises(P.PerceptualWeightsError, match="differs from the shipped"):
        P.verify_lpips(model, "alex", state)


def test_construction_is_quiet_and_leaves_the_global_rng(weights: dict[str, object]) -> None:
    import lpips

    rng = torch.random.get_rng_state()
    tv = lpips.pretrained_networks.tv
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        P.Perceptual(weights, nets=["alex", "squeeze"])  # type: ignore[arg-type]
    assert [str(w.message) for w in caught] == []  # no torchvision 'pretrained' deprecation warnings
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert lpips.pretrained_networks.tv is tv  # the stand-in was removed again


def test_png_pair_is_lossless_at_8_bits(tmp_path: Path) -> None:
    rec, orig = image(4), image(5)
    a, b = P.save_png_pair(rec, orig, tmp_path / "out", "img_001")
    assert a.name == "img_001_reconstruction.png" and b.name == "img_001_original.png"
    for path, x in ((a, rec), (b, orig)):
        with Image.open(path) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            got = np.asarray(im)
        want = (x.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert np.array_equal(got, want)
    with pytest.raises(ValueError, match="stem"):
        P.save_png_pair(rec, orig, tmp_path, "../escape")
