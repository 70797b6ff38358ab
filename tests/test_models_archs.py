"""Every registered architecture maps normalised B x 3 x 224 x 224 input to B x D features."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medxfer.models import ARCH_FEATURE_DIMS, ARCHS, MODELS, build_trunk
from medxfer.models.vit import DinoVisionTransformer


@pytest.mark.parametrize("arch", sorted(ARCH_FEATURE_DIMS))
def test_arch_contract_on_meta_device(arch: str) -> None:
    """Shapes only (meta tensors: no compute): pooled features, no classification head."""
    with torch.device("meta"):
        trunk = ARCHS.get(arch)()
        out = trunk(torch.empty(2, 3, 224, 224))
    assert tuple(out.shape) == (2, ARCH_FEATURE_DIMS[arch])
    assert not any(k.startswith(("fc.", "classifier.", "heads.", "head.")) for k in trunk.state_dict())


def test_specs_agree_with_their_arch() -> None:
    for name, spec in MODELS.items():
        assert spec.feature_dim == ARCH_FEATURE_DIMS[spec.arch], name


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
