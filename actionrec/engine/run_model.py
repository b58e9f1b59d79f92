"""The model a run config describes: the one bridge from `actionrec.config` to the model registry.

It lives outside `actionrec/models/` so that the models know nothing of the run config (they take plain
keyword options), and apart from the trainer so that prediction, export and benchmarks build a run's model
without importing Accelerate or DeepSpeed.
"""

from __future__ import annotations

from torch import nn

from actionrec.config import Config, model_build_options
from actionrec.models.pretrained import load_pretrained
from actionrec.models.registry import build_model


def build_model_for(cfg: Config, num_classes: int) -> nn.Module:
    """`cfg.model` with the clip geometry of `cfg.data`, and the local pretrained weights if it names any.
    With `task: pretrain`, that model is the encoder of a MaskedVideoModel (num_classes is not used)."""
    if cfg.task == "pretrain":
        from actionrec.models.masked import MaskedVideoModel

        encoder = build_model(cfg.model.name, num_classes=1, **model_build_options(cfg))
        if cfg.model.pretrained:
            load_pretrained(encoder, cfg.model.pretrained)  # e.g. ImageNet ViT weights to pre-train from
        pre = cfg.pretrain
        return MaskedVideoModel(encoder, mask_ratio=pre.mask_ratio, tubelet=pre.tubelet, decoder_dim=pre.decoder_dim,
                                decoder_depth=pre.decoder_depth, decoder_heads=pre.decoder_heads,
                                norm_target=pre.norm_target)
    model = build_model(cfg.model.name, num_classes=num_classes, **model_build_options(cfg))
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained)
    return model
