"""Pretrained weights from local files; nothing is downloaded.

`load_pretrained(model, path)` recognises the file by its keys and maps it onto the model's names:

| source                                         | keys look like                        | loads into             |
|------------------------------------------------|---------------------------------------|------------------------|
| official facebookresearch TimeSformer `.pyth`  | `model_state` -> `model.blocks.N...`  | TimeSformer            |
| HuggingFace dir (`facebook/timesformer-*`)     | `timesformer.encoder.layer.N...`      | TimeSformer            |
| torchvision `vit_b_16` state dict              | `encoder.layers.encoder_layer_N...`   | TimeSformer (spatial)  |
| timm ViT state dict / our own `state_dict()`   | `blocks.N.attn.qkv...`                | TimeSformer            |
| our masked pre-training (a run dir, or its     | `encoder.blocks.N...`, `mask_token`   | TimeSformer (encoder;  |
|   model.safetensors)                           |                                       |   decoder not used)    |
| torchvision r3d_18 / r2plus1d_18 / mc3_18      | `stem.0.weight`, `layer1...`          | *_transformer trunk    |
| torchvision resnet18                           | `conv1.weight`, `layer1...`           | resnet18_temporal trunk|

Adaptations, each reported in the returned `LoadReport` (and as a warning when something is left at its
initialisation): position / time embeddings stored for another grid are resampled (bicubic in space, linear
in time); an image model (no temporal parameters) initialising a factorised TimeSformer copies each
block's `norm1`/`attn` into the extra steps (`temporal_*`, `local_*`, `width_*`), as the official code does,
leaving their residual linears at zero; a classifier with another number of classes (or a trunk's own
classifier) is dropped and the model's head keeps its initialisation (fine-tuning). Anything else that does
not fit is refused with the names listed, or with `strict=False` loaded partially with the names warned.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file as load_safetensors
from torch import nn

from actionrec.models.timesformer import TimeSformer, TimeSformerConfig, resize_space_embed, resize_time_embed
from actionrec.models.video_cnn import FrameResNetTransformer, VideoResNetTransformer

EXTRA_STEP_PREFIXES = ("temporal", "local", "width")
HEAD_KEYS = {  # classifier parameters per model class: dropped when the number of classes differs
    TimeSformer: ("head.weight", "head.bias"),
    VideoResNetTransformer: ("head.head.weight", "head.head.bias"),
    FrameResNetTransformer: ("head.head.weight", "head.head.bias"),
}


class CheckpointMismatchError(ValueError):
    """A checkpoint's names or shapes do not fit the model."""


@dataclass
class LoadReport:
    """What `load_pretrained` did."""

    source_format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model parameters the checkpoint lacks
    unexpected: list[str] = field(default_factory=list)  # checkpoint entries the model does not have
    shape_mismatch: list[str] = field(default_factory=list)
    resized: list[str] = field(default_factory=list)  # embeddings resampled to the model's grid
    from_image: list[str] = field(default_factory=list)  # extra-step parameters copied from norm1/attn
    dropped_head: list[str] = field(default_factory=list)  # source classifier entries not loaded

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatch)

    def describe(self) -> str:
        parts = [f"{len(self.loaded)} tensors fit ({self.source_format} checkpoint)"]
        for label, names in (
            ("missing from the checkpoint", self.missing),
            ("unexpected (not in the model)", self.unexpected),
            ("shape mismatch", self.shape_mismatch),
            ("resampled", self.resized),
            ("copied from the image model's attention", self.from_image),
            ("source classifier not used (model head keeps its initialisation)", self.dropped_head),
        ):
            if names:
                parts.append(f"{label}: {_name_list(names)}")
        return "; ".join(parts)


def _name_list(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


# --- reading ---------------------------------------------------------------------------------------------

def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle errors have many types; the message is what the user needs
        raise ValueError(f"cannot read {path} as a weights-only PyTorch checkpoint: {error}") from error


def read_checkpoint(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict | None]:
    """Read a local checkpoint -> (format, state dict in its own names, HuggingFace config or None)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    hf_config = None
    if path.is_dir() and not (path / "config.json").exists() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"  # the run dir of one of our runs
    if path.is_dir():
        config_file = path / "config.json"
        weights = [path / "model.safetensors", path / "pytorch_model.bin"]
        weights = [w for w in weights if w.exists()]
        if not config_file.exists() or not weights:
            raise ValueError(
                f"{path} is a directory but not a HuggingFace model directory "
                f"(needs config.json and model.safetensors or pytorch_model.bin)"
            )
        hf_config = json.loads(config_file.read_text())
        path = weights[0]
    state = load_safetensors(str(path)) if path.suffix == ".safetensors" else _torch_load(path)
    for wrapper in ("model_state", "model", "state_dict"):  # official/SlowFast, timm/DeiT, Lightning
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return _detect_format(state, hf_config), state, hf_config


def _detect_format(state: dict[str, torch.Tensor], hf_config: dict | None) -> str:
    keys = set(state)
    if hf_config is not None or any(k.startswith("timesformer.") for k in keys):
        return "huggingface"
    if any(k.startswith(("model.blocks.", "model.patch_embed.")) for k in keys):
        return "official"
    if "conv_proj.weight" in keys and "encoder.pos_embedding" in keys:
        return "torchvision_vit"
    if "stem.0.weight" in keys and "layer1.0.conv1.0.weight" in keys:
        return "torchvision_video"
    if "conv1.weight" in keys and "layer1.0.conv1.weight" in keys:
        return "torchvision_resnet"
    if "mask_token" in keys and any(k.startswith("encoder.") for k in keys):
        return "masked_pretrain"
    return "native"


# --- renaming into our names -----------------------------------------------------------------------------

_HF_BLOCK_RENAMES = [
    ("layernorm_before.", "norm1."),
    ("attention.attention.qkv.", "attn.qkv."),
    ("attention.output.dense.", "attn.proj."),
    ("temporal_layernorm.", "temporal_norm1."),
    ("temporal_attention.attention.qkv.", "temporal_attn.qkv."),
    ("temporal_attention.output.dense.", "temporal_attn.proj."),
    ("temporal_dense.", "temporal_fc."),
    ("layernorm_after.", "norm2."),
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
]
_HF_TOP_RENAMES = {
    "timesformer.embeddings.cls_token": "cls_token",
    "timesformer.embeddings.position_embeddings": "pos_embed",
    "timesformer.embeddings.time_embeddings": "time_embed",
}
_TV_VIT_BLOCK_RENAMES = [
    ("ln_1.", "norm1."),
    ("self_attention.in_proj_weight", "attn.qkv.weight"),
    ("self_attention.in_proj_bias", "attn.qkv.bias"),
    ("self_attention.out_proj.", "attn.proj."),
    ("ln_2.", "norm2."),
    ("mlp.0.", "mlp.fc1."),
    ("mlp.3.", "mlp.fc2."),
]


def _rename_block(suffix: str, renames: list[tuple[str, str]]) -> str | None:
    for old, new in renames:
        if suffix.startswith(old):
            return new + suffix[len(old):]
    return None


def _from_huggingface(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state.items():
        if key.startswith("embeddings.") or key.startswith("encoder.") or key.startswith("layernorm."):
            key = "timesformer." + key  # saved from TimesformerModel (no classification wrapper)
        new = _HF_TOP_RENAMES.get(key)
        if new is None and key.startswith("timesformer.embeddings.patch_embeddings.projection."):
            new = "patch_embed.proj." + key.rsplit(".", 1)[1]
        elif new is None and key.startswith("timesformer.layernorm."):
            new = "norm." + key.rsplit(".", 1)[1]
        elif new is None and key.startswith("classifier."):
            new = "head." + key.rsplit(".", 1)[1]
        elif new is None and (match := re.match(r"timesformer\.encoder\.layer\.(\d+)\.(.+)", key)):
            suffix = _rename_block(match.group(2), _HF_BLOCK_RENAMES)
            new = f"blocks.{match.group(1)}.{suffix}" if suffix else None
        converted[new or f"<huggingface>{key}"] = value
    return converted


def _from_torchvision_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted = {}
    for key, value in state.items():
        new = {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed"}.get(key)
        if new is None and key.startswith("conv_proj."):
            new = "patch_embed.proj." + key.rsplit(".", 1)[1]
        elif new is None and key.startswith("encoder.ln."):
            new = "norm." + key.rsplit(".", 1)[1]
        elif new is None and key.startswith("heads.head."):
            new = "head." + key.rsplit(".", 1)[1]
        elif new is None and (match := re.match(r"encoder\.layers\.encoder_layer_(\d+)\.(.+)", key)):
            suffix = _rename_block(match.group(2), _TV_VIT_BLOCK_RENAMES)
            new = f"blocks.{match.group(1)}.{suffix}" if suffix else None
        converted[new or f"<torchvision>{key}"] = value
    return converted


def _to_model_names(fmt: str, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename into our parameter names -> (state, source-classifier keys dropped)."""
    if fmt == "official":
        return {k.removeprefix("model."): v for k, v in state.items()}, []
    if fmt == "huggingface":
        return _from_huggingface(state), []
    if fmt == "torchvision_vit":
        return _from_torchvision_vit(state), []
    if fmt == "masked_pretrain":
        # The encoder is the classifier's trunk; the decoder and mask token only served the pre-training.
        encoder = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        return encoder, [f"decoder ({sum(1 for k in state if not k.startswith('encoder.'))} tensors)"]
    if fmt in ("torchvision_video", "torchvision_resnet"):
        # The trunk's own classifier (e.g. Kinetics-400 / ImageNet fc) has no place in our models.
        dropped = sorted(k for k in state if k.startswith("fc."))
        renamed = {}
        for key, value in state.items():
            if key.startswith("fc."):
                continue
            if fmt == "torchvision_resnet" and key.startswith(("conv1.", "bn1.")):
                index = "0" if key.startswith("conv1.") else "1"
                key = f"stem.{index}.{key.split('.', 1)[1]}"
            renamed["trunk." + key] = value
        return renamed, dropped
    return dict(state), []


# --- fitting onto a model --------------------------------------------------------------------------------

def _adapt_timesformer(model: TimeSformer, state: dict[str, torch.Tensor], report: LoadReport) -> set[str]:
    """Resample embeddings and initialise extra attention steps from an image model.
    Returns the model keys that may stay at their initialisation."""
    target = model.state_dict()
    allowed_missing: set[str] = set()
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        source = state["pos_embed"]
        if source.ndim != 3 or source.shape[-1] != target["pos_embed"].shape[-1]:
            return allowed_missing  # a genuine mismatch: reported by the shape check
        grid = math.isqrt(target["pos_embed"].shape[1] - 1)
        patches = resize_space_embed(source[:, 1:], (grid, grid), mode="bicubic")
        state["pos_embed"] = torch.cat([source[:, :1], patches], dim=1)
        report.resized.append(f"pos_embed {tuple(source.shape)} -> {tuple(state['pos_embed'].shape)}")
    if "time_embed" in state and "time_embed" in target and state["time_embed"].shape != target["time_embed"].shape:
        source = state["time_embed"]
        if source.ndim == 3 and source.shape[-1] == target["time_embed"].shape[-1]:
            state["time_embed"] = resize_time_embed(source, target["time_embed"].shape[1], mode="linear")
            report.resized.append(f"time_embed {tuple(source.shape)} -> {tuple(state['time_embed'].shape)}")

    source_is_image = "time_embed" not in state and not any(
        f".{prefix}_" in key for key in state for prefix in EXTRA_STEP_PREFIXES
    )
    if source_is_image:
        # An image classifier's head (or its absence) says nothing about the video classes.
        allowed_missing |= {"head.weight", "head.bias"}
    if source_is_image and "time_embed" in target:
        # Official recipe for starting a video model from an image model: time embedding zero, every extra
        # step's norm/attention a copy of the spatial one, its residual linear zero (the model's init).
        allowed_missing.add("time_embed")
        for key in target:
            match = re.match(rf"blocks\.(\d+)\.({'|'.join(EXTRA_STEP_PREFIXES)})_(norm1|attn|fc)\.(.+)", key)
            if not match:
                continue
            block, _, part, rest = match.groups()
            allowed_missing.add(key)
            source_key = f"blocks.{block}.{part}.{rest}"
            if part != "fc" and source_key in state:
                state[key] = state[source_key]
                report.from_image.append(key)
    return allowed_missing


def load_pretrained(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a local checkpoint (format detected from its keys, see the module docstring) into `model`.

    strict=True refuses a checkpoint whose names or shapes do not fit (CheckpointMismatchError listing them)
    and changes nothing; strict=False loads what fits and warns with the rest. Pickle files are read with
    `weights_only=True`.
    """
    fmt, raw, _ = read_checkpoint(path)
    state, dropped = _to_model_names(fmt, raw)
    if isinstance(model, TimeSformer) and model.setup == "scratch" and "stem.layers.0.weight" not in state:
        raise CheckpointMismatchError(
            f"{path}: this TimeSformer was built with the from-scratch set-up (init='scratch': a conv stem before "
            f"the patch projection), which {fmt} weights do not have; build it with init='vit' to load them "
            f"(in a run config, model.pretrained does this by itself)"
        )
    report = LoadReport(source_format=fmt, dropped_head=dropped)
    target = model.state_dict()
    allowed_missing: set[str] = set()
    if isinstance(model, TimeSformer):
        allowed_missing |= _adapt_timesformer(model, state, report)
    if fmt in ("torchvision_video", "torchvision_resnet"):
        allowed_missing |= {k for k in target if not k.startswith("trunk.")}  # head: not part of the trunk
    if fmt == "masked_pretrain":
        allowed_missing |= set(HEAD_KEYS.get(type(model), ()))  # pre-training has no classifier
    for key in HEAD_KEYS.get(type(model), ()):
        if key in state and key in target and state[key].shape != target[key].shape:
            report.dropped_head.append(f"{key} {tuple(state.pop(key).shape)} (model: {tuple(target[key].shape)})")
            allowed_missing.add(key)

    fitting = {}
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif value.shape != target[key].shape:
            report.shape_mismatch.append(f"{key} {tuple(value.shape)} (model: {tuple(target[key].shape)})")
        else:
            fitting[key] = value
    report.missing = sorted(k for k in target if k not in fitting and k not in allowed_missing)
    report.loaded = sorted(fitting)
    if not fitting:
        raise CheckpointMismatchError(
            f"{path}: no tensor of this {fmt} checkpoint fits {type(model).__name__}: "
            f"{report.describe()}"
        )
    if strict and not report.complete:
        raise CheckpointMismatchError(
            f"{path} does not fit {type(model).__name__} (nothing loaded): {report.describe()}. "
            f"Build the model that matches the checkpoint, or pass strict=False to load the matching part"
        )
    model.load_state_dict(fitting, strict=False)
    if not report.complete:
        warnings.warn(
            f"load_pretrained({path}) loaded partially (strict=False), missing parameters keep their "
            f"initialisation: {report.describe()}",
            stacklevel=2,
        )
    elif report.dropped_head:
        warnings.warn(f"load_pretrained({path}): {report.describe()}", stacklevel=2)
    return report


# --- building the matching TimeSformer -------------------------------------------------------------------

def config_from_huggingface(hf: dict) -> tuple[TimeSformerConfig, int]:
    """TimesformerConfig (config.json) -> (our config, number of classes)."""
    if hf.get("model_type", "timesformer") != "timesformer":
        raise ValueError(f"config.json describes a {hf['model_type']!r} model, not a TimeSformer")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (TimeSformer uses gelu)")
    image_size = hf.get("image_size", 224)
    patch_size = hf.get("patch_size", 16)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    patch_size = patch_size[0] if isinstance(patch_size, (list, tuple)) else patch_size
    hidden = hf.get("hidden_size", 768)
    config = TimeSformerConfig(
        num_frames=hf.get("num_frames", 8),
        img_size=image_size,
        patch_size=patch_size,
        in_chans=hf.get("num_channels", 3),
        embed_dim=hidden,
        depth=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        mlp_ratio=hf.get("intermediate_size", 3072) / hidden,
        qkv_bias=hf.get("qkv_bias", True),
        attention_type=hf.get("attention_type", "divided_space_time"),
        drop_rate=hf.get("hidden_dropout_prob", 0.0),
        attn_drop_rate=hf.get("attention_probs_dropout_prob", 0.0),
        drop_path_rate=hf.get("drop_path_rate", 0.0),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-6),
        init="vit",
    )
    num_classes = len(hf["id2label"]) if hf.get("id2label") else hf.get("num_labels", 2)
    return config, num_classes


def config_from_state_dict(state: dict[str, torch.Tensor], stem_stride: int | None = None) -> tuple[TimeSformerConfig, int]:
    """Infer a TimeSformer config from its weights (our names). Head count is not stored in weights: it
    is taken as embed_dim / 64 (every ViT size TimeSformer is published at); override it if yours differs."""
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "head.weight", "blocks.0.mlp.fc1.weight")
    absent = [k for k in required if k not in state]
    if absent:
        raise ValueError(f"not a TimeSformer checkpoint: it lacks {', '.join(absent)}")
    embed_dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    if "blocks.0.width_attn.qkv.weight" in state:
        attention_type = "axial"
    elif "blocks.0.local_attn.qkv.weight" in state:
        attention_type = "sparse_local_global"
    elif "blocks.0.temporal_attn.qkv.weight" in state:
        attention_type = "divided_space_time"
    elif "time_embed" in state:
        attention_type = "joint_space_time"
    else:
        attention_type = "space_only"
    # Our own from-scratch set-up puts a conv stem (stem.layers.<3i>.weight) before the patch projection.
    stem_convs = [k for k in state if re.fullmatch(r"stem\.layers\.\d+\.weight", k) and state[k].ndim == 5]
    stem = [state[k] for k in sorted(stem_convs, key=lambda k: int(k.split(".")[2]))]
    # The weights do not record the stride of the stem's first layer: the default unless told otherwise.
    stem_stride = stem_stride or TimeSformerConfig.stem_stride
    patch_size = patch.shape[-1] * (stem_stride * 2 ** (len(stem) - 1) if stem else 1)
    setup = (dict(init="scratch", stem_channels=stem[0].shape[0], stem_layers=len(stem), stem_stride=stem_stride)
             if stem else dict(init="vit"))
    config = TimeSformerConfig(
        num_frames=state["time_embed"].shape[1] if "time_embed" in state else 8,
        img_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=stem[0].shape[1] if stem else patch.shape[1],
        embed_dim=embed_dim,
        depth=depth,
        num_heads=max(embed_dim // 64, 1),
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state,
        attention_type=attention_type,
        **setup,
    )
    return config, state["head.weight"].shape[0]


def from_pretrained(path: str | Path, num_classes: int | None = None, **overrides: Any) -> TimeSformer:
    """Build the TimeSformer a checkpoint describes and load it: a HuggingFace directory (its config.json)
    or an official / own TimeSformer checkpoint (config inferred from the weights; for a from-scratch model
    built with a non-default `stem_stride`, pass it, as the weights do not record it). Overrides replace
    config fields (e.g. fused_attn, grad_checkpointing, num_frames, img_size: embeddings are then
    resampled); a different num_classes leaves a fresh head for fine-tuning."""
    fmt, raw, hf_config = read_checkpoint(path)
    if fmt not in ("huggingface", "official", "native"):
        raise ValueError(
            f"{path} holds {fmt} weights, not a TimeSformer: build the model with "
            f"actionrec.models.build_model(...) and call load_pretrained(model, path)"
        )
    state, _ = _to_model_names(fmt, raw)
    if hf_config:
        config, source_classes = config_from_huggingface(hf_config)
    else:
        config, source_classes = config_from_state_dict(state, overrides.get("stem_stride"))
    valid = {f.name for f in fields(TimeSformerConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise ValueError(f"unknown TimeSformer option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}")
    config = TimeSformerConfig(**{**config.__dict__, **overrides})
    model = TimeSformer(config, num_classes or source_classes)
    load_pretrained(model, path, strict=True)
    return model


def export_official_checkpoint(model: TimeSformer, path: str | Path) -> None:
    """Write the model in the official TimeSformer checkpoint layout ({"model_state": {"model.<name>": ...}}),
    which the official code's checkpoint loader and `load_pretrained` read."""
    state = {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"model_state": state}, Path(path))
