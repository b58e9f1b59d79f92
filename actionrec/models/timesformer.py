"""TimeSformer (Bertasius, Wang, Torresani: "Is Space-Time Attention All You Need for Video Understanding?",
ICML 2021) with all five attention schemes of the paper's Table 1.

`space_only`, `joint_space_time` and `divided_space_time` compute exactly what the official
facebookresearch/TimeSformer code computes, and parameter names are the official ones (minus the outer
`model.` prefix of the official wrapper), so official checkpoints, HuggingFace `facebook/timesformer-*`
weights and ImageNet ViT weights load by name (see `pretrained.py`).

`sparse_local_global` and `axial` follow §3 of the paper (no public implementation exists). Each step of a
factorised block has its own LayerNorm, query/key/value, output projection and a zero-initialised linear on
the residual, exactly like the official divided block's temporal step; the last step of every block reuses
the block's `norm1`/`attn` and carries the cls token. That is what makes the Table 1 parameter counts
come out (one extra step: divided / L+G = 121.4M; two extra steps: axial = 156.8M):
- divided:  time (per spatial position) -> space (per frame, + cls)
- L+G:      local (all frames x one H/2 x W/2 quadrant) -> sparse global (the whole clip with a stride of
            2 patches in t, h and w: the 8 interleaved sub-grids attend within themselves, + cls)
- axial:    time -> width -> height (+ cls)

Inside the model the patch tokens of a clip are ordered (t, h, w); the official code orders them (h, w, t).
Attention is permutation-equivariant and every grouping below is written against the order used here, so
outputs are the same.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, reduce, repeat
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import StochasticDepth

from actionrec.models.layers import Attention, Mlp, PatchEmbed, check_init_setup

ATTENTION_TYPES = ("space_only", "joint_space_time", "divided_space_time", "sparse_local_global", "axial")


@dataclass
class TimeSformerConfig:
    """Architecture and regularisation of a TimeSformer (defaults: the official ViT-B/16, 8 x 224^2)."""

    # The fields a set-up decides (`init` and the from-scratch stem): a model started from the weights of
    # another model of ours takes them from that model unless set (the stride is not in the weights).
    setup_fields: ClassVar[tuple[str, ...]] = ("init", "stem_channels", "stem_layers", "stem_stride")

    num_frames: int = 8
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attention_type: str = "divided_space_time"
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.1
    head_dropout: float = 0.0
    layer_norm_eps: float = 1e-6
    # SDPA (flash / memory-efficient kernels on GPU); False runs the explicit softmax(QK^T)V path.
    fused_attn: bool = True
    # Recompute each block in the backward pass instead of storing its activations.
    grad_checkpointing: bool = False
    # How the network is set up (see `TimeSformer.reset_parameters`): "vit" is the official set-up for
    # fine-tuning from ImageNet ViT / TimeSformer weights; "scratch" adds a space-time conv stem and draws
    # visible position and time embeddings, for training without weights; "auto" is "scratch" here, and a
    # run config resolves it to "vit" when `model.pretrained` names a weights file.
    init: str = "auto"
    stem_channels: int = 16  # scratch: channels of the conv stem's first layer
    stem_layers: int = 2  # scratch: conv layers; each one after the first halves H and W and doubles channels
    stem_stride: int = 2  # scratch: spatial stride of the stem's first layer (1: 4x the stem's FLOPs)
    embed_std: float = 0.5  # scratch: std of the learnt position and time embeddings
    # What the classifier reads: "cls", the cls token (the official TimeSformer); "mean", the mean of the
    # normalised patch tokens (VideoMAE's fine-tuning: masked pre-training never trains the cls token).
    global_pool: str = "cls"

    def resolved(self) -> TimeSformerConfig:
        """This config with `auto` replaced by what it builds (`init: auto` builds the from-scratch set-up)."""
        return dataclasses.replace(self, init="scratch" if self.init == "auto" else self.init)

    def check_clip(self, frames: int, height: int, width: int) -> None:
        """Clip sizes are fields of this config (num_frames, img_size), checked when it is made."""

    def __post_init__(self) -> None:
        if self.global_pool not in ("cls", "mean"):
            raise ValueError(f"unknown global_pool {self.global_pool!r}; choose cls or mean")
        if self.attention_type not in ATTENTION_TYPES:
            raise ValueError(
                f"unknown attention_type {self.attention_type!r}; choose one of: {', '.join(ATTENTION_TYPES)}"
            )
        if self.img_size % self.patch_size != 0:
            raise ValueError(
                f"img_size {self.img_size} is not a multiple of patch_size {self.patch_size}: "
                f"use e.g. img_size={self.img_size // self.patch_size * self.patch_size}"
            )
        check_init_setup(self.init, self.embed_std)
        if self.stem_layers < 1 or self.stem_stride not in (1, 2) or self.patch_size % (self.stem_stride * 2 ** (self.stem_layers - 1)):
            raise ValueError(
                f"stem_layers must be >= 1 and stem_stride 1 or 2, with patch_size ({self.patch_size}) divisible by "
                f"stem_stride * 2**(stem_layers-1), got stem_layers={self.stem_layers}, stem_stride={self.stem_stride}"
            )
        if self.stem_channels < 1:
            raise ValueError(f"stem_channels must be >= 1, got {self.stem_channels}")
        if self.embed_dim % self.num_heads != 0:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        for name in ("num_frames", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.attention_type == "sparse_local_global":
            _check_local_global_grid(self.num_frames, self.img_size // self.patch_size, self.img_size // self.patch_size)


def _check_local_global_grid(frames: int, grid_h: int, grid_w: int) -> None:
    if frames % 2 or grid_h % 2 or grid_w % 2:
        raise ValueError(
            f"sparse_local_global attention splits the patch grid in halves and strides by 2 in t, h and w: "
            f"it needs an even number of frames and of patches per side, got {frames} frames and a "
            f"{grid_h}x{grid_w} patch grid (use e.g. 8 frames and a size that is an even multiple of the patch size)"
        )


def resize_space_embed(pos: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
    """Resample patch position embeddings (1, N, D) laid out on a square grid to a (h, w) grid -> (1, h*w, D)."""
    side = math.isqrt(pos.shape[1])
    if side * side != pos.shape[1]:
        raise ValueError(f"position embedding has {pos.shape[1]} patch entries, not a square grid")
    if (side, side) == tuple(grid):
        return pos
    pos_grid = rearrange(pos, "1 (h w) d -> 1 d h w", h=side)
    extra = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    pos_grid = F.interpolate(pos_grid.float(), size=tuple(grid), mode=mode, **extra).to(pos.dtype)
    return rearrange(pos_grid, "1 d h w -> 1 (h w) d")


def resize_time_embed(time: torch.Tensor, frames: int, mode: str) -> torch.Tensor:
    """Resample time embeddings (1, T, D) to (1, frames, D)."""
    if time.shape[1] == frames:
        return time
    extra = {"align_corners": False} if mode == "linear" else {}
    resized = F.interpolate(rearrange(time, "1 t d -> 1 d t").float(), size=frames, mode=mode, **extra)
    return rearrange(resized.to(time.dtype), "1 d t -> 1 t d")


class SpaceTimeBlock(nn.Module):
    """Pre-norm transformer block parts every scheme shares: `norm1`/`attn` (the step that carries the cls
    token; ImageNet ViT weights initialise it) and `norm2`/`mlp`."""

    def __init__(self, config: TimeSformerConfig, drop_path: float) -> None:
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.attn = self._attention(config)
        self.drop_path = StochasticDepth(drop_path, mode="row")
        self.norm2 = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), drop=config.drop_rate)

    @staticmethod
    def _attention(config: TimeSformerConfig) -> Attention:
        return Attention(
            config.embed_dim,
            config.num_heads,
            qkv_bias=config.qkv_bias,
            attn_drop=config.attn_drop_rate,
            proj_drop=config.drop_rate,
            fused=config.fused_attn,
        )

    def residual_fcs(self) -> list[nn.Linear]:
        """The linears on the residual of the extra (patch-only) steps; zero-initialised."""
        return []

    def _mlp_step(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def _patch_step(
        self,
        patches: torch.Tensor,
        norm: nn.LayerNorm,
        attn: Attention,
        fc: nn.Linear,
        to_groups: str,
        from_groups: str,
        sizes: dict[str, int],
    ) -> torch.Tensor:
        """Attention within groups of patch tokens (no cls), as the official divided block's temporal step."""
        groups = rearrange(patches, to_groups, **sizes)  # (B * groups, L, D)
        residual = rearrange(attn(norm(groups)), from_groups, **sizes)  # (B, T*h*w, D)
        return patches + fc(self.drop_path(residual))

    def _cls_step(self, x: torch.Tensor, to_groups: str, from_groups: str, sizes: dict[str, int]) -> torch.Tensor:
        """`attn` within groups of patches, each group joined by a copy of the cls token; the cls token's
        update is the mean over groups (the official divided block's spatial step)."""
        cls_token, patches = x[:, :1], x[:, 1:]
        groups = rearrange(patches, to_groups, **sizes)  # (B * G, L, D)
        num_groups = groups.shape[0] // x.shape[0]
        cls_copies = repeat(cls_token, "b 1 d -> (b g) 1 d", g=num_groups)
        out = self.attn(self.norm1(torch.cat([cls_copies, groups], dim=1)))  # (B * G, 1 + L, D)
        cls_residual = reduce(out[:, :1], "(b g) 1 d -> b 1 d", "mean", g=num_groups)
        patch_residual = rearrange(out[:, 1:], from_groups, **sizes)  # (B, T*h*w, D)
        return x + self.drop_path(torch.cat([cls_residual, patch_residual], dim=1))


class SpaceTimeStem(nn.Module):
    """Conv 3x3x3 + instance norm + ReLU layers before the patch projection (the from-scratch set-up): the
    first at spatial stride `first_stride`, each further one at stride (1, 2, 2) with twice the channels.
    Stride-2 convolutions as in "Early convolutions help transformers see better" (Xiao et al., 2021);
    a first layer at full resolution (first_stride=1) costs as much as the whole demo transformer, and
    the demo's runs with it took off no earlier (docs/demo.md).

    Why a stem: from scratch on a few hundred videos, a TimeSformer over raw patches memorises them instead
    of learning motion. Two space-time convolutions see about 7 pixels and 5 frames, enough to tell the
    direction of a local motion of a few pixels per frame, so every patch token starts with motion features
    (the inductive bias a 3D CNN has) and attention only has to gather them.
    Why instance norm (GroupNorm with one group per channel): it removes each clip's own offset and scale
    of every feature. With BatchNorm the background colour of a clip moves every ReLU's operating point, and
    on clips of random colours neither this stem nor a plain 3D CNN learned a moving square in 150-600 steps;
    with instance norm both learn it within 150 (docs/demo.md). It also needs no batch statistics,
    so it behaves the same at any per-device batch, in eval mode and across ranks.
    `temporal_kernel=1` makes the stem per-frame: used for `space_only`, which must stay blind to frame order.
    """

    def __init__(self, in_chans: int, channels: int, layers: int = 2, temporal_kernel: int = 3, first_stride: int = 2) -> None:
        super().__init__()
        convs = []
        for i in range(layers):
            out = channels * 2**i
            stride = (1, first_stride, first_stride) if i == 0 else (1, 2, 2)
            convs += [
                nn.Conv3d(in_chans, out, (temporal_kernel, 3, 3), stride, (temporal_kernel // 2, 1, 1), bias=False),
                nn.GroupNorm(out, out),  # per clip and channel (instance norm), see the class docstring
                nn.ReLU(inplace=True),
            ]
            in_chans = out
        self.layers = nn.Sequential(*convs)
        self.out_channels = in_chans
        self.downsample = first_stride * 2 ** (layers - 1)

    def forward(self, video: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, T, H, W) -> (B, out_channels, T, H / downsample, W / downsample).

        keep: (B, h, w) bool, the visible patches of masked pre-training (the same in every frame). Then no
        pixel of a hidden patch reaches a visible one: the input of every conv is zero outside the visible
        patches (so a receptive field that crosses a patch border reads zeros there, as at the clip's edge),
        and the instance norm takes its statistics over the visible positions only. With every patch
        visible this computes exactly what the plain stem computes, so a pre-trained stem fine-tunes as it is.
        """
        if keep is None:
            return self.layers(video)
        keep = keep[:, None, None].to(video.dtype)  # (B, 1, 1, h, w)
        x = video
        for conv, norm, relu in zip(self.layers[0::3], self.layers[1::3], self.layers[2::3]):
            x = conv(x * _patch_mask_at(keep, x.shape[-2:]))
            out_keep = _patch_mask_at(keep, x.shape[-2:])
            x = relu(_masked_instance_norm(x, out_keep, norm)) * out_keep
        return x


def _patch_mask_at(keep: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A patch-grid mask (B, 1, 1, h, w) at a feature map's resolution (every patch covers whole pixels)."""
    return keep.repeat_interleave(size[0] // keep.shape[-2], dim=-2).repeat_interleave(size[1] // keep.shape[-1], dim=-1)


def _masked_instance_norm(x: torch.Tensor, keep: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """`norm` (GroupNorm with one group per channel) with its statistics over the positions where keep is 1:
    x (B, C, T, H, W), keep (B, 1, 1, H, W)."""
    count = keep.sum(dim=(-2, -1), keepdim=True) * x.shape[2]  # (B, 1, 1, 1, 1)
    mean = (x * keep).sum(dim=(2, 3, 4), keepdim=True) / count  # (B, C, 1, 1, 1)
    var = (((x - mean) * keep) ** 2).sum(dim=(2, 3, 4), keepdim=True) / count
    shape = (1, -1, 1, 1, 1)
    return (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight.view(shape) + norm.bias.view(shape)


class JointSpaceTimeBlock(SpaceTimeBlock):
    """Attention over every token it is given: one frame + cls (`space_only`) or the whole clip + cls
    (`joint_space_time`)."""

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return self._mlp_step(x)


class DividedSpaceTimeBlock(SpaceTimeBlock):
    """Time attention (each spatial position over the T frames), then space attention (each frame + cls)."""

    def __init__(self, config: TimeSformerConfig, drop_path: float) -> None:
        super().__init__(config, drop_path)
        self.temporal_norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.temporal_attn = self._attention(config)
        self.temporal_fc = nn.Linear(config.embed_dim, config.embed_dim)

    def residual_fcs(self) -> list[nn.Linear]:
        return [self.temporal_fc]

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        sizes = dict(t=t, h=h, w=w)
        patches = self._patch_step(
            x[:, 1:], self.temporal_norm1, self.temporal_attn, self.temporal_fc,
            "b (t h w) d -> (b h w) t d", "(b h w) t d -> b (t h w) d", sizes,
        )
        x = torch.cat([x[:, :1], patches], dim=1)
        x = self._cls_step(x, "b (t h w) d -> (b t) (h w) d", "(b t) (h w) d -> b (t h w) d", sizes)
        return self._mlp_step(x)


class SparseLocalGlobalBlock(SpaceTimeBlock):
    """Local attention within F x H/2 x W/2 neighbourhoods (the four spatial quadrants over all frames),
    then sparse global attention over the whole clip with a stride of 2 patches in t, h and w (+ cls)."""

    def __init__(self, config: TimeSformerConfig, drop_path: float) -> None:
        super().__init__(config, drop_path)
        self.local_norm1 = nn.LayerNorm(config.embed_dim, eps=config.layer_norm_eps)
        self.local_attn = self._attention(config)
        self.local_fc = nn.Linear(config.embed_dim, config.embed_dim)

    def residual_fcs(self) -> list[nn.Linear]:
        return [self.local_fc]

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        # Quadrants: h = (qh hh) with qh=2 contiguous halves; same for w.
        local = dict(t=t, qh=2, hh=h // 2, qw=2, ww=w // 2)
        patches = self._patch_step(
            x[:, 1:], self.local_norm1, self.local_attn, self.local_fc,
            "b (t qh hh qw ww) d -> (b qh qw) (t hh ww) d", "(b qh qw) (t hh ww) d -> b (t qh hh qw ww) d", local,
        )
        x = torch.cat([x[:, :1], patches], dim=1)
        # Stride 2: t = (tt st) with st the offset in the stride; tokens sharing (st, sh, sw) attend together.
        strided = dict(tt=t // 2, st=2, hh=h // 2, sh=2, ww=w // 2, sw=2)
        x = self._cls_step(
            x, "b (tt st hh sh ww sw) d -> (b st sh sw) (tt hh ww) d",
            "(b st sh sw) (tt hh ww) d -> b (tt st hh sh ww sw) d", strided,
        )
        return self._mlp_step(x)


class AxialBlock(SpaceTimeBlock):
    """Axial attention: over time, then over width, then over height (+ cls)."""

    def __init__(self, config: TimeSformerConfig, drop_path: float) -> None:
        super().__init__(config, drop_path)
        dim, eps = config.embed_dim, config.layer_norm_eps
        self.temporal_norm1 = nn.LayerNorm(dim, eps=eps)
        self.temporal_attn = self._attention(config)
        self.temporal_fc = nn.Linear(dim, dim)
        self.width_norm1 = nn.LayerNorm(dim, eps=eps)
        self.width_attn = self._attention(config)
        self.width_fc = nn.Linear(dim, dim)

    def residual_fcs(self) -> list[nn.Linear]:
        return [self.temporal_fc, self.width_fc]

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        t, h, w = grid
        sizes = dict(t=t, h=h, w=w)
        patches = self._patch_step(
            x[:, 1:], self.temporal_norm1, self.temporal_attn, self.temporal_fc,
            "b (t h w) d -> (b h w) t d", "(b h w) t d -> b (t h w) d", sizes,
        )
        patches = self._patch_step(
            patches, self.width_norm1, self.width_attn, self.width_fc,
            "b (t h w) d -> (b t h) w d", "(b t h) w d -> b (t h w) d", sizes,
        )
        x = torch.cat([x[:, :1], patches], dim=1)
        x = self._cls_step(x, "b (t h w) d -> (b t w) h d", "(b t w) h d -> b (t h w) d", sizes)
        return self._mlp_step(x)


BLOCK_TYPES: dict[str, type[SpaceTimeBlock]] = {
    "space_only": JointSpaceTimeBlock,
    "joint_space_time": JointSpaceTimeBlock,
    "divided_space_time": DividedSpaceTimeBlock,
    "sparse_local_global": SparseLocalGlobalBlock,
    "axial": AxialBlock,
}


class TimeSformer(nn.Module):
    """Video transformer over per-frame 2D patches: float clip (B, C, T, H, W) -> logits (B, num_classes).

    Clips whose frame count or size differ from the config are accepted (H and W multiples of the patch
    size): position and time embeddings are then resampled with nearest-neighbour interpolation, as the
    official code does at test time. Loading a checkpoint trained at another size resamples the stored
    embeddings once instead (bicubic / linear, see `pretrained.py`).
    """

    def __init__(self, config: TimeSformerConfig, num_classes: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        dim = config.embed_dim
        grid = config.img_size // config.patch_size
        self.setup = "vit" if config.init == "vit" else "scratch"
        if self.setup == "scratch":
            temporal_kernel = 1 if config.attention_type == "space_only" else 3
            self.stem = SpaceTimeStem(config.in_chans, config.stem_channels, config.stem_layers, temporal_kernel,
                                       config.stem_stride)
            self.patch_embed = PatchEmbed(config.patch_size // self.stem.downsample, self.stem.out_channels, dim)
        else:
            self.patch_embed = PatchEmbed(config.patch_size, config.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, dim))
        self.pos_drop = nn.Dropout(config.drop_rate)
        if config.attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, config.num_frames, dim))
            self.time_drop = nn.Dropout(config.drop_rate)
        drop_path_rates = [config.drop_path_rate * i / max(config.depth - 1, 1) for i in range(config.depth)]
        block_type = BLOCK_TYPES[config.attention_type]
        self.blocks = nn.ModuleList(block_type(config, rate) for rate in drop_path_rates)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.head_drop = nn.Dropout(config.head_dropout)
        self.head = nn.Linear(dim, num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """`vit`: the official initialisation: truncated normal (std 0.02) linears and embeddings, zero time
        embedding, and zero residual linears of the extra steps so that every block starts as its image
        (space-only) counterpart. (The official code zeroes every block's `temporal_fc`: its `i > 0` test
        counts the ModuleList itself as the first match.)

        `scratch`: linears are drawn Xavier-uniform (as MAE and big_vision draw ViTs trained from scratch),
        position and time embeddings with `embed_std`, and the residual linears like every other linear.
        The official set-up starts the network blind to frame order (zero time embedding, zero temporal steps)
        with position signals 20x smaller than the patch content, which suits an ImageNet image model being
        extended to video but leaves a fresh network without the position and time it needs to learn motion.
        Its std 0.02 is also width-blind: Xavier gives std 0.07-0.14 at the demo's width of 96, while 0.02
        suits 768-wide ViT-B. With 0.02 the demo's loss sat at chance (ln 10) for 200 to over 600 steps
        before falling, a different number every run; with Xavier it fell from step 230-390 in each of
        8 seeds (docs/demo.md)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if self.setup == "scratch":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.setup == "scratch":
            std = self.config.embed_std
            nn.init.trunc_normal_(self.pos_embed, std=std, a=-2 * std, b=2 * std)
            if hasattr(self, "time_embed"):
                nn.init.trunc_normal_(self.time_embed, std=std, a=-2 * std, b=2 * std)
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for block in self.blocks:
            for fc in block.residual_fcs():
                nn.init.zeros_(fc.weight)
                nn.init.zeros_(fc.bias)

    def set_fused_attn(self, enabled: bool) -> None:
        """Switch every attention between SDPA (True) and the explicit eager path (False)."""
        self.config.fused_attn = enabled
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = enabled

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in the backward pass (less activation memory, same outputs and gradients)."""
        self.config.grad_checkpointing = enabled

    def _check_input(self, video: torch.Tensor) -> None:
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != cfg.in_chans:
            raise ValueError(f"expected a clip batch (B, {cfg.in_chans}, T, H, W), got shape {tuple(video.shape)}")
        if not video.is_floating_point():
            raise TypeError(f"expected a float clip, got {video.dtype}: normalise uint8 clips first")
        height, width = video.shape[-2:]
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(
                f"clip size {height}x{width} is not a multiple of patch_size {cfg.patch_size}: "
                f"crop or resize clips to a multiple of {cfg.patch_size} (e.g. {cfg.img_size})"
            )
        if cfg.attention_type == "sparse_local_global":
            _check_local_global_grid(video.shape[2], height // cfg.patch_size, width // cfg.patch_size)

    def embed(self, video: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
        """(B, C, T, H, W) -> patch tokens with position (and time) embeddings (B, T, N, D) and the patch grid
        (h, w). keep: (B, N) bool, the patches visible in masked pre-training (see SpaceTimeStem.forward)."""
        self._check_input(video)
        if self.setup == "scratch":
            grid = (video.shape[-2] // self.config.patch_size, video.shape[-1] // self.config.patch_size)
            stem_keep = None if keep is None else rearrange(keep, "b (h w) -> b h w", h=grid[0], w=grid[1])
            video = self.stem(video, stem_keep)  # (B, stem out channels, T, H / 4, W / 4) with the default 2 layers
        patches, grid_h, grid_w = self.patch_embed(video)  # (B, T, N, D); each token sees its own patch only
        pos = resize_space_embed(self.pos_embed[:, 1:], (grid_h, grid_w), mode="nearest")  # (1, N, D)
        patches = self.pos_drop(patches + pos.unsqueeze(1))
        if self.config.attention_type != "space_only":
            time = resize_time_embed(self.time_embed, video.shape[2], mode="nearest")  # (1, T, D)
            patches = self.time_drop(patches + time.unsqueeze(2))
        return patches, grid_h, grid_w

    def encode(self, patches: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Patch tokens (B, T, L, D) laid out on grid (T, h, w), L = h * w -> the blocks' output with the cls
        token first: (B, 1 + T*L, D), or for space_only (B*T, 1 + L, D), before the final norm."""
        batch, frames = patches.shape[:2]
        cls_token = self.pos_drop(self.cls_token + self.pos_embed[:, :1])  # (1, 1, D)
        if self.config.attention_type == "space_only":
            # Every frame is its own sequence with its own cls copy; frames are averaged at the end.
            tokens = torch.cat(
                [cls_token.expand(batch * frames, -1, -1), rearrange(patches, "b t n d -> (b t) n d")], dim=1
            )  # (B*T, 1+N, D)
        else:
            tokens = torch.cat(
                [cls_token.expand(batch, -1, -1), rearrange(patches, "b t n d -> b (t n) d")], dim=1
            )  # (B, 1+T*N, D)
        for block in self.blocks:
            if self.config.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, grid, use_reentrant=False)
            else:
                tokens = block(tokens, grid)
        return tokens

    def forward_features(self, video: torch.Tensor) -> torch.Tensor:
        """(B, C, T, H, W) -> normalised cls features, or the mean of the normalised patch tokens (B, D)."""
        frames = video.shape[2]
        patches, grid_h, grid_w = self.embed(video)
        tokens = self.encode(patches, (frames, grid_h, grid_w))
        if self.config.global_pool == "mean":  # space_only: (B*T, 1+N, D), else (B, 1+T*N, D)
            return reduce(self.norm(tokens[:, 1:]), "(b t) n d -> b d", "mean", b=video.shape[0])
        if self.config.attention_type == "space_only":
            # Official space-only baseline: average the frames' tokens, then the final norm.
            return self.norm(reduce(tokens[:, 0], "(b t) d -> b d", "mean", t=frames))
        return self.norm(tokens[:, 0])

    def forward_visible(self, video: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Masked pre-training: encode only the visible patches. visible: (B, V) indices of the patch positions
        each clip shows (the same V in every frame: tube masking) -> normalised patch tokens (B, T, V, D).

        Defined for the schemes whose attention groups stay whole under tube masking: joint (all tokens),
        divided (each position over time: all T frames of a visible position are visible; each frame over
        its V visible positions) and space-only (each frame). Sparse local-global and axial attend within
        quadrants and rows of the patch grid, which a random mask leaves with a different number of visible
        tokens in every clip: refused (see actionrec/models/masked.py)."""
        if self.config.attention_type not in ("space_only", "joint_space_time", "divided_space_time"):
            raise ValueError(f"attention_type {self.config.attention_type!r} cannot encode visible tokens only "
                             "(its groups are quadrants or rows of the patch grid); use joint_space_time, "
                             "divided_space_time or space_only")
        batch, _, frames = video.shape[:3]
        num_patches = (video.shape[-2] // self.config.patch_size) * (video.shape[-1] // self.config.patch_size)
        keep = torch.zeros(batch, num_patches, dtype=torch.bool, device=video.device).scatter_(1, visible, True)
        patches, _, _ = self.embed(video, keep)  # (B, T, N, D)
        dim = patches.shape[-1]
        index = repeat(visible, "b v -> b t v d", t=frames, d=dim)
        patches = patches.gather(2, index)  # (B, T, V, D)
        # Divided attention groups tokens by (h, w) position: the V visible positions as a (V, 1) grid.
        tokens = self.encode(patches, (frames, visible.shape[1], 1))
        if self.config.attention_type == "space_only":
            return self.norm(rearrange(tokens[:, 1:], "(b t) v d -> b t v d", t=frames))
        return self.norm(rearrange(tokens[:, 1:], "b (t v) d -> b t v d", t=frames))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.forward_features(video)))
