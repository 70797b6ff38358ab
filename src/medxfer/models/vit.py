"""A timm/DINOv2-style Vision Transformer trunk (no xFormers, no registers).

Parameter names follow DINOv2's published backbone state dicts (``patch_embed.proj``,
``blocks.N.attn.qkv``, ``blocks.N.ls1.gamma``, ...), so the hub ``*_pretrain.pth`` files
load strictly; without LayerScale (``layer_scale=False``) they are timm's / MAE's names
(RETFound). The forward pass returns the final-normed CLS token (B x D). Position
embeddings are stored at the pretraining grid (DINOv2: 518 px / 14 = 37 x 37; 224 / 16 = 14
x 14 for RETFound and Phikon-v2) and interpolated bicubically to the input grid as DINOv2
does (scale factor with a 0.1 offset, no antialias).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, layer_scale: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """ViT trunk: normalised B x 3 x H x W (H, W multiples of the patch) -> CLS token B x D."""

    def __init__(self, dim: int, depth: int, heads: int, patch: int = 14, pretrain_size: int = 518,
                 interpolate_offset: float = 0.1, layer_scale: bool = True) -> None:
        super().__init__()
        self.patch = patch
        self.embed_dim = dim
        self.interpolate_offset = interpolate_offset
        grid = pretrain_size // patch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, layer_scale=layer_scale) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def _pos_embed(self, gh: int, gw: int) -> torch.Tensor:
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        m = int(math.isqrt(patch_pos.shape[1]))
        if (gh, gw) == (m, m):
            return self.pos_embed
        grid = patch_pos.reshape(1, m, m, -1).permute(0, 3, 1, 2).float()
        off = self.interpolate_offset
        grid = F.interpolate(grid, scale_factor=((gh + off) / m, (gw + off) / m), mode="bicubic", antialias=False)
        if grid.shape[-2:] != (gh, gw):
            raise RuntimeError(f"position-embedding interpolation gave {tuple(grid.shape[-2:])}, expected {(gh, gw)}")
        grid = grid.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, gh * gw, -1)
        return torch.cat([cls_pos, grid], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final-normed tokens B x (1 + patches) x D (CLS first)."""
        b, _, h, w = x.shape
        if h % self.patch or w % self.patch:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {self.patch}")
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self._pos_embed(h // self.patch, w // self.patch)
        for blk in self.blocks:
            tokens = blk(tokens)
        return self.norm(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]


def dinov2_vits14() -> DinoVisionTransformer:
    return DinoVisionTransformer(dim=384, depth=12, heads=6)


def dinov2_vitb14() -> DinoVisionTransformer:
    return DinoVisionTransformer(dim=768, depth=12, heads=12)


def dinov2_vitl16() -> DinoVisionTransformer:
    """ViT-L/16 with LayerScale at 224 px (14 x 14 grid): Phikon-v2's DINOv2 trunk."""
    return DinoVisionTransformer(dim=1024, depth=24, heads=16, patch=16, pretrain_size=224)


def mae_vitl16() -> DinoVisionTransformer:
    """ViT-L/16 without LayerScale at 224 px: the MAE encoder (RETFound), timm's key names."""
    return DinoVisionTransformer(dim=1024, depth=24, heads=16, patch=16, pretrain_size=224, layer_scale=False)
