"""Model zoo: a registry of named video classifiers (pure PyTorch) and pretrained loading from local files.

    from actionrec.models import build_model, list_models, model_config_class, load_pretrained, from_pretrained
    model = build_model("timesformer_base", num_classes=400, attention_type="divided_space_time")
    logits = model(clip)  # float (B, C, T, H, W) -> (B, num_classes)
"""

from actionrec.models.flops import count_flops_per_clip
from actionrec.models.pretrained import (
    CheckpointMismatchError,
    LoadReport,
    export_official_checkpoint,
    from_pretrained,
    load_pretrained,
)
from actionrec.models.registry import MODELS, build_model, list_models, model_config, model_config_class
from actionrec.models.timesformer import ATTENTION_TYPES, TimeSformer, TimeSformerConfig

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "export_official_checkpoint",
    "from_pretrained",
    "load_pretrained",
    "ATTENTION_TYPES",
    "MODELS",
    "count_flops_per_clip",
    "TimeSformer",
    "TimeSformerConfig",
    "build_model",
    "list_models",
    "model_config",
    "model_config_class",
]
