"""Convolutional trunks with transformer-encoder heads.

- `VideoResNetTransformer`: a torchvision video ResNet-18 trunk (R3D, R(2+1)D or MC3), its final feature map
  average-pooled to a (t, s, s) token grid instead of torchvision's 1x1x1, then a transformer encoder with a
  learnable cls token and position embeddings, then a linear classifier.
- `FrameResNetTransformer`: torchvision ResNet-18 applied to every frame, the per-frame features fed as a
  sequence to a temporal transformer encoder.

Trunk parameter names are torchvision's under `trunk.`, so torchvision weight files load by name
(`pretrained.py`). Nothing is downloaded: trunks are built with `weights=None`.

Two set-ups, as for the TimeSformer (`init`): `vit` (the set-up of published weights) is torchvision's trunk
exactly (BatchNorm, 64 base channels); `scratch` reshapes the same trunk for training without weights: a norm
layer that does not depend on the batch (instance norm), and optionally a narrower `width` (see
`reshape_trunk`, and docs/models.md for what each change measured).
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.models import resnet18
from torchvision.models.video import mc3_18, r2plus1d_18, r3d_18

from actionrec.models.layers import check_init_setup

VIDEO_TRUNKS = {"r3d_18": r3d_18, "r2plus1d_18": r2plus1d_18, "mc3_18": mc3_18}
TORCHVISION_WIDTH = 64  # base channels of torchvision's ResNet-18 trunks (stages: 64, 128, 256, 512)
NORMS = ("auto", "batch", "group", "instance")


def make_norm(kind: str, channels: int, dims: int) -> nn.Module:
    """`batch`: BatchNorm (torchvision's); `group`: GroupNorm with groups of 4 channels (at the narrow widths
    used from scratch, 32 groups would be one channel each); `instance`: one group per channel."""
    if kind == "batch":
        return nn.BatchNorm3d(channels) if dims == 3 else nn.BatchNorm2d(channels)
    groups = channels if kind == "instance" else math.gcd(channels, max(1, channels // 4))
    return nn.GroupNorm(groups, channels)


def reshape_trunk(module: nn.Module, width: int, norm: str) -> None:
    """Rebuild a torchvision ResNet trunk in place with `width` base channels instead of 64 (every conv's
    channels scaled by width / 64, the image's 3 kept) and `norm` instead of BatchNorm. Module names stay
    torchvision's, so the same code walks all trunks (R3D, R(2+1)D with its mid-planes, MC3, 2D ResNet).
    Written here because torchvision's builders fix both the width (64) and the norm (BatchNorm3d inside the
    video blocks)."""

    def scaled(channels: int) -> int:
        return max(1, round(channels * width / TORCHVISION_WIDTH))

    for name, child in module.named_children():
        if isinstance(child, (nn.Conv2d, nn.Conv3d)):
            # torchvision's Conv3DSimple / Conv3DNoTemporal are nn.Conv3d with other constructors: a plain
            # nn.Conv3d of the same geometry is the same layer.
            conv = (nn.Conv3d if isinstance(child, nn.Conv3d) else nn.Conv2d)(
                child.in_channels if child.in_channels == 3 else scaled(child.in_channels),
                scaled(child.out_channels), child.kernel_size, child.stride, child.padding, bias=child.bias is not None,
            )
            # torchvision's own initialisation of its ResNet convs.
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            setattr(module, name, conv)
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            dims = 3 if isinstance(child, nn.BatchNorm3d) else 2
            setattr(module, name, make_norm(norm, scaled(child.num_features), dims))
        else:
            reshape_trunk(child, width, norm)


def check_trunk_setup(config: VideoResNetTransformerConfig | FrameResNetTransformerConfig) -> None:
    if config.norm not in NORMS:
        raise ValueError(f"unknown norm {config.norm!r}; choose one of: {', '.join(NORMS)}")
    if config.width < 4 or config.width % 4:
        raise ValueError(f"width must be a multiple of 4 (torchvision's trunk: 64), got {config.width}")
    if config.init == "vit" and (config.width != TORCHVISION_WIDTH or config.norm not in ("auto", "batch")):
        raise ValueError(f"init 'vit' builds torchvision's trunk (width 64, BatchNorm), the one its weights fit; got "
                         f"width {config.width}, norm {config.norm}: drop them or train from scratch (init 'scratch')")


def trunk_norm(config: VideoResNetTransformerConfig | FrameResNetTransformerConfig) -> str:
    """The trunk's norm layer: `auto` is torchvision's BatchNorm with weights, the family's `scratch_norm`
    without."""
    if config.norm != "auto":
        return config.norm
    return "batch" if config.init == "vit" else config.scratch_norm


def check_norm_map(config: VideoResNetTransformerConfig | FrameResNetTransformerConfig, grid: tuple[int, ...],
                   clip: str, larger: str) -> None:
    """Instance norm over a one-element map (the trunk's last, 1x1x1 for a video trunk, 1x1 per frame) subtracts
    the element from itself: the trunk outputs its norm's bias whatever the clip, and nothing learns. Refused
    with the option or size to change; `clip` names the input, `larger` what makes the map larger."""
    if trunk_norm(config) == "instance" and math.prod(grid) == 1:
        shape = "x".join(map(str, grid))
        raise ValueError(f"norm instance on {clip}: the trunk's last feature map is {shape} (one element), where "
                         f"instance norm outputs zeros whatever the input: use {larger}, or norm batch or group")


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
        tokens_per_frame: int = 0,
    ) -> None:
        super().__init__()
        self.tokens_per_frame = tokens_per_frame  # > 0: tokens are (frames x tokens_per_frame), frames may vary
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
        """(B, L, D) -> logits (B, num_classes). L must equal num_tokens, except for frame token sequences
        (tokens_per_frame > 0), whose position embeddings are linearly resampled in time to L / tokens_per_frame
        frames."""
        pos = self.pos_embed
        if tokens.shape[1] + 1 != pos.shape[1] and self.tokens_per_frame:
            frames = tokens.shape[1] // self.tokens_per_frame
            grid = rearrange(pos[:, 1:], "1 (t n) d -> 1 (n d) t", n=self.tokens_per_frame)
            resized = F.interpolate(grid, size=frames, mode="linear", align_corners=False)  # (1, n*D, frames)
            resized = rearrange(resized, "1 (n d) t -> 1 (t n) d", n=self.tokens_per_frame)
            pos = torch.cat([pos[:, :1], resized], dim=1)
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + pos  # (B, 1+L, D)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.head(self.head_drop(self.norm(x[:, 0])))


@dataclass
class VideoResNetTransformerConfig:
    scratch_norm: ClassVar[str] = "instance"  # what norm "auto" means without weights (see `norm`)
    # The fields a set-up decides: a model started from the weights of another model of ours takes them
    # from that model unless set (see TimeSformerConfig.setup_fields).
    setup_fields: ClassVar[tuple[str, ...]] = ("init", "norm", "width")
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
    # "vit": torchvision's trunk exactly (the set-up its weights need), head position embeddings std 0.02;
    # "scratch": the trunk reshaped by `norm` and `width`, embeddings drawn with embed_std. "auto" is "scratch"
    # here, and a run config makes it "vit" when model.pretrained loads weights (see TimeSformerConfig.init).
    init: str = "auto"
    embed_std: float = 0.5
    # Trunk norm layer: batch | group | instance; "auto" = batch with init vit, instance from scratch: a 3D trunk
    # normalises over whole clips, and at a few clips per device BatchNorm's statistics are too noisy to train
    # on (docs/models.md: from scratch, R3D with instance norm was at 97.5% on the demo set by step 100, with
    # BatchNorm at 17%, and 88.5% by step 300).
    norm: str = "auto"
    # Trunk base channels (stages: width, 2x, 4x, 8x); 64 is torchvision's, the only width its weights fit.
    width: int = 64

    def resolved(self) -> VideoResNetTransformerConfig:
        """This config with every `auto` replaced by what it builds."""
        init = "scratch" if self.init == "auto" else self.init
        return dataclasses.replace(self, init=init, norm=trunk_norm(dataclasses.replace(self, init=init)))

    def check_clip(self, frames: int, height: int, width: int) -> None:
        """Refuse a clip size this model builds but cannot learn from (ValueError naming what to change)."""
        check_video_clip_size(self, frames, height, width)

    def __post_init__(self) -> None:
        check_init_setup(self.init, self.embed_std)
        check_trunk_setup(self)
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


def video_trunk_grid(config: VideoResNetTransformerConfig, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(t, h, w) of a video trunk's last feature map for a clip of that size (MC3 keeps time after its stem)."""
    time_halvings = 0 if config.trunk == "mc3_18" else 3
    return _halve(frames, time_halvings), _halve(height, 4), _halve(width, 4)


def check_video_clip_size(config: VideoResNetTransformerConfig, frames: int, height: int, width: int) -> None:
    """A clip of that size gives the trunk a map its norm can normalise (see `check_norm_map`)."""
    grid = video_trunk_grid(config, frames, height, width)
    more_frames = "" if config.trunk == "mc3_18" else " or more than 8 frames (data.num_frames)"
    check_norm_map(config, grid, f"{config.trunk} clips of {frames}x{height}x{width}",
                   f"clips larger than 16x16 (data.size){more_frames}")


def check_frame_size(config: FrameResNetTransformerConfig, height: int, width: int) -> None:
    """A frame of that size gives the 2D trunk a map its norm can normalise (see `check_norm_map`)."""
    check_norm_map(config, (_halve(height, 5), _halve(width, 5)), f"{height}x{width} frames",
                   "frames larger than 32x32 (data.size)")


class TrunkTransformer(nn.Module):
    """What both CNN + transformer models share: ResNet-18 trunk stages (torchvision names under `trunk.`),
    a projection to the head's width, the transformer head, trunk freezing and activation checkpointing."""

    def __init__(
        self,
        config: VideoResNetTransformerConfig | FrameResNetTransformerConfig,
        num_classes: int,
        trunk: nn.ModuleDict,
        num_tokens: int,
        tokens_per_frame: int = 0,
    ) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        norm = trunk_norm(config)
        if (config.width, norm) != (TORCHVISION_WIDTH, "batch"):
            reshape_trunk(trunk, config.width, norm)
        self.trunk = trunk
        channels = 8 * config.width  # the last stage's
        self.proj = nn.Identity() if config.hidden_dim == channels else nn.Linear(channels, config.hidden_dim)
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
            tokens_per_frame=tokens_per_frame,
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
        return video_trunk_grid(self.config, frames, height, width)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _check_clip(video)
        grid = self.trunk_output_grid(*video.shape[2:])
        check_video_clip_size(self.config, *video.shape[2:])
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
    scratch_norm: ClassVar[str] = "batch"  # see `norm`
    setup_fields: ClassVar[tuple[str, ...]] = ("init", "norm", "width", "temporal_shift")
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
    # Trunk norm layer, as VideoResNetTransformerConfig.norm, but "auto" is BatchNorm from scratch too: this
    # trunk normalises single frames, B x T per device (64 in the demo), and instance norm over the last
    # stage's 1x1 or 2x2 maps erases the features (docs/models.md).
    norm: str = "auto"
    width: int = 64  # as VideoResNetTransformerConfig.width
    # Each frame's last feature map is average-pooled to token_size x token_size tokens (1: torchvision's
    # global pool, one token per frame).
    token_size: int = 1
    # Temporal shift (TSM, Lin et al. 2019) in every residual block: a quarter of the channels of the block's
    # input come from the previous (1/8) and the next (1/8) frame, so the 2D convolutions see motion at no
    # extra cost. "auto": on from scratch, off with weights (torchvision's network unchanged); "on" with
    # weights loads ImageNet ResNet-18 weights into a shifted trunk (TSM's own recipe).
    temporal_shift: str = "auto"

    def resolved(self) -> FrameResNetTransformerConfig:
        """This config with every `auto` replaced by what it builds."""
        init = "scratch" if self.init == "auto" else self.init
        shift = self.temporal_shift if self.temporal_shift != "auto" else ("off" if init == "vit" else "on")
        return dataclasses.replace(self, init=init, norm=trunk_norm(dataclasses.replace(self, init=init)),
                                   temporal_shift=shift)

    def check_clip(self, frames: int, height: int, width: int) -> None:
        """Refuse a clip size this model builds but cannot learn from (ValueError naming what to change)."""
        check_frame_size(self, height, width)

    def __post_init__(self) -> None:
        check_init_setup(self.init, self.embed_std)
        check_trunk_setup(self)
        if self.temporal_shift not in ("auto", "on", "off"):
            raise ValueError(f"temporal_shift must be auto, on or off, got {self.temporal_shift!r}")
        for name in ("num_frames", "hidden_dim", "num_layers", "num_heads", "token_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class TemporalShift:
    """Temporal shift (TSM): 1/8 of the channels of (B*T, C, H, W) frame features taken from the next frame and
    1/8 from the previous one (zeros at the clip's ends). Registered as a forward pre-hook on each residual
    block's first conv (TSM's "residual shift": the skip connection keeps the unshifted input), so parameter
    names stay torchvision's and ImageNet ResNet weights load into a shifted trunk. Written here because
    torchvision has no temporal shift."""

    def __init__(self) -> None:
        self.frames = 1  # the clip's T, set by the model before each forward

    def __call__(self, conv: nn.Module, inputs: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        (x,) = inputs
        fold = x.shape[1] // 8
        clips = rearrange(x, "(b t) c h w -> b t c h w", t=self.frames)
        shifted = torch.zeros_like(clips)
        shifted[:, :-1, :fold] = clips[:, 1:, :fold]  # from the next frame
        shifted[:, 1:, fold : 2 * fold] = clips[:, :-1, fold : 2 * fold]  # from the previous frame
        shifted[:, :, 2 * fold :] = clips[:, :, 2 * fold :]
        return (rearrange(shifted, "b t c h w -> (b t) c h w"),)


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
        tokens_per_frame = config.token_size**2
        super().__init__(config, num_classes, trunk, config.num_frames * tokens_per_frame, tokens_per_frame)
        self.pool = nn.AdaptiveAvgPool2d(config.token_size)
        self.temporal_shift = None
        if config.temporal_shift == "on" or (config.temporal_shift == "auto" and config.init != "vit"):
            self.temporal_shift = TemporalShift()
            for stage in ("layer1", "layer2", "layer3", "layer4"):
                for block in self.trunk[stage]:
                    block.conv1.register_forward_pre_hook(self.temporal_shift)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        _check_clip(video)
        batch = video.shape[0]
        check_frame_size(self.config, *video.shape[3:])
        if self.temporal_shift is not None:
            self.temporal_shift.frames = video.shape[2]
        x = self.run_trunk(rearrange(video, "b c t h w -> (b t) c h w"))  # (B*T, C, h, w)
        if min(x.shape[-2:]) < self.config.token_size:
            raise ValueError(f"a {video.shape[3]}x{video.shape[4]} frame gives a {x.shape[-2]}x{x.shape[-1]} "
                             f"feature map, smaller than token_size {self.config.token_size}: use larger clips or a "
                             f"lower token_size")
        tokens = rearrange(self.pool(x), "(b t) c h w -> b (t h w) c", b=batch)  # (B, T*s*s, C)
        return self.head(self.proj(tokens))
