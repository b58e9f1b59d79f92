"""Named models over one typed config per family.

    model = build_model("timesformer_base", num_classes=400, attention_type="joint_space_time")

A name fixes a family (its config dataclass and model class) and the defaults that make the variant;
keyword overrides replace any config field and are checked against the dataclass (unknown names and wrong
types fail with the list of valid fields).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from actionrec.models.timesformer import TimeSformer, TimeSformerConfig
from actionrec.models.video_cnn import (
    FrameResNetTransformer,
    FrameResNetTransformerConfig,
    VideoResNetTransformer,
    VideoResNetTransformerConfig,
)


@dataclass(frozen=True)
class ModelSpec:
    config_class: type
    model_class: Callable[..., nn.Module]
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "timesformer_base": ModelSpec(
        TimeSformerConfig, TimeSformer, dict(embed_dim=768, depth=12, num_heads=12),
        "TimeSformer ViT-B/16, 8x224^2 (the paper's model; official / HuggingFace checkpoints load into it)",
    ),
    "timesformer_small": ModelSpec(
        TimeSformerConfig, TimeSformer, dict(embed_dim=384, depth=12, num_heads=6),
        "TimeSformer ViT-S/16, 8x224^2",
    ),
    "timesformer_tiny": ModelSpec(
        TimeSformerConfig, TimeSformer,
        dict(embed_dim=64, depth=2, num_heads=2, num_frames=4, img_size=64, drop_path_rate=0.0),
        "test-size TimeSformer (2 blocks, 64 wide, 4x64^2; any multiple of 16 works): smoke tests and CI",
    ),
    "r3d_18_transformer": ModelSpec(
        VideoResNetTransformerConfig, VideoResNetTransformer, dict(trunk="r3d_18"),
        "torchvision R3D-18 trunk -> (t, s, s) token grid -> transformer encoder head",
    ),
    "r2plus1d_18_transformer": ModelSpec(
        VideoResNetTransformerConfig, VideoResNetTransformer, dict(trunk="r2plus1d_18"),
        "torchvision R(2+1)D-18 trunk -> (t, s, s) token grid -> transformer encoder head",
    ),
    "mc3_18_transformer": ModelSpec(
        VideoResNetTransformerConfig, VideoResNetTransformer, dict(trunk="mc3_18"),
        "torchvision MC3-18 trunk -> (t, s, s) token grid -> transformer encoder head",
    ),
    "resnet18_temporal": ModelSpec(
        FrameResNetTransformerConfig, FrameResNetTransformer, {},
        "torchvision ResNet-18 per frame -> temporal transformer encoder over frame features",
    ),
}


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return MODELS[name]


def model_config_class(name: str) -> type:
    """The config dataclass of a registered model's family (valid override names are its fields)."""
    return _spec(name).config_class


def _check_type(name: str, key: str, value: Any, expected: type) -> None:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return
    if (isinstance(value, bool) and expected is not bool) or not isinstance(value, expected):
        raise ValueError(f"model {name}: option {key} must be {expected.__name__}, got {value!r}")


def model_config(name: str, **overrides: Any):
    """The config a name builds, with overrides applied and checked."""
    spec = _spec(name)
    fields = {f.name: f for f in dataclasses.fields(spec.config_class)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ValueError(
            f"model {name}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(spec.config_class)
    for key, value in overrides.items():
        _check_type(name, key, value, hints[key])
    return spec.config_class(**{**spec.defaults, **overrides})


def build_model(name: str, num_classes: int, **overrides: Any) -> nn.Module:
    """Build a registered model: float clip (B, C, T, H, W) -> logits (B, num_classes). Weights are freshly
    initialised (nothing is downloaded); load pretrained weights with `load_pretrained`."""
    spec = _spec(name)
    return spec.model_class(model_config(name, **overrides), num_classes)
