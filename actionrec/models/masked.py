"""Masked video modelling (VideoMAE, Tong et al., NeurIPS 2022) around a TimeSformer encoder.

    model = MaskedVideoModel(build_model("timesformer_tiny", num_classes=1), mask_ratio=0.9)
    mask = model.random_mask(batch=8)                        # (B, N) True = hidden patch position
    pred = model(video, mask)                                # (B, T/tubelet, M, tubelet*p*p*C)
    target = cube_targets(video, mask, patch_size=16)        # the same shape; loss = MSE(pred, target)

- Tube masking: each clip hides `mask_ratio` of the patch positions, drawn at random per clip, in every
  frame (so a hidden patch cannot be copied from the frame before).
- The encoder (a TimeSformer, `forward_visible`) runs on the visible tokens only: at 90 % masking it
  attends over a tenth of the tokens, which is what makes pre-training cheap. Defined for `joint_space_time`,
  `divided_space_time` and `space_only` (see `check_maskable`).
- A light decoder (its own width and depth, joint attention over all cubes) gets the encoder's tokens,
  pairs of frames (`tubelet`) concatenated into one token per cube, plus a learnt mask token at every
  hidden cube, and predicts the pixels of the hidden cubes (tubelet frames x patch x patch x C).
- Targets (`target`): "pixels", each cube's pixels normalised by the cube's own mean and std per channel
  (VideoMAE's `normlize_target`; without it the loss is dominated by a cube's mean colour); or "motion",
  each cube's pixels minus the cube's mean frame (what moves; a still background is zero), which is what
  made pre-training help a few-label fine-tune on our motion data (docs/pretrain.md); or "hog" (MaskFeat, Wei et
  al. 2022), the histograms of oriented gradients of each hidden cube's frames (`actionrec/models/hog.py`):
  local shape, invariant to brightness and contrast, and averaged over 8 x 8 cells, so per-pixel noise
  mostly cancels.

Pure PyTorch: the loss and the training loop are engine code (actionrec/engine/pretraining.py).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from actionrec.models.hog import HOG_BINS, HOG_CELL, histograms_of_oriented_gradients
from actionrec.models.layers import Attention, Mlp
from actionrec.models.timesformer import TimeSformer

MASKABLE_ATTENTION = ("space_only", "joint_space_time", "divided_space_time")


def check_maskable(attention_type: str) -> None:
    """Tube masking keeps every attention group of these schemes whole, with the same number of visible
    tokens in every clip. Sparse local-global (quadrants, strided sub-grids) and axial (rows, columns) would
    get groups of a different size in every clip; encoding visible tokens only is not defined for them."""
    if attention_type not in MASKABLE_ATTENTION:
        raise ValueError(
            f"masked pre-training encodes visible tokens only, which is defined for {', '.join(MASKABLE_ATTENTION)}; "
            f"{attention_type} attends within quadrants / rows of the patch grid, which a random mask leaves "
            "uneven: pre-train one of those schemes instead"
        )


def tube_mask(batch: int, num_patches: int, ratio: float, generator: torch.Generator | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """(B, N) bool, True = hidden: exactly round(ratio * N) positions per clip (at least one hidden and one
    visible), a different random choice in every clip."""
    num_masked = min(max(round(ratio * num_patches), 1), num_patches - 1)
    noise = torch.rand(batch, num_patches, generator=generator)
    hidden = noise.argsort(dim=1)[:, :num_masked]
    mask = torch.zeros(batch, num_patches, dtype=torch.bool).scatter_(1, hidden, True)
    return mask.to(device) if device is not None else mask


def split_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N) mask -> (visible (B, V), hidden (B, M)) position indices, each in increasing order."""
    counts = mask.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError("every clip of a batch must hide the same number of patches (use tube_mask)")
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, then hidden
    visible = mask.shape[1] - int(counts[0])
    return order[:, :visible], order[:, visible:]


def video_to_cubes(video: torch.Tensor, patch_size: int, tubelet: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T/tubelet, N, tubelet*p*p, C): the pixels of every cube."""
    return rearrange(video, "b c (tc k) (h p) (w q) -> b tc (h w) (k p q) c", k=tubelet, p=patch_size, q=patch_size)


def cubes_to_video(cubes: torch.Tensor, grid: tuple[int, int], patch_size: int, tubelet: int) -> torch.Tensor:
    """Inverse of `video_to_cubes`: (B, T/tubelet, N, tubelet*p*p, C) -> (B, C, T, H, W)."""
    return rearrange(cubes, "b tc (h w) (k p q) c -> b c (tc k) (h p) (w q)",
                     h=grid[0], w=grid[1], k=tubelet, p=patch_size, q=patch_size)


def normalise_cubes(cubes: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per cube and channel: (cubes - mean) / (std + eps) over the cube's pixels -> (normalised, mean, std).
    Invariant to any per-channel affine map of the input, so it does not matter which normalisation the
    clips went through before."""
    mean = cubes.mean(dim=-2, keepdim=True)
    std = cubes.var(dim=-2, unbiased=True, keepdim=True).sqrt()
    return (cubes - mean) / (std + eps), mean, std


def gather_cubes(cubes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """cubes (B, Tc, N, ...) at positions (B, M) -> (B, Tc, M, ...)."""
    index = positions[:, None, :].expand(cubes.shape[0], cubes.shape[1], -1)
    index = index.reshape(*index.shape, *([1] * (cubes.ndim - 3))).expand(-1, -1, -1, *cubes.shape[3:])
    return cubes.gather(2, index)


TARGETS = ("pixels", "motion", "hog")


def motion_cubes(cubes: torch.Tensor, tubelet: int) -> torch.Tensor:
    """(B, Tc, N, k*p*p, C) -> each cube's pixels minus the cube's own mean over its k frames: what changes
    between the cube's frames. A static background (and a constant colour, a brightness offset) gives zero."""
    frames = rearrange(cubes, "b tc n (k pq) c -> b tc n k pq c", k=tubelet)
    return rearrange(frames - frames.mean(dim=3, keepdim=True), "b tc n k pq c -> b tc n (k pq) c")


def hog_cubes(video: torch.Tensor, patch_size: int, tubelet: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T/tubelet, N, k*(p/cell)^2*bins, C): the HOG cells of every cube's frames. The
    gradients are taken over whole frames, so a cube's border pixels see their true neighbours."""
    batch, _, frames, _, _ = video.shape
    hog = histograms_of_oriented_gradients(rearrange(video, "b c t h w -> (b t) c h w"))  # (B*T, C, bins, H/8, W/8)
    cells = patch_size // HOG_CELL
    return rearrange(hog, "(b tc k) c n (h i) (w j) -> b tc (h w) (k i j n) c", b=batch, k=tubelet, i=cells, j=cells)


def target_size(target: str, patch_size: int, tubelet: int, channels: int) -> int:
    """The length of one cube's target vector (what the decoder's head predicts per hidden cube)."""
    if target == "hog":
        return tubelet * (patch_size // HOG_CELL) ** 2 * HOG_BINS * channels
    return tubelet * patch_size**2 * channels


def cube_targets(video: torch.Tensor, mask: torch.Tensor, patch_size: int, tubelet: int = 2,
                 normalise: bool = True, target: str = "pixels") -> torch.Tensor:
    """What the decoder predicts for the hidden cubes: (B, T/tubelet, M, target_size), float32.
    `target="pixels"`: the cube's pixels (normalised per cube and channel with `normalise`); "motion": the
    cube's change over its frames (`motion_cubes`, in the clip's normalised pixel units, not normalised per
    cube: a static cube's target is zero plus sensor noise, which per-cube normalisation would blow up);
    "hog": the cube's frames' histograms of oriented gradients (`hog_cubes`)."""
    if target == "hog":
        _, hidden = split_positions(mask)
        return rearrange(gather_cubes(hog_cubes(video.float(), patch_size, tubelet), hidden),
                         "b tc m kpq c -> b tc m (kpq c)")
    cubes = video_to_cubes(video.float(), patch_size, tubelet)  # (B, Tc, N, k*p*p, C)
    if target == "motion":
        cubes = motion_cubes(cubes, tubelet)
    elif target != "pixels":
        raise ValueError(f"unknown pre-training target {target!r}: use one of {', '.join(TARGETS)}")
    elif normalise:
        cubes = normalise_cubes(cubes)[0]
    _, hidden = split_positions(mask)
    return rearrange(gather_cubes(cubes, hidden), "b tc m kpq c -> b tc m (kpq c)")


class DecoderBlock(nn.Module):
    """Pre-norm transformer block over all cube tokens (joint attention)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float, fused: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, fused=fused)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MaskedVideoModel(nn.Module):
    """A TimeSformer encoder and a light decoder for masked video pre-training; `encoder` is what a
    classifier later loads (`load_pretrained(classifier, run_dir)`: stem, patch projection, embeddings, blocks).

    forward(video (B, C, T, H, W), mask (B, N) bool) -> predicted hidden cubes (B, T/tubelet, M, target_size):
    tubelet*p*p*C values per cube for pixels and motion, tubelet*(p/8)^2*9*C histogram bins for hog.
    """

    def __init__(self, encoder: TimeSformer, mask_ratio: float = 0.9, tubelet: int = 2, decoder_dim: int = 0,
                 decoder_depth: int = 4, decoder_heads: int = 0, norm_target: bool = True,
                 target: str = "pixels") -> None:
        super().__init__()
        config = encoder.config
        check_maskable(config.attention_type)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if target not in TARGETS:
            raise ValueError(f"unknown pre-training target {target!r}: use one of {', '.join(TARGETS)}")
        if target == "motion" and tubelet < 2:
            raise ValueError("target motion predicts the change over a cube's frames: it needs tubelet >= 2")
        if target == "hog" and config.patch_size % HOG_CELL:
            raise ValueError(f"target hog takes histograms over {HOG_CELL}x{HOG_CELL}-pixel cells: it needs a "
                             f"patch_size that is a multiple of {HOG_CELL}, got {config.patch_size}")
        if tubelet < 1 or config.num_frames % tubelet:
            raise ValueError(f"num_frames {config.num_frames} is not a multiple of tubelet {tubelet}")
        decoder_dim = decoder_dim or config.embed_dim // 2
        decoder_heads = decoder_heads or config.num_heads
        if decoder_dim % decoder_heads:
            raise ValueError(f"decoder_dim {decoder_dim} is not divisible by decoder_heads {decoder_heads}")
        # The classifier has no part in pre-training (and DDP refuses parameters without gradients).
        encoder.head = nn.Identity()
        self.encoder = encoder
        self.mask_ratio = mask_ratio
        self.tubelet = tubelet
        self.norm_target = norm_target
        self.target = target
        self.patch_size = config.patch_size
        self.grid = (config.img_size // config.patch_size,) * 2
        self.num_patches = self.grid[0] * self.grid[1]
        cubes_in_time = config.num_frames // tubelet
        self.decoder_embed = nn.Linear(tubelet * config.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, cubes_in_time, self.num_patches, decoder_dim))
        self.decoder_blocks = nn.ModuleList(
            DecoderBlock(decoder_dim, decoder_heads, config.mlp_ratio, config.layer_norm_eps, config.fused_attn)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(decoder_dim, target_size(target, config.patch_size, tubelet, config.in_chans))
        self._init_decoder()

    def _init_decoder(self) -> None:
        """Xavier-uniform linears and std 0.02 mask token / positions, as MAE; the encoder keeps its own set-up."""
        for name, module in self.named_modules():
            if name.startswith("encoder"):
                continue
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)

    def random_mask(self, batch: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> torch.Tensor:
        return tube_mask(batch, self.num_patches, self.mask_ratio, generator, device)

    def targets(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return cube_targets(video, mask, self.patch_size, self.tubelet, self.norm_target, self.target)

    def forward(self, video: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        batch, _, frames, height, width = video.shape
        if (height // self.patch_size, width // self.patch_size) != self.grid or mask.shape[1] != self.num_patches:
            raise ValueError(f"masked pre-training needs clips of the configured size "
                             f"{self.grid[0] * self.patch_size}x{self.grid[1] * self.patch_size} "
                             f"and a mask over its {self.num_patches} patches, got {height}x{width} and {tuple(mask.shape)}")
        if frames != self.decoder_pos_embed.shape[1] * self.tubelet:
            raise ValueError(f"masked pre-training needs clips of {self.decoder_pos_embed.shape[1] * self.tubelet} "
                             f"frames (the configured num_frames), got {frames}")
        visible, hidden = split_positions(mask)
        tokens = self.encoder.forward_visible(video, visible)  # (B, T, V, D)
        tokens = rearrange(tokens, "b (tc k) v d -> b tc v (k d)", k=self.tubelet)  # one token per visible cube
        tokens = self.decoder_embed(tokens)  # (B, Tc, V, Dd)
        cubes_in_time, num_hidden = tokens.shape[1], hidden.shape[1]
        order = torch.cat([visible, hidden], dim=1)  # (B, N): the position of every decoder token
        positions = gather_cubes(self.decoder_pos_embed.expand(batch, -1, -1, -1), order)  # (B, Tc, N, Dd)
        masked = self.mask_token.expand(batch, cubes_in_time, num_hidden, -1)
        x = torch.cat([tokens, masked], dim=2) + positions  # (B, Tc, N, Dd)
        x = rearrange(x, "b tc n d -> b (tc n) d")
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))  # (B, Tc*N, target_size)
        pred = rearrange(pred, "b (tc n) e -> b tc n e", tc=cubes_in_time)
        return pred[:, :, -num_hidden:]  # the hidden cubes, in the order of `hidden`

    @torch.no_grad()
    def reconstruct(self, video: torch.Tensor, mask: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The clip with its hidden cubes replaced by the prediction (in the clip's own pixel space: with
        normalised targets, each predicted cube is given the true cube's mean and std, as VideoMAE shows it).
        A HOG prediction has no pixels: its hidden cubes are shown blank (0, the clip normalisation's mean)."""
        cubes = video_to_cubes(video.float(), self.patch_size, self.tubelet)  # (B, Tc, N, k*p*p, C)
        _, hidden = split_positions(mask)
        channels = cubes.shape[-1]
        if self.target == "hog":
            pred = cubes.new_zeros(hidden.shape[0], cubes.shape[1], hidden.shape[1], cubes.shape[3] * channels)
        guess = rearrange(pred.float(), "b tc m (kpq c) -> b tc m kpq c", c=channels)
        if self.target == "motion":  # the predicted change around the cube's true mean frame
            mean_frame = cubes - motion_cubes(cubes, self.tubelet)
            guess = guess + gather_cubes(mean_frame, hidden)
        elif self.target == "pixels" and self.norm_target:
            _, mean, std = normalise_cubes(cubes)
            guess = guess * (gather_cubes(std, hidden) + 1e-6) + gather_cubes(mean, hidden)
        index = hidden[:, None, :, None, None].expand(-1, cubes.shape[1], -1, *cubes.shape[3:])
        cubes = cubes.scatter(2, index, guess)
        return cubes_to_video(cubes, self.grid, self.patch_size, self.tubelet)
