"""Transformer building blocks shared by the TimeSformer variants.

Module and parameter names (`qkv`, `proj`, `fc1`, `fc2`) follow the official TimeSformer / timm ViT code so
that official checkpoints and ImageNet ViT weights load by name.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


INIT_SETUPS = ("auto", "scratch", "vit")


def check_init_setup(init: str, embed_std: float) -> None:
    """The `init` / `embed_std` fields every model config has (see TimeSformerConfig.init)."""
    if init not in INIT_SETUPS:
        raise ValueError(f"unknown init {init!r}; choose one of: {', '.join(INIT_SETUPS)}")
    if embed_std <= 0:
        raise ValueError(f"embed_std must be > 0, got {embed_std}")


class Attention(nn.Module):
    """Multi-head self-attention over the second axis of (B, L, D).

    `fused=True` runs `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, the fused
    CPU kernel on CPU); `fused=False` is the explicit softmax(QK^T)V path, kept for tests and attention maps
    (which set `recorded`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        fused: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused = fused
        # Capture mode (attention maps, actionrec/engine/explain.py): a list that receives each call's weights
        # (B, h, L, L), still in the autograd graph; the explicit path runs while it is set. None: off.
        self.recorded: list[torch.Tensor] | None = None
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.fused and self.recorded is None:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, h, L, d)
        else:
            weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, h, L, L)
            if self.recorded is not None:
                self.recorded.append(weights)
            out = F.dropout(weights, p=dropout_p) @ v  # (B, h, L, d)
        out = rearrange(out, "b h l d -> b l (h d)")
        return self.proj_drop(self.proj(out))


class Mlp(nn.Module):
    """Transformer feed-forward block: Linear -> GELU -> Linear (names as in timm / official TimeSformer)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class PatchEmbed(nn.Module):
    """Per-frame non-overlapping patches: (B, C, T, H, W) -> (B, T, N, D) and the patch grid (h, w)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, video: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        b = video.shape[0]
        frames = rearrange(video, "b c t h w -> (b t) c h w")
        patches = self.proj(frames)  # (B*T, D, h, w)
        grid_h, grid_w = patches.shape[-2:]
        return rearrange(patches, "(b t) d h w -> b t (h w) d", b=b), grid_h, grid_w
