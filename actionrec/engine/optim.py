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
    # No weight decay on biases, norms and embeddings-like 1-d parameters (the ViT/DeiT convention).
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(("pos_embed", "time_embed", "cls_token")) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum, nesterov=cfg.optim.momentum > 0)


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
