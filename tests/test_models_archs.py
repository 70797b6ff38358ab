"""Every registered architecture maps normalised B x C x 224 x 224 input (C its declared input
channels: 3, or 1 for torchxrayvision's DenseNet) to B x D features."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medxfer.models import ARCHS, MODELS, build_trunk
from medxfer.models.vit import DinoVisionTransformer


@pytest.mark.parametrize("arch", ARCHS.names())
def test_arch_contract_on_meta_device(arch: str) -> None:
    """Shapes only (meta tensors: no compute): pooled features, no classification head, and
    every declared stage has the declared channels."""
    a = ARCHS.get(arch)
    with torch.device("meta"):
        trunk = a.build()
        x = torch.empty(2, a.in_channels, 224, 224)
        out = trunk(x)
        maps = {stage: a.run_to(trunk, x, stage) for stage, _ in a.stages}
    assert tuple(out.shape) == (2, a.feature_dim)
    assert not any(k.startswith(("fc.", "classifier.", "heads.", "head.")) for k in trunk.state_dict())
    for stage, channels in a.stages:
        assert maps[stage].ndim == 4 and maps[stage].shape[:2] == (2, channels), stage


def test_specs_take_their_feature_size_from_the_arch() -> None:
    for name, spec in MODELS.items():
        assert spec.feature_dim == ARCHS.get(spec.arch).feature_dim, name


@pytest.mark.parametrize("name,stage,shape", [
    ("supervised-r18", "layer4", (512, 7, 7)), ("supervised-r18", "layer1", (64, 56, 56)),
    ("supervised-r50", "layer3", (1024, 14, 14)), ("supervised-d121", "denseblock4", (1024, 7, 7)),
    ("supervised-d121", "denseblock1", (256, 56, 56)), ("dinov2-vits14", "tokens", (384, 16, 16)),
    ("supervised-vit-b16", "tokens", (768, 14, 14)),
])
def test_backbone_feature_api(name: str, stage: str, shape: tuple[int, ...]) -> None:
    """pooled() is the paper's feature, feature_map() the unpooled stage; the last stage
    average-pooled is the pooled feature for ResNets (for DenseNet after norm5 + ReLU)."""
    import medxfer

    model = medxfer.load_model(name, weights="random")
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        fmap = model.feature_map(x, stage)
        pooled = model.pooled(x)
        layer = model.layer_features(x, stage)
    assert tuple(fmap.shape[1:]) == shape
    assert pooled.shape == (2, model.feature_dim) and layer.shape == (2, shape[0])
    torch.testing.assert_close(layer, fmap.mean(dim=(-2, -1)))
    if model.spec.arch.startswith("resnet") and stage == "layer4":
        torch.testing.assert_close(pooled, fmap.mean(dim=(-2, -1)), rtol=1e-4, atol=1e-5)
    if model.spec.arch.startswith("densenet") and stage == "denseblock4":
        with torch.inference_mode():
            after = torch.relu(model.trunk.features.norm5(fmap)).mean(dim=(-2, -1))
        torch.testing.assert_close(pooled, after, rtol=1e-4, atol=1e-5)


def test_unknown_stage_is_a_clear_error() -> None:
    import medxfer
    from medxfer.errors import UsageError

    model = medxfer.load_model("test-tiny", weights="random")
    with pytest.raises(UsageError, match="no stage 'layer9'.*block1, block2, block3"):
        model.layer_dim("layer9")


def test_vit_position_embedding_interpolation() -> None:
    vit = DinoVisionTransformer(dim=32, depth=1, heads=2).eval()
    assert vit.pos_embed.shape == (1, 1 + 37 * 37, 32)
    assert vit._pos_embed(37, 37) is vit.pos_embed  # the pretraining grid is used as is
    pe = vit._pos_embed(16, 16)
    assert pe.shape == (1, 1 + 16 * 16, 32) and torch.equal(pe[:, :1], vit.pos_embed[:, :1])
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.25  # a constant field stays constant
    assert torch.allclose(vit._pos_embed(16, 16)[:, 1:], torch.full((1, 256, 32), 0.25), atol=1e-6)
    # a smooth field is resampled, not cropped: corners of the 16 x 16 grid match the 37 x 37 ones
    grid = torch.linspace(0, 1, 37)
    field = (grid[:, None] + grid[None, :]).reshape(1, 37 * 37, 1).expand(1, -1, 32)
    with torch.no_grad():
        vit.pos_embed[:, 1:] = field
    small = vit._pos_embed(16, 16)[0, 1:, 0].reshape(16, 16)
    ref = F.interpolate(field[..., :1].reshape(1, 37, 37, 1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert torch.allclose(small, ref[0, 0], atol=0.02)
    with torch.no_grad():
        feats = vit(torch.randn(2, 3, 28, 42))
    assert feats.shape == (2, 32)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        vit(torch.randn(1, 3, 30, 28))


def test_vit_forward_is_batch_independent() -> None:
    vit = build_trunk("dinov2_vits14", seed=0).eval()
    x = torch.randn(3, 3, 28, 28)
    with torch.no_grad():
        both = vit(x)
        one = vit(x[1:2])
    assert torch.allclose(both[1:2], one, atol=1e-5)
