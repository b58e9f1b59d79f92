"""Convolutional trunks with transformer-encoder heads.

- `VideoResNetTransformer`: a torchvision video ResNet-18 trunk (R3D, R(2+1)D or MC3), its final feature map
  average-pooled to a (t, s, s) token grid instead of torchvision's 1x1x1, then a transformer encoder with a
  learnable cls token and position embeddings, then a linear classifier.
- `FrameResNetTransformer`: torchvision ResNet-18 applied to every frame, the per-frame features fed as a
  sequence to a temporal transformer encoder.

Trunk parameter names are torchvision's under `trunk.`, so torchvision weight files load by name
(`pretrained.py`). Nothing is downloaded: trunks are built with `weights=None`.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet18
from torchvision.models.video import mc3_18, r2plus1d_18, r3d_18

from actionrec.models.layers import check_init_setup

VIDEO_TRUNKS = {"r3d_18": r3d_18, "r2plus1d_18": r2plus1d_18, "mc3_18": mc3_18}
TRUNK_CHANNELS = 512


@contextmanager
def frozen_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged while active. Activation checkpointing recomputes a
    forward in the backward pass; without this, every recomputation would update the running mean/var a
    second time and checkpointing would change the model's eval outputs."""
    saved = []
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.training and bn.track_running_stats:
            saved.append((bn, bn.momentum, bn.num_batches_tracked.clone()))
            bn.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    try:
        yield
    finally:
        for bn, momentum, tracked in saved:
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)


def run_checkpointed(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a stage with activation checkpointing (recompute in backward), BatchNorm statistics updated once."""
    return checkpoint(
        stage, x, use_reentrant=False, context_fn=lambda: (nullcontext(), frozen_batchnorm_stats(stage))
    )


def _check_clip(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"expected a clip batch (B, 3, T, H, W), got shape {tuple(video.shape)}")
    if not video.is_floating_point():
        raise TypeError(f"expected a float clip, got {video.dtype}: normalise uint8 clips first")


class TransformerHead(nn.Module):
    """cls token + learnable position embeddings -> pre-norm transformer encoder -> LayerNorm -> linear.

    `pos_std`: 0.02 is the ViT habit; from scratch the head needs position (for the frame model: time)
    embeddings on the scale of its tokens, or it starts blind to where and when a token comes from."""

    def __init__(
        self,
        dim: int,
        num_tokens: int,
        num_layers: int,
        num_heads: int,
        mlp_ratio: float,
        dropout: float,
        head_dropout: float,
        num_classes: int,
        grad_checkpointing: bool,
        pos_std: float = 0.02,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"hidden_dim {dim} is not divisible by num_heads {num_heads}")
        self.grad_checkpointing = grad_checkpointing
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_tokens, dim))
        # nn.TransformerEncoderLayer runs its attention through F.scaled_dot_product_attention.
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                dim, num_heads, int(dim * mlp_ratio), dropout, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)
        self.head_drop = nn.Dropout(head_dropout)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=pos_std, a=-2 * pos_std, b=2 * pos_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> logits (B, num_classes). L must equal num_tokens, except for a 1-D (frame) sequence,
        whose position embeddings are linearly resampled to L."""
        pos = self.pos_embed
        if tokens.shape[1] + 1 != pos.shape[1]:
            resized = F.interpolate(
                rearrange(pos[:, 1:], "1 l d -> 1 d l"), size=tokens.shape[1], mode="linear", align_corners=False
            )
            pos = torch.cat([pos[:, :1], rearrange(resized, "1 d l -> 1 l d")], dim=1)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + pos  # (B, 1+L, D)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.head(self.head_drop(self.norm(x[:, 0])))


@dataclass
class VideoResNetTransformerConfig:
    trunk: str = "r3d_18"
    # The trunk's last feature map is average-pooled to (token_frames, token_size, token_size) tokens.
    token_frames: int = 1
    token_size: int = 4
    hidden_dim: int = 512
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    head_dropout: float = 0.0
    # Train only the transformer head: trunk parameters get no gradient and its BatchNorm stays in eval mode.
    freeze_trunk: bool = False
    grad_checkpointing: bool = False
    # "scratch" draws the head's position embeddings with embed_std, "vit" with 0.02; "auto" is "scratch"
    # here, and a run config makes it "vit" when model.pretrained loads weights (see TimeSformerConfig.init).
    init: str = "auto"
    embed_std: float = 0.5

    def __post_init__(self) -> None:
        check_init_setup(self.init, self.embed_std)
        if self.trunk not in VIDEO_TRUNKS:
            raise ValueError(f"unknown trunk {self.trunk!r}; choose one of: {', '.join(VIDEO_TRUNKS)}")
        for name in ("token_frames", "token_size", "hidden_dim", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _halve(size: int, times: int) -> int:
    # Every downsampling conv of these trunks (k=3,p=1 / k=7,p=3 / k=1,p=0, stride 2) maps n -> ceil(n / 2).
    for _ in range(times):
        size = -(-size // 2)
    return size


class TrunkTransformer(nn.Module):
    """What both CNN + transformer models share: ResNet-18 trunk stages (torchvision names under `trunk.`),
    a projection to the head's width, the transformer head, trunk freezing and activation checkpointing."""

    def __init__(
        self,
        config: VideoResNetTransformerConfig | FrameResNetTransformerConfig,
        num_classes: int,
        trunk: nn.ModuleDict,
        num_tokens: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        self.trunk = trunk
        self.proj = nn.Identity() if config.hidden_dim == TRUNK_CHANNELS else nn.Linear(TRUNK_CHANNELS, config.hidden_dim)
        self.head = TransformerHead(
            config.hidden_dim,
            num_tokens,
            config.num_layers,
            config.num_heads,
            config.mlp_ratio,
            config.dropout,
            config.head_dropout,
            num_classes,
            config.grad_checkpointing,
            pos_std=0.02 if config.init == "vit" else config.embed_std,
        )
        if config.freeze_trunk:
            self.trunk.requires_grad_(False)

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute trunk stages and encoder layers in the backward pass (same outputs and gradients)."""
        self.config.grad_checkpointing = enabled
        self.head.grad_checkpointing = enabled

    def train(self, mode: bool = True) -> "TrunkTransformer":
        super().train(mode)
        if self.config.freeze_trunk:
            self.trunk.eval()
        return self

    def run_trunk(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.config.freeze_trunk else nullcontext():
            for stage in self.trunk.values():
                checkpointed = self.config.grad_checkpointing and torch.is_grad_enabled()
                x = run_checkpointed(stage, x) if checkpointed else stage(x)
        return x


class VideoResNetTransformer(TrunkTransformer):
    """Video ResNet-18 trunk -> (t, s, s) token grid -> transformer encoder -> logits."""

    def __init__(self, config: VideoResNetTransformerConfig, num_classes: int) -> None:
        net = VIDEO_TRUNKS[config.trunk](weights=None)
        # torchvision's pooling and classifier are replaced by the token grid + head.
        trunk = nn.ModuleDict(
            dict(stem=net.stem, layer1=net.layer1, layer2=net.layer2, layer3=net.layer3, layer4=net.layer4)
        )
        super().__init__(config, num_classes, trunk, config.token_frames * config.token_size**2)
        self.token_grid = (config.token_frames, config.token_size, config.token_size)
        self.pool = nn.AdaptiveAvgPool3d(self.token_grid)

    def trunk_output_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """(t, h, w) of the trunk's last feature map for a clip of that size."""
        time_halvings = 0 if self.config.trunk == "mc3_18" else 3
        return _halve(frames, time_halvings), _halve(height, 4), _halve(width, 4)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _check_clip(video)
        grid = self.trunk_output_grid(*video.shape[2:])
        if any(have < want for have, want in zip(grid, self.token_grid)):
            raise ValueError(
                f"a {video.shape[2]}x{video.shape[3]}x{video.shape[4]} (frames x H x W) clip gives a "
                f"{grid[0]}x{grid[1]}x{grid[2]} {self.config.trunk} feature map, smaller than the "
                f"{self.token_grid[0]}x{self.token_grid[1]}x{self.token_grid[2]} token grid: use more frames / "
                f"larger clips or lower token_frames / token_size"
            )
        tokens = rearrange(self.pool(self.run_trunk(video)), "b c t h w -> b (t h w) c")  # (B, t*s*s, 512)
        return self.head(self.proj(tokens))


@dataclass
class FrameResNetTransformerConfig:
    # Frames the temporal position embeddings are made for (other clip lengths resample them linearly).
    num_frames: int = 8
    hidden_dim: int = 512
    num_layers: int = 2
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    head_dropout: float = 0.0
    freeze_trunk: bool = False
    grad_checkpointing: bool = False
    init: str = "auto"  # as VideoResNetTransformerConfig.init
    embed_std: float = 0.5

    def __post_init__(self) -> None:
        check_init_setup(self.init, self.embed_std)
        for name in ("num_frames", "hidden_dim", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class FrameResNetTransformer(TrunkTransformer):
    """ResNet-18 on every frame -> sequence of frame features -> temporal transformer encoder -> logits."""

    def __init__(self, config: FrameResNetTransformerConfig, num_classes: int) -> None:
        net = resnet18(weights=None)
        trunk = nn.ModuleDict(
            dict(
                stem=nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
                layer1=net.layer1, layer2=net.layer2, layer3=net.layer3, layer4=net.layer4,
            )
        )
        super().__init__(config, num_classes, trunk, config.num_frames)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _check_clip(video)
        batch = video.shape[0]
        x = self.run_trunk(rearrange(video, "b c t h w -> (b t) c h w"))
        frame_features = rearrange(x.mean(dim=(-2, -1)), "(b t) c -> b t c", b=batch)  # (B, T, 512)
        return self.head(self.proj(frame_features))
