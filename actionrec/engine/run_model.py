"""The model a run describes: the one bridge from the run config (`actionrec.config`) to the model registry.

It lives outside `actionrec/models/` so that the models know nothing of the run config (they take plain
keyword options), and apart from the trainer so that prediction, export and benchmarks build a run's model
without importing Accelerate or DeepSpeed.

What a run records. The `model` section of a run's `config.yaml` (in the run dir and in every checkpoint)
holds every field of the model's config as the run built it, with no `auto` left: `init`, the trunk's `norm`
and `width`, `temporal_shift`, the stem, the pooling. `resolve_run_model` writes it when a run starts;
`recorded_run_config` reads it back, so that evaluating, predicting with, resuming or fine-tuning from a run
builds the model it trained, whatever today's defaults are and wherever the run it started from has gone.
A set-up field a config leaves open (`auto` or unset) is taken from the model whose weights the run starts
from when that is one of ours (a fine-tuned resnet18_temporal keeps its temporal shift); otherwise `init` is
`vit` when `model.pretrained` names a weights file and `scratch` when nothing is loaded.

Runs saved before runs recorded their model (fields absent or `auto`) are read by what their weights decide
(a stem, BatchNorm statistics) and refused in one line where the weights cannot tell (docs/training.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from safetensors import SafetensorError
from torch import nn

from actionrec.config import MODEL_KEYS_FROM_DATA, Config, ConfigError, DataConfig, build_config
from actionrec.engine.checkpoint import (
    CheckpointManager,
    CheckpointNotFound,
    checkpoint_metadata,
    load_fp32_state_dict,
    resolve_checkpoint,
)
from actionrec.models.pretrained import load_pretrained
from actionrec.models.registry import build_model, model_config, model_config_class
from actionrec.models.timesformer import TimeSformerConfig
from actionrec.models.video_cnn import FrameResNetTransformerConfig

# The day resnet18_temporal got temporal shift (on from scratch): a run saved before runs recorded their
# model cannot say on which side of it it was trained.
TEMPORAL_SHIFT_SINCE = "2026-12-04"


def build_model_for(cfg: Config, num_classes: int, load_weights: bool = True) -> nn.Module:
    """`cfg.model` with the clip geometry of `cfg.data`, and the local pretrained weights if it names any
    (unless `load_weights` is False: a run that resumes gets its weights from its checkpoint).
    With `task: pretrain`, that model is the encoder of a MaskedVideoModel (num_classes is not used)."""
    if cfg.task == "pretrain":
        from actionrec.models.masked import MaskedVideoModel

        encoder = build_model(cfg.model.name, num_classes=1, **model_build_options(cfg))
        if cfg.model.pretrained and load_weights:
            load_pretrained(encoder, cfg.model.pretrained)  # e.g. ImageNet ViT weights to pre-train from
        pre = cfg.pretrain
        return MaskedVideoModel(encoder, mask_ratio=pre.mask_ratio, tubelet=pre.tubelet, decoder_dim=pre.decoder_dim,
                                decoder_depth=pre.decoder_depth, decoder_heads=pre.decoder_heads,
                                norm_target=pre.norm_target, target=pre.target)
    model = build_model(cfg.model.name, num_classes=num_classes, **model_build_options(cfg))
    if cfg.model.pretrained and load_weights:
        load_pretrained(model, cfg.model.pretrained)
    return model


def model_build_options(cfg: Config) -> dict[str, Any]:
    """The keyword options `build_model(cfg.model.name, num_classes, **options)` gets: every field of the
    model's config as `cfg` builds it, plus the clip geometry from the data section."""
    return {**_clip_geometry(cfg.model.name, cfg.data.num_frames, cfg.data.size), **resolved_model_options(cfg)}


def resolved_model_options(cfg: Config, start_from: Path | None = None) -> dict[str, Any]:
    """Every field of the model's config (the clip geometry aside: the data section holds it) as `cfg` builds
    it, nothing `auto`. A set-up field (`setup_fields` of the model's config) left `auto` or unset is taken
    from the model the run starts from when that is one of ours: `start_from` (a checkpoint the run loads),
    else `model.pretrained` naming one of our runs or checkpoints. Otherwise `init` is `vit` when
    `model.pretrained` names a weights file and `scratch` when no weights are loaded. Raises ValueError for
    options the model refuses."""
    options = dict(cfg.model.options)
    config_class = model_config_class(cfg.model.name)
    open_fields = [name for name in config_class.setup_fields if options.get(name, "auto") == "auto"]
    if open_fields:
        source = start_from or cfg.model.pretrained
        recorded = recorded_model(source) if source else None
        if recorded is not None and model_config_class(recorded[0]) is config_class:
            options.update({name: recorded[1][name] for name in open_fields})
        elif "init" in open_fields:
            options["init"] = "vit" if cfg.model.pretrained else "scratch"
    geometry = _clip_geometry(cfg.model.name, cfg.data.num_frames, cfg.data.size)
    return _as_built(model_config(cfg.model.name, **geometry, **options))


def resolve_run_model(cfg: Config, start_from: Path | None = None) -> Config:
    """`cfg` with its model section as the run builds it, which is what the run records. `start_from`: the
    checkpoint whose weights the run loads (evaluation, `--checkpoint`); without one, a run that resumes
    continues the model of its own latest checkpoint."""
    if start_from is None:
        start_from = CheckpointManager(cfg.run_dir).latest()
    try:
        options = resolved_model_options(cfg, start_from)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"model {cfg.model.name} cannot be built from this config: {exc}") from None
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, options=options))


def check_model_config(cfg: Config) -> None:
    """Build the model's config (not the model): its own checks (attention type, clip size against patch size,
    widths against heads, a trunk map its norm erases) fail here, before any process group exists, instead of
    in every rank's model build."""
    try:
        config = model_config(cfg.model.name, **model_build_options(cfg))
        config.check_clip(cfg.data.num_frames, cfg.data.size, cfg.data.size)
    except ConfigError:
        raise
    except ValueError as exc:
        from_data = (("img_size", "data.size", cfg.data.size), ("num_frames", "data.num_frames", cfg.data.num_frames))
        notes = [f"{field} is {key}={value}" for field, key, value in from_data if field in str(exc)]
        raise ConfigError(
            f"model {cfg.model.name} cannot be built from this config: {exc}" + (f" ({'; '.join(notes)})" if notes else "")
        ) from None


# --- reading what a run recorded -----------------------------------------------------------------------


def recorded_model(path: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(model name, every option as built) of a run of ours that `path` names (its run dir, a step dir, or a
    model.safetensors with the run's config.yaml beside it or inside); None for anything else (a weights file)."""
    path = Path(path)
    saved = (path if path.is_dir() else path.parent) / "config.yaml"
    try:
        if saved.is_file():
            config = yaml.safe_load(saved.read_text())
        elif path.suffix == ".safetensors" and path.is_file():
            config, _ = checkpoint_metadata(path)  # an exported model copied away from its run dir
        else:
            return None
    except (yaml.YAMLError, CheckpointNotFound, SafetensorError):  # not ours: load_pretrained says what it is
        return None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "name" not in config["model"]:
        return None
    return config["model"]["name"], recorded_options(config, saved, lambda: _weight_names(path))


def recorded_run_config(checkpoint: Path) -> tuple[dict[str, Any], list[str]]:
    """(config mapping, class names) of a resolved checkpoint, its model section as the run built it and
    `model.pretrained` cleared: the checkpoint holds every weight, and the run it was started from is not
    read again (it may have been moved or deleted)."""
    config, classes = checkpoint_metadata(checkpoint)
    saved = (checkpoint.parent if checkpoint.is_file() else checkpoint) / "config.yaml"
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or "name" not in config["model"]:
        raise ConfigError(f"{saved} has no model section with a name: not a config written by train.py")
    options = recorded_options(config, saved, lambda: _weight_names(checkpoint))
    return {**config, "model": {"name": config["model"]["name"], "pretrained": "", **options}}, classes


def load_run_model(checkpoint: str | Path) -> tuple[nn.Module, Config, list[str]]:
    """(model with the checkpoint's weights, its run config, class names) of a run dir, checkpoints/latest, a
    step dir (plain, DDP or DeepSpeed ZeRO) or an exported model.safetensors: the model the run trained."""
    resolved = resolve_checkpoint(checkpoint)
    config, classes = recorded_run_config(resolved)
    cfg = build_config(config, check_paths=False)
    model = build_model_for(cfg, len(classes))
    try:
        model.load_state_dict(load_fp32_state_dict(resolved))
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{resolved}: its weights do not fit the model its config.yaml describes ({detail}); "
                          "a run saved by an earlier version whose model options that config does not record "
                          "(docs/troubleshooting.md)") from None
    return model, cfg, list(classes)


def recorded_options(config: dict[str, Any], saved: Path, weight_names: Callable[[], set[str]]) -> dict[str, Any]:
    """The model options of a saved run config as the run built them. A config written since runs record
    their model has them all; an older one (fields absent or `auto`) is completed from what the weights
    decide, or refused (ConfigError) where they cannot tell."""
    model = dict(config["model"])
    name = model.pop("name")
    pretrained = model.pop("pretrained", "")
    try:
        config_class = model_config_class(name)
    except ValueError as exc:
        raise ConfigError(f"{saved}: {exc}") from None
    wanted = [f.name for f in dataclasses.fields(config_class) if f.name not in MODEL_KEYS_FROM_DATA]
    if all(model.get(key, "auto") != "auto" for key in wanted):
        return model
    options = _older_run_set_up(config_class, model, bool(pretrained), weight_names, saved)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    geometry = _clip_geometry(name, data.get("num_frames", DataConfig.num_frames), data.get("size", DataConfig.size))
    try:
        return _as_built(model_config(name, **geometry, **options))
    except ValueError as exc:
        raise ConfigError(f"{saved}: the model it describes cannot be built by this version: {exc}") from None


def _older_run_set_up(config_class: type, options: dict[str, Any], weights_loaded: bool,
                      weight_names: Callable[[], set[str]], saved: Path) -> dict[str, Any]:
    """The set-up fields of a run saved before runs recorded their model, from what its weights show. Fields
    it leaves absent otherwise take today's defaults, which are those of every earlier version (a default that
    changed, the TimeSformer stem's stride, changes weight shapes: loading then fails, it does not differ)."""
    options = dict(options)

    def left_open(key: str) -> bool:
        return options.get(key, "auto") == "auto"

    if issubclass(config_class, TimeSformerConfig):
        if left_open("init"):  # the from-scratch set-up is the one with a stem (a pre-training run's: encoder.stem)
            options["init"] = "scratch" if any(k.startswith(("stem.", "encoder.stem.")) for k in weight_names()) else "vit"
        return options
    # CNN trunks: `init` only set the head's first embeddings (the weights replace them); norm and temporal
    # shift are what it decided.
    shift_off = weights_loaded or options.get("init") == "vit"  # loaded weights always meant no shift
    if left_open("norm"):  # BatchNorm keeps running statistics, instance norm none (group was never `auto`)
        batch = any(k.startswith("trunk.") and k.endswith(".running_mean") for k in weight_names())
        options["norm"] = "batch" if batch else "instance"
    if left_open("init"):
        torchvision_trunk = options["norm"] == "batch" and options.get("width", 64) == 64
        options["init"] = "vit" if weights_loaded and torchvision_trunk else "scratch"
    if issubclass(config_class, FrameResNetTransformerConfig) and left_open("temporal_shift"):
        if not shift_off:
            raise ConfigError(
                f"{saved} is from a resnet18_temporal run trained from scratch before runs recorded their model, "
                f"and its weights do not show whether temporal shift was on (off before {TEMPORAL_SHIFT_SINCE}, on "
                "since): add `temporal_shift: off` (trained before then) or `temporal_shift: on` to the model "
                "section of that file, then run the same command again"
            )
        options["temporal_shift"] = "off"
    return options


def _weight_names(path: str | Path) -> set[str]:
    """Parameter and buffer names of the weights at `path` (read from the safetensors header where there
    is one, without loading the tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    elif path.suffix != ".safetensors":
        try:
            path = resolve_checkpoint(path)
        except CheckpointNotFound as exc:
            raise ConfigError(f"{exc} (its config.yaml leaves the model's set-up open, and only weights tell it)") from None
    if path.is_dir() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if path.suffix == ".safetensors":
        with safe_open(str(path), "pt") as weights:
            return set(weights.keys())
    return set(load_fp32_state_dict(path))


def _clip_geometry(name: str, num_frames: int, size: int) -> dict[str, int]:
    """The clip fields a model family's config has, from the data section (they are never set in `model`)."""
    fields = {f.name for f in dataclasses.fields(model_config_class(name))}
    return {k: v for k, v in {"num_frames": num_frames, "img_size": size}.items() if k in fields}


def _as_built(config: Any) -> dict[str, Any]:
    """A model config's fields with every `auto` resolved, the clip geometry left to the data section."""
    return {k: v for k, v in dataclasses.asdict(config.resolved()).items() if k not in MODEL_KEYS_FROM_DATA}
