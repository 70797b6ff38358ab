"""The medical foundation models' formats on a small ViT (fast), their input normalisations, and
the safety of reading torchxrayvision's whole pickled model."""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

from medxfer.models import ARCHS, MODELS, load_model, register_arch
from medxfer.models.backbone import Arch, _dino_vit_run_to, build_trunk
from medxfer.models.checkpoint import convert_checkpoint
from medxfer.models.errors import CheckpointError, UnsafeCheckpointError
from medxfer.models.normalize import NORMALIZATIONS
from medxfer.models.spec import ModelSpec
from medxfer.models.vit import DinoVisionTransformer
from test_models_formats import fab_hf_dinov2, fab_mae, fake_module, source_trunk, timm_to_hf_dinov2


@pytest.fixture(scope="module")
def small_vits():
    archs = [Arch("test_vit_mae", lambda: DinoVisionTransformer(32, 2, 4, patch=16, pretrain_size=64, layer_scale=False),
                  32, (("tokens", 32),), _dino_vit_run_to),
             Arch("test_vit_dinov2", lambda: DinoVisionTransformer(32, 2, 4, patch=16, pretrain_size=64),
                  32, (("tokens", 32),), _dino_vit_run_to)]
    for a in archs:
        register_arch(a)
    yield
    for a in archs:
        ARCHS.unregister(a.name)


@pytest.mark.parametrize("fmt,arch,drop", [
    ("mae", "test_vit_mae", ("mask_token", "decoder_", "head.", "fc_norm.")),
    ("hf-dinov2", "test_vit_dinov2", ("embeddings.mask_token", "pooler.")),
])
def test_vit_formats_convert_exactly(small_vits, tmp_path: Path, fmt: str, arch: str, drop: tuple[str, ...]) -> None:
    spec = ModelSpec(name=f"small-{fmt}", arch=arch, family="domain-specific", fmt=fmt, drop=drop,
                     filename=f"small-{fmt}" + (".safetensors" if fmt == "hf-dinov2" else ".pth"))
    src = source_trunk(spec)
    fab = {"mae": fab_mae, "hf-dinov2": fab_hf_dinov2}[fmt]
    out = convert_checkpoint(fab(spec, src, tmp_path), spec)
    assert set(out) == set(src) and all(torch.equal(out[k], src[k]) for k in src)
    assert ("blocks.0.ls1.gamma" in out) == (fmt == "hf-dinov2")  # MAE blocks have no LayerScale


def test_hf_dinov2_names_a_foreign_key(tmp_path: Path) -> None:
    from medxfer.models.foundation import hf_dinov2_to_timm

    with pytest.raises(CheckpointError, match="encoder.layer.0.attention.attention.rotary"):
        hf_dinov2_to_timm({"encoder.layer.0.attention.attention.rotary": torch.zeros(1)}, "x.safetensors")
    sd = timm_to_hf_dinov2({"blocks.0.attn.qkv.weight": torch.arange(12.0).reshape(6, 2)})
    assert torch.equal(sd["encoder.layer.0.attention.attention.key.weight"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))


def test_xrv_normalisation_is_torchxrayvisions() -> None:
    """torchxrayvision.utils.normalize(img, 255) = (2 * img / 255 - 1) * 1024, one channel."""
    norm = NORMALIZATIONS.get("xrv")
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 3)
    out = norm(x)
    assert out.shape == (1, 1, 1, 3)
    assert torch.allclose(out, torch.tensor([-1024.0, 1024.0, (2 * 51 / 255 - 1) * 1024]).view(1, 1, 1, 3))
    rgb = torch.stack([torch.full((4, 4), 0), torch.full((4, 4), 255), torch.full((4, 4), 0)]).to(torch.uint8)[None]
    assert torch.allclose(norm(rgb), torch.full((1, 1, 4, 4), (2 * 85 / 255 - 1) * 1024))  # colour averaged
    assert torch.allclose(norm.float_fn(x.float() / 255), out)
    rd = NORMALIZATIONS.get("rad-dino")(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8))
    assert rd.shape == (1, 3, 2, 2) and torch.allclose(rd, torch.full_like(rd, (1 - 0.5307) / 0.2583))


def test_xrv_model_features_on_one_channel_and_stages() -> None:
    model = load_model("xrv-densenet121-all", weights="random")
    assert model.spec.normalization == "xrv" and model.feature_dim == 1024
    grey = torch.randint(0, 256, (2, 1, 32, 32), dtype=torch.uint8)
    assert model.features(grey).shape == (2, 1024)
    with torch.no_grad():
        assert model.feature_map(model.normalize(grey), "denseblock2").shape[1] == 512
    assert build_trunk("densenet121_1ch").features.conv0.in_channels == 1


def test_xrv_pickle_never_runs_its_code(tmp_path: Path) -> None:
    """A whole-model pickle naming anything outside torch.nn / torchxrayvision classes is refused."""
    class Evil:
        def __reduce__(self):
            return (__import__("os").system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    spec = MODELS.get("xrv-densenet121-all")
    with pytest.raises(UnsafeCheckpointError, match="posix.system|os.system"):
        convert_checkpoint(path, spec)
    assert "torchxrayvision" not in sys.modules or isinstance(sys.modules["torchxrayvision"], type(sys))

    class Gadget:  # a torchxrayvision class that would run code on unpickling becomes inert instead
        def __setstate__(self, state):  # pragma: no cover - must never run
            raise AssertionError("foreign code ran")

    with fake_module("torchxrayvision.models", Gadget=Gadget):
        g = Gadget()
        g.__dict__["x"] = 1
        torch.save(g, tmp_path / "gadget.pt")
    with pytest.raises(CheckpointError, match="does not match the DenseNet trunk"):  # read as data, nothing ran
        convert_checkpoint(tmp_path / "gadget.pt", spec)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "gadget.pt", weights_only=True)


def test_foundation_specs_carry_licence_citation_and_preprocessing() -> None:
    for name, norm in (("xrv-densenet121-all", "xrv"), ("rad-dino", "rad-dino"), ("retfound-mae", "imagenet"),
                       ("phikon-v2", "imagenet")):
        s = MODELS.get(name)
        assert s.family == "domain-specific" and s.normalization == norm and s.licence and s.citation and s.notes
        assert s.urls or s.fetch_hint


def test_every_spec_normalises_to_its_architectures_input_channels() -> None:
    x = torch.randint(0, 256, (1, 3, 28, 28), dtype=torch.uint8)
    for name, spec in MODELS.items():
        assert NORMALIZATIONS.get(spec.normalization)(x).shape[1] == ARCHS.get(spec.arch).in_channels, name
