"""A tiny ViT / DeiT-style classifier for small images, so token experiments run offline.

Patch embedding (a conv with kernel = stride = patch), a learned class token and learned
position embeddings, `depth` pre-LayerNorm transformer blocks
(x + Attn(LN(x)), then x + MLP(LN(x))), a final LayerNorm; the features are the class
token's final representation. Defaults (patch 4, dim 192, 3 heads, depth 6, MLP ratio 4)
give DeiT-Tiny's width on 8x8 = 64 patches of a 32x32 image.

Block names: "blocks.0" ... "blocks.<depth-1>"; each block's output is (N, T, D) with
T = 1 + number of patches (the class token first). Inside a block: norm1, attn (qkv, proj),
norm2, mlp (fc1, act, fc2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shortcut_fast.validate import check_int

from .base import Classifier


class Attention(nn.Module):
    """Multi-head self-attention (scaled dot product, no dropout)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class TransformerBlock(nn.Module):
    """Pre-LN transformer encoder block."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = max(1, int(dim * mlp_ratio))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(dim, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens (N, num_patches, dim)."""

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(Classifier):
    """ViT with a class token; `features` is the final class token after LayerNorm."""

    def __init__(self, *, num_classes: int, in_channels: int, image_size: int, patch: int,
                 dim: int, depth: int, heads: int, mlp_ratio: float) -> None:
        super().__init__(in_channels=in_channels, image_size=image_size)
        num_patches = (image_size // patch) ** 2
        self.patch_embed = PatchEmbed(in_channels, dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, dim))
        self.blocks = nn.Sequential(
            *[TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.block_names = [f"blocks.{i}" for i in range(depth)]
        self._init_weights()

    def _init_weights(self) -> None:
        # ViT/DeiT practice: truncated normal(0.02) for embeddings and linear weights
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        tokens = self.blocks(tokens)
        return self.norm(tokens[:, 0])


def vit_tiny(*, num_classes: int, in_channels: int = 3, image_size: int = 32,
             patch: int = 4, dim: int = 192, depth: int = 6, heads: int = 3,
             mlp_ratio: float = 4.0) -> VisionTransformer:
    """Tiny ViT; image_size must be a multiple of patch and dim a multiple of heads."""
    for name, value in (("patch", patch), ("dim", dim), ("depth", depth), ("heads", heads)):
        check_int(name, value)
    if image_size % patch:
        raise ValueError(f"image_size ({image_size}) must be a multiple of patch ({patch})")
    if dim % heads:
        raise ValueError(f"dim ({dim}) must be a multiple of heads ({heads})")
    if not (isinstance(mlp_ratio, (int, float)) and mlp_ratio > 0):
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    return VisionTransformer(num_classes=num_classes, in_channels=in_channels,
                             image_size=image_size, patch=patch, dim=dim, depth=depth,
                             heads=heads, mlp_ratio=float(mlp_ratio))
