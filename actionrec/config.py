"""Typed run configuration: dataclass defaults <- YAML file (--config) <- key=value overrides.

Every key is checked against the dataclass fields (and, for the `model` section, against the chosen model's
own config dataclass from the registry). An unknown key or a value of the wrong type raises `ConfigError`
with one line naming the key, before any process group is created or any data is read.

A hand-written coercer instead of OmegaConf/Hydra: the rules we need (dotted overrides, Literal choices,
numbers written as `1e-3`, did-you-mean on typos) fit in this file and add no dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the key and what to do."""


@dataclass
class DataConfig:
    shards: str = "data/shards/synth"  # shard dir with dataset.json, a dataset.json path, or a brace pattern
    train_split: str = "train"
    val_split: str = "val"  # evaluated every `train.eval_every` steps and at the end ("" = none)
    test_split: str = "test"  # evaluated at the end of training ("" = none)
    num_frames: int = 8
    sampling: Literal["uniform", "dense"] = "uniform"
    frame_stride: int = 4  # between sampled frames, for dense sampling
    size: int = 224
    num_workers: int = 2
    decoder: Literal["auto", "pyav", "torchcodec"] = "auto"  # auto = PyAV (GOP-prefix reader, least CPU per clip: docs/loader.md); torchcodec by name
    # Where frames are decoded: "worker" (loader processes, CPU) or "device" (workers only read and sample; the
    # training process decodes each batch on its accelerator: nvJPEG for jpg shards, NVDEC via PyNvVideoCodec
    # for mp4 where installed, else the CPU readers; same clips either way, see docs/loader.md).
    decode_on: Literal["worker", "device"] = "worker"
    # One JSON line per micro batch with the clips it trained on (runs/<name>/samples/rank<R>.jsonl; audit with
    # shards/show.py --audit runs/<name>); its cost is measured in docs/loader.md.
    sample_log: bool = True
    # Training clips drawn from one decode of a video (repeated augmentation): each is sampled and augmented
    # independently and counts as one clip of the batch; an epoch still visits every video once.
    clips_per_video: int = 1
    eval_temporal_clips: int = 1  # views per video at evaluation: temporal clips x spatial crops
    eval_spatial_crops: int = 1
    eval_batch_size: int = 0  # per device; 0 = train.per_device_batch_size
    mean: list[float] = field(default_factory=lambda: [0.45, 0.45, 0.45])
    std: list[float] = field(default_factory=lambda: [0.225, 0.225, 0.225])


@dataclass
class ModelConfig:
    """`name` picks a registered model; every other key of the `model` section goes to that model's config
    dataclass (validated against it). num_classes, num_frames and img_size come from the data."""

    name: str = "timesformer_base"
    pretrained: str = ""  # local weights file, or a run (dir or checkpoint) of ours to start from ("" = from scratch)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 5e-4  # peak learning rate for the configured global batch
    min_lr: float = 0.0  # end of the cosine
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW
    momentum: float = 0.9  # SGD (Nesterov)
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0  # 0 = off; with cutmix_alpha > 0 too, one of the two is drawn per batch
    cutmix_alpha: float = 0.0
    # fine-tuning a pre-trained TimeSformer of D blocks: block i (from 0) gets lr * layer_decay^(D - i), what
    # comes before the blocks lr * layer_decay^(D + 1), the final norm and the head lr (VideoMAE: 0.75);
    # 1 = one lr for every parameter
    layer_decay: float = 1.0


@dataclass
class TrainConfig:
    global_batch_size: int = 64  # clips per optimizer step over all ranks
    per_device_batch_size: int = 8  # accumulation = global / (per_device x world size), must divide
    max_steps: int = 1000  # optimizer steps
    eval_every: int = 0  # steps; 0 = only at the end
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end
    # minutes of training since the last checkpoint; a checkpoint is written when either this or
    # checkpoint_every is due (0 = steps only). Its cost: docs/training.md "Checkpoint by time".
    checkpoint_every_min: float = 30.0
    # seconds without progress (a step's data, forward/backward, an all-reduce, an evaluation batch, a
    # checkpoint) after which the run writes every rank's Python stacks to {run_dir}/hang/ and stops; also sets
    # the collective timeout (+60 s) and the loader worker timeout (half). Why 600: docs/training.md "Hangs".
    hang_timeout_s: float = 600.0
    keep_last: int = 3  # checkpoints kept
    max_nonfinite_steps: int = 5  # consecutive steps skipped for a non-finite loss or grad norm before the run stops
    seed: int = 0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    compile: bool = False  # torch.compile the model (activation checkpointing: model.grad_checkpointing=true)


@dataclass
class LogConfig:
    log_every: int = 10  # steps between logged training scalars
    wandb_mode: Literal["online", "offline", "disabled"] = "offline"  # WANDB_MODE in the environment wins
    wandb_project: str = "actionrec"
    wandb_entity: str = ""
    peak_tflops_per_device: float = 0.0  # declared peak for the MFU estimate; 0 = do not report MFU
    progress_bar: bool = True
    # classify: at each evaluation, the first N clips of the split are explained (predict.py --explain) and
    # logged as images (overlay frames side by side) to WandB and {run_dir}/plots; 0 = none. Not under ZeRO-3.
    explain_clips: int = 0


@dataclass
class PretrainConfig:
    """Masked video pre-training (task: pretrain; VideoMAE-style, see docs/pretrain.md)."""

    mask_ratio: float = 0.9  # share of patch positions hidden in every frame (tube masking), per clip at random
    tubelet: int = 2  # frames per predicted cube (cube = tubelet frames x patch x patch)
    decoder_dim: int = 0  # 0 = half the encoder's width
    decoder_depth: int = 4
    decoder_heads: int = 0  # 0 = the encoder's number of heads
    # pixels: predict each hidden cube's pixels; motion: its change over its frames (pixels minus the cube's
    # mean frame: a static background is zero, moving things are not); hog: the histograms of oriented
    # gradients of its frames (MaskFeat: 9 bins per 8x8-pixel cell and channel), see docs/pretrain.md
    target: Literal["pixels", "motion", "hog"] = "pixels"
    norm_target: bool = True  # pixels: normalise each cube's target by the cube's own mean and std
    reconstructions: int = 4  # val clips drawn as original / masked / predicted at every evaluation


@dataclass
class Config:
    name: str = "run"  # run dir = {output_dir}/{name}; re-running the same name resumes
    # classify: supervised training on labelled shards; pretrain: masked video pre-training of the
    # model's encoder (labels not read), to fine-tune from with model.pretrained=runs/<that run>
    task: Literal["classify", "pretrain"] = "classify"
    output_dir: str = "runs"
    deepspeed_config: str = ""  # DeepSpeed JSON (ZeRO) selected from the config, without `accelerate launch`
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# Keys the trainer fills in for every model from the data; a user setting them would be silently ignored.
MODEL_KEYS_FROM_DATA = ("num_classes", "num_frames", "img_size")


def build_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train (or evaluate) a video action recognition model. Any world size: "
        "`python train.py`, `accelerate launch train.py`, `torchrun train.py` or the SLURM launcher.",
        epilog="Example: accelerate launch train.py --config configs/demo.yaml train.max_steps=200 "
        "optim.lr=1e-3 model.depth=2",
    )
    parser.add_argument("--config", type=str, default=None, help="experiment YAML (overrides the typed defaults)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.max_steps=100")
    parser.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint instead of training")
    parser.add_argument(
        "--shuffle-frames",
        action="store_true",
        help="with --eval-only: evaluate on clips whose frames are shuffled (does the model use frame order? one "
        "that does falls to what single frames tell; reports go to eval/<split>_frames_shuffled_metrics.json)",
    )
    parser.add_argument(
        "--checkpoint",
        type=str,
        default=None,
        help="checkpoint to evaluate (--eval-only) or to start from: a run dir, checkpoints/latest, "
        "a step_XXXXXXX dir or a model.safetensors",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The run config of a parsed command line. With --eval-only and no --config, the config saved with the
    checkpoint is the base (so `train.py --eval-only --checkpoint runs/x` needs nothing else)."""
    if args.eval_only and not args.checkpoint:
        raise ConfigError("--eval-only needs --checkpoint PATH (a run dir, checkpoints/latest or a model.safetensors)")
    if getattr(args, "shuffle_frames", False) and not args.eval_only:
        raise ConfigError("--shuffle-frames is an evaluation of a saved model: add --eval-only --checkpoint PATH")
    data: dict[str, Any] = {}
    if args.eval_only and not args.config:
        from actionrec.engine.checkpoint import CheckpointNotFound, resolve_checkpoint
        from actionrec.engine.run_model import recorded_run_config

        try:  # the model as the run built it; the run it was fine-tuned from is not read again
            data, _ = recorded_run_config(resolve_checkpoint(args.checkpoint))
        except CheckpointNotFound as exc:
            raise ConfigError(str(exc)) from None
    elif args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"config file {args.config} does not exist: pass --config with a YAML file (see configs/)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {args.config} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {args.config} must hold a mapping of keys, not {type(loaded).__name__}")
        data = loaded
    return build_config(data, list(args.overrides))


def parse_config(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    args = build_arg_parser().parse_args(argv)
    return config_from_args(args), args


def build_config(data: dict[str, Any], overrides: list[str] = (), check_paths: bool = True) -> Config:
    """Defaults <- nested mapping `data` <- `key=value` overrides, typed and validated. check_paths=False
    skips the existence checks of files the run reads (for predict, which needs only the model part)."""
    merged = _to_nested_dict(Config())
    _merge_mapping(merged, data, prefix="", template=merged)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        _set_dotted(merged, key.strip(), raw)
    cfg = _build_dataclass(Config, merged, prefix="")
    _validate(cfg, check_paths)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The nested mapping that `build_config` reads back (model options flattened into `model`)."""
    return _to_nested_dict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    from actionrec.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def world_size_from_env() -> int:
    """World size as set by accelerate launch / torchrun / the SLURM launcher, readable before init."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def derive_accumulation(cfg: Config, world_size: int) -> int:
    per_step = cfg.train.per_device_batch_size * world_size
    if cfg.train.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.per_device_batch_size x world size = {cfg.train.per_device_batch_size} x {world_size}: "
            "change one of them"
        )
    return cfg.train.global_batch_size // per_step


# --- internals -----------------------------------------------------------------------------------------


def _to_nested_dict(obj: Any) -> Any:
    if isinstance(obj, ModelConfig):
        out = {"name": obj.name, "pretrained": obj.pretrained}
        out.update(obj.options)
        return out
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_nested_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_to_nested_dict(v) for v in obj]
    return obj


def _section_fields(prefix: str) -> dict[str, Any] | None:
    """Field name -> type of the dataclass at `prefix` ("" = top); None for the free-form model section."""
    if prefix == "model":
        return None
    cls: Any = Config
    for part in [p for p in prefix.split(".") if p]:
        cls = typing.get_type_hints(cls)[part]
    return typing.get_type_hints(cls)


def _unknown_key(key: str, known: list[str]) -> ConfigError:
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean '{key.rsplit('.', 1)[0] + '.' if '.' in key else ''}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}; known keys here: {', '.join(sorted(known))}")


def _merge_mapping(target: dict, source: dict, prefix: str, template: dict) -> None:
    fields = _section_fields(prefix)
    for key, value in source.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if fields is not None and key not in fields:
            raise _unknown_key(dotted, list(fields))
        if fields is not None and isinstance(target.get(key), dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section: give it a mapping, not {value!r}")
            _merge_mapping(target[key], value, dotted, template)
        else:
            target[key] = value


def _set_dotted(merged: dict, key: str, raw: str) -> None:
    parts = key.split(".")
    node = merged
    for depth, part in enumerate(parts[:-1]):
        prefix = ".".join(parts[:depth])
        fields = _section_fields(prefix)
        if fields is not None and part not in fields:
            raise _unknown_key(".".join(parts[: depth + 1]), list(fields))
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"config key '{'.'.join(parts[: depth + 1])}' is not a section; cannot set '{key}'")
        node = node[part]
    leaf = parts[-1]
    fields = _section_fields(".".join(parts[:-1]))
    if fields is not None and leaf not in fields:
        raise _unknown_key(key, list(fields))
    if fields is not None and isinstance(node.get(leaf), dict):
        raise ConfigError(f"config key '{key}' is a section: set one of its keys, e.g. {key}.<name>=...")
    # Strings stay raw (a run name like "1e3" must not become a float); other values parse as YAML scalars.
    if fields is not None and fields[leaf] is str:
        node[leaf] = raw
    else:
        try:
            node[leaf] = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            node[leaf] = raw


def _build_dataclass(cls: Any, values: dict, prefix: str) -> Any:
    if cls is ModelConfig:
        return _build_model_config(values)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, tp in hints.items():
        dotted = f"{prefix}.{name}" if prefix else name
        value = values[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build_dataclass(tp, value, dotted)
        else:
            kwargs[name] = coerce_value(dotted, value, tp)
    return cls(**kwargs)


def _build_model_config(values: dict) -> ModelConfig:
    values = dict(values)
    name = coerce_value("model.name", values.pop("name"), str)
    pretrained = coerce_value("model.pretrained", values.pop("pretrained", ""), str)
    for key in MODEL_KEYS_FROM_DATA:
        if key in values:
            source = {"num_classes": "the shard set's classes", "num_frames": "data.num_frames", "img_size": "data.size"}
            raise ConfigError(f"config key 'model.{key}' is set from {source[key]}; remove it from the model section")
    from actionrec.models import list_models, model_config_class  # import here: config parsing stays light

    if name not in list_models():
        close = difflib.get_close_matches(name, list_models(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"model.name '{name}' is not a registered model{hint}; choose one of: {', '.join(list_models())}")
    model_cls = model_config_class(name)
    hints = typing.get_type_hints(model_cls)
    options = {}
    for key, value in values.items():
        if key == "options":  # the dataclass field that holds them is not a key users write
            raise ConfigError("unknown config key 'model.options': write the model's options directly in the model "
                              "section (model.depth=2, or `depth: 2` under `model:`)")
        if key not in hints or key in MODEL_KEYS_FROM_DATA:
            known = [k for k in hints if k not in MODEL_KEYS_FROM_DATA] + ["name", "pretrained"]
            raise _unknown_key(f"model.{key}", known)
        options[key] = coerce_value(f"model.{key}", value, hints[key])
    return ModelConfig(name=name, pretrained=pretrained, options=options)


def coerce_value(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`, converting only where it is lossless and obvious."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return coerce_value(key, value, option)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"config key '{key}' has a bad value {value!r}")
    if origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            if origin is tuple and args and args[-1] is not Ellipsis:
                if len(value) != len(args):
                    raise ConfigError(f"config key '{key}' needs {len(args)} values, got {len(value)}")
                return tuple(coerce_value(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
            item_tp = args[0] if args else Any
            out = [coerce_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
            return tuple(out) if origin is tuple else out
        raise ConfigError(f"config key '{key}' must be a list like [1, 2], got {value!r}")
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"config key '{key}' must be a {tp.__name__}, got {value!r}")
    return value


def _validate(cfg: Config, check_paths: bool) -> None:
    """Value checks a type cannot express; each names the key."""
    positive = {
        "train.global_batch_size": cfg.train.global_batch_size,
        "train.per_device_batch_size": cfg.train.per_device_batch_size,
        "train.max_steps": cfg.train.max_steps,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_last": cfg.train.keep_last,
        "train.max_nonfinite_steps": cfg.train.max_nonfinite_steps,
        "train.hang_timeout_s": cfg.train.hang_timeout_s,
        "log.log_every": cfg.log.log_every,
        "data.num_frames": cfg.data.num_frames,
        "data.size": cfg.data.size,
        "data.frame_stride": cfg.data.frame_stride,
        "data.clips_per_video": cfg.data.clips_per_video,
        "data.eval_temporal_clips": cfg.data.eval_temporal_clips,
        "data.eval_spatial_crops": cfg.data.eval_spatial_crops,
        "optim.lr": cfg.optim.lr,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be > 0, got {value}")
    non_negative = {
        "train.eval_every": cfg.train.eval_every,
        "train.checkpoint_every_min": cfg.train.checkpoint_every_min,
        "data.num_workers": cfg.data.num_workers,
        "data.eval_batch_size": cfg.data.eval_batch_size,
        "optim.min_lr": cfg.optim.min_lr,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.grad_clip": cfg.optim.grad_clip,
        "optim.mixup_alpha": cfg.optim.mixup_alpha,
        "optim.cutmix_alpha": cfg.optim.cutmix_alpha,
        "log.peak_tflops_per_device": cfg.log.peak_tflops_per_device,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must be >= 0, got {value}")
    if not 0.0 <= cfg.optim.label_smoothing < 1.0:
        raise ConfigError(f"config key 'optim.label_smoothing' must be in [0, 1), got {cfg.optim.label_smoothing}")
    if cfg.optim.warmup_steps >= cfg.train.max_steps and cfg.optim.warmup_steps > 0:
        raise ConfigError(
            f"config key 'optim.warmup_steps'={cfg.optim.warmup_steps} must be below train.max_steps={cfg.train.max_steps}"
        )
    if not 0.0 < cfg.optim.layer_decay <= 1.0:
        raise ConfigError(f"config key 'optim.layer_decay' must be in (0, 1], got {cfg.optim.layer_decay}")
    if cfg.optim.layer_decay != 1.0:
        from actionrec.models import TimeSformerConfig, model_config_class

        if not issubclass(model_config_class(cfg.model.name), TimeSformerConfig):
            raise ConfigError(f"optim.layer_decay sets an lr per transformer block of a TimeSformer; model.name "
                              f"{cfg.model.name} is not one: set optim.layer_decay=1")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' needs 2 values, got {cfg.optim.betas}")
    for key in ("mean", "std"):
        if len(getattr(cfg.data, key)) != 3:
            raise ConfigError(f"config key 'data.{key}' needs 3 values (one per RGB channel)")
    if cfg.train.global_batch_size % cfg.train.per_device_batch_size != 0:
        raise ConfigError(
            f"train.global_batch_size={cfg.train.global_batch_size} is not a multiple of "
            f"train.per_device_batch_size={cfg.train.per_device_batch_size}"
        )
    if cfg.task == "pretrain":
        _validate_pretrain(cfg)
    if not cfg.name or "/" in cfg.name:
        raise ConfigError(f"config key 'name' must be a non-empty run name without '/', got {cfg.name!r}")
    _validate_model(cfg)
    if not check_paths:
        return
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"deepspeed_config {cfg.deepspeed_config} does not exist (see configs/deepspeed/)")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed_config {cfg.deepspeed_config} is not valid JSON: {exc}") from None
    pretrained = Path(cfg.model.pretrained)
    if cfg.model.pretrained and pretrained.is_dir() and (pretrained / "config.yaml").is_file():
        if not (pretrained / "model.safetensors").is_file():
            raise ConfigError(f"model.pretrained {cfg.model.pretrained} is a run without its final model.safetensors: "
                              "let it finish (re-run its command to resume it) first, or name a checkpoint's "
                              "model.safetensors")
    elif cfg.model.pretrained and not pretrained.exists() and not _has_checkpoint(cfg.run_dir):
        # (a run that resumes takes its weights from its checkpoint: its starting weights may be gone)
        raise ConfigError(f"model.pretrained {cfg.model.pretrained} does not exist: give a local weights file "
                          "or the run dir of a run of ours (masked pre-training or classification)")
    _validate_shards(cfg.data.shards, cfg.task)


def _has_checkpoint(run_dir: Path) -> bool:
    return any(p.name.startswith("step_") and p.is_dir() for p in (run_dir / "checkpoints").glob("step_*"))


def _validate_pretrain(cfg: Config) -> None:
    pre = cfg.pretrain
    if not 0.0 < pre.mask_ratio < 1.0:
        raise ConfigError(f"config key 'pretrain.mask_ratio' must be in (0, 1), got {pre.mask_ratio}")
    for key in ("tubelet", "decoder_depth"):
        if getattr(pre, key) < 1:
            raise ConfigError(f"config key 'pretrain.{key}' must be >= 1, got {getattr(pre, key)}")
    for key in ("decoder_dim", "decoder_heads", "reconstructions"):
        if getattr(pre, key) < 0:
            raise ConfigError(f"config key 'pretrain.{key}' must be >= 0, got {getattr(pre, key)}")
    if cfg.data.num_frames % pre.tubelet:
        raise ConfigError(f"data.num_frames={cfg.data.num_frames} is not a multiple of pretrain.tubelet={pre.tubelet}")
    if cfg.optim.mixup_alpha > 0 or cfg.optim.cutmix_alpha > 0:
        raise ConfigError("optim.mixup_alpha / optim.cutmix_alpha mix labels: set them to 0 for task=pretrain")
    if cfg.optim.layer_decay != 1.0:
        raise ConfigError("optim.layer_decay is a fine-tuning recipe (a pre-trained encoder's early layers move "
                          "least): set it to 1 for task=pretrain")
    from actionrec.models import TimeSformerConfig, model_config_class
    from actionrec.models.masked import check_maskable

    if not issubclass(model_config_class(cfg.model.name), TimeSformerConfig):
        raise ConfigError(f"task=pretrain pre-trains a TimeSformer encoder; model.name {cfg.model.name} is not one")
    try:
        check_maskable(cfg.model.options.get("attention_type", "divided_space_time"))
    except ValueError as exc:
        raise ConfigError(f"model.attention_type: {exc}") from None
    from actionrec.models import model_config
    from actionrec.models.hog import HOG_CELL

    patch_size = cfg.model.options.get("patch_size", model_config(cfg.model.name).patch_size)
    if pre.target == "hog" and patch_size % HOG_CELL:
        raise ConfigError(f"pretrain.target=hog takes histograms over {HOG_CELL}x{HOG_CELL}-pixel cells: "
                          f"model.patch_size must be a multiple of {HOG_CELL}, got {patch_size}")


def _validate_model(cfg: Config) -> None:
    from actionrec.engine.run_model import check_model_config  # the model side of the run config lives there

    check_model_config(cfg)


def _validate_shards(source: str, task: str = "classify") -> None:
    """A local shard set must exist (and be labelled, for classification); URLs and brace patterns are
    checked by the loader when it opens them."""
    if "://" in source or source.startswith("pipe:") or "{" in source:
        return
    path = Path(source)
    if path.is_dir() and not (path / "dataset.json").is_file():
        raise ConfigError(f"data.shards {source} has no dataset.json: pack videos first with shards/pack.py")
    if not path.exists():
        raise ConfigError(f"data.shards {source} does not exist: pack videos with shards/pack.py or fix the path")
    manifest = path / "dataset.json" if path.is_dir() else path
    if task == "classify" and manifest.suffix == ".json":
        try:
            labelled = json.loads(manifest.read_text()).get("labelled", True)
        except (OSError, json.JSONDecodeError, AttributeError):
            return  # the loader says what is wrong with it
        if labelled is False:
            raise ConfigError(f"data.shards {source} is unlabelled (packed without classes): supervised training "
                              "needs labels; pre-train on it with task=pretrain (configs/pretrain_demo.yaml), or "
                              "pack labelled videos (SRC/<class>/<video>) for classification")
