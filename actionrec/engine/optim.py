"""The optimiser, its learning-rate schedule and the label mixing a run config describes.

Apart from the trainer so that benchmarks and tests build the same optimisation without importing
Accelerate or DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from actionrec.config import Config


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW or SGD over parameter groups: no weight decay on biases, norms and embedding-like parameters (the
    ViT/DeiT convention), and with `optim.layer_decay` below 1 a learning rate per depth (`layer_lr_scales`).
    Groups come in decreasing lr, so the first group's lr is the configured one (the one the trainer logs)."""
    scales = layer_lr_scales(model, cfg.optim.layer_decay)
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim <= 1 or name.endswith(("pos_embed", "time_embed", "cls_token"))
        groups.setdefault((scales.get(name, 1.0), no_decay), []).append(param)
    groups.setdefault((1.0, False), [])
    groups.setdefault((1.0, True), [])
    param_groups = [
        {"params": params, "lr": cfg.optim.lr * scale, "weight_decay": 0.0 if no_decay else cfg.optim.weight_decay}
        for (scale, no_decay), params in sorted(groups.items(), key=lambda item: (-item[0][0], item[0][1]))
    ]
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    return torch.optim.SGD(param_groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.momentum > 0)


def layer_lr_scales(model: torch.nn.Module, decay: float) -> dict[str, float]:
    """Layer-wise lr decay (BEiT; VideoMAE fine-tunes with 0.75): parameter name -> lr multiplier, decay ** (L - l)
    for layer l of L = depth + 1, where layer 0 is what comes before the blocks (stem, patch projection, cls
    token, position and time embeddings), block i is layer i + 1, and the final norm and the head are layer L
    (the full lr). A pre-trained encoder's early layers, which hold the most general features, then move least
    while the fresh head learns at the full rate. Empty for decay 1 (every parameter at the full lr)."""
    if decay == 1.0:
        return {}
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        raise ValueError(f"optim.layer_decay sets an lr per transformer block; {type(model).__name__} has no "
                         "`blocks` to count: set optim.layer_decay=1 for it")
    top = len(blocks) + 1
    scales = {}
    for name, _ in model.named_parameters():
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.startswith(("stem.", "patch_embed.", "cls_token", "pos_embed", "time_embed")):
            layer = 0
        else:
            layer = top
        scales[name] = decay ** (top - layer)
    return scales


def cosine_with_warmup(cfg: Config) -> Callable[[int], float]:
    """LR multiplier per optimizer step: linear warmup to 1, then cosine down to min_lr / lr."""
    warmup, total = cfg.optim.warmup_steps, cfg.train.max_steps
    floor = cfg.optim.min_lr / cfg.optim.lr

    def multiplier(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_mixing(
    cfg: Config, num_classes: int
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp / CutMix on the device batch (torchvision v2), or None. Returns (video, soft targets)."""
    if cfg.optim.mixup_alpha <= 0 and cfg.optim.cutmix_alpha <= 0:
        return None
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    choices = []
    if cfg.optim.mixup_alpha > 0:
        choices.append(v2.MixUp(alpha=cfg.optim.mixup_alpha, num_classes=num_classes))
    if cfg.optim.cutmix_alpha > 0:
        choices.append(v2.CutMix(alpha=cfg.optim.cutmix_alpha, num_classes=num_classes))
    mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def apply(video: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # torchvision's Video layout is (B, T, C, H, W); ours is (B, C, T, H, W).
        mixed, targets = mix(tv_tensors.Video(video.transpose(1, 2)), labels)
        return mixed.as_subclass(torch.Tensor).transpose(1, 2), targets

    return apply
