"""MODEL_CARD.md: what a run's model is, in one page a person reads (written at the end of every run).

It is made from the run dir alone (config.yaml, classes.json, metrics.jsonl, plots/, model.safetensors) and the
shard set its config names (dataset.json, split.csv), so it can be written again for any finished run:

    python -c "from actionrec.engine.model_card import write_model_card; write_model_card('runs/demo')"
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import yaml

from actionrec.atomic import write_atomic

CARD_NAME = "MODEL_CARD.md"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_set_dir(shards: str) -> Path:
    """The folder of dataset.json and split.csv for `data.shards` (a dir, a dataset.json or a brace pattern)."""
    path = Path(shards)
    return path.parent if path.suffix in (".json", ".tar") or "{" in shards else path


def final_metrics(metrics_path: Path) -> dict[str, dict[str, Any]]:
    """{split: the last evaluation record of that split, its `split/` prefix removed, plus its step}."""
    latest: dict[str, dict[str, Any]] = {}
    if not metrics_path.is_file():
        return latest
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        splits = {key.split("/", 1)[0] for key in record if key.endswith("/video/top1")}
        for split in splits:
            values = {key.split("/", 1)[1]: v for key, v in record.items() if key.startswith(f"{split}/")}
            latest[split] = {"step": record.get("step"), **values}
    return latest


def write_model_card(run_dir: str | Path) -> Path:
    """Write run_dir/MODEL_CARD.md (replacing an earlier one) and return its path."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    classes = json.loads((run_dir / "classes.json").read_text())
    data, model = config["data"], config["model"]
    shards_dir = shard_set_dir(str(data["shards"]))
    lines = [f"# Model card: {run_dir.name}", ""]
    lines += _model_section(run_dir, config, classes)
    lines += _data_section(shards_dir, data, classes)
    lines += _metrics_section(run_dir, classes)
    lines += _preprocessing_section(data, model["name"], run_dir)
    lines += ["## Config", "", "The run's config.yaml, the model section as the run built it (no `auto` left):", "",
              "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(), "```", ""]
    out = run_dir / CARD_NAME
    write_atomic(out, "\n".join(lines))
    return out


def _model_section(run_dir: Path, config: dict[str, Any], classes: list[str]) -> list[str]:
    weights = run_dir / "model.safetensors"
    lines = ["## Model", "", f"- architecture: `{config['model']['name']}` ({len(classes)} classes), "
             f"clips of {config['data']['num_frames']} frames at {config['data']['size']}² pixels",
             f"- task: {config.get('task', 'classify')}; trained for {config['train']['max_steps']} optimizer steps "
             f"at global batch {config['train']['global_batch_size']}"]
    if config["model"].get("pretrained"):
        lines.append(f"- started from: `{config['model']['pretrained']}`")
    if weights.is_file():
        lines.append(f"- weights: `model.safetensors` (fp32, {weights.stat().st_size / 1e6:.1f} MB), "
                     f"sha256 `{sha256_of(weights)}`")
    for exported in sorted(list(run_dir.glob("*.onnx")) + list(run_dir.glob("*.pt2"))):
        lines.append(f"- exported: `{exported.name}`, sha256 `{sha256_of(exported)}`")
    lines += [f"- load it: `python predict.py VIDEO --checkpoint {run_dir}`; export it: "
              f"`python export.py {run_dir} --format onnx --out model.onnx` (docs/export.md)", ""]
    return lines


def _data_section(shards_dir: Path, data: dict[str, Any], classes: list[str]) -> list[str]:
    lines = ["## Data", "", f"- shard set: `{data['shards']}`"]
    manifest_path = shards_dir / "dataset.json"
    split_csv = shards_dir / "split.csv"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if split_csv.is_file():
        lines.append(f"- split file: `{split_csv}`, sha256 `{sha256_of(split_csv)}`")
    if manifest is None:
        lines += [f"- no dataset.json at {shards_dir}: per-split counts unknown", ""]
        return lines
    pack = manifest.get("pack", {})
    lines.append(f"- packed as {manifest.get('format', '?')}, short side {pack.get('short_side', '?')}, "
                 f"{pack.get('fps', '?')} fps (format version {manifest.get('format_version', '?')}, "
                 f"{manifest.get('created', '?')})")
    counts = manifest.get("per_class_counts", {})
    splits = list(counts)
    lines += ["", "| class | " + " | ".join(splits) + " |", "|---|" + "---:|" * len(splits)]
    for name in classes:
        lines.append(f"| {name} | " + " | ".join(str(counts[s].get(name, 0)) for s in splits) + " |")
    lines.append("| **all** | " + " | ".join(str(sum(counts[s].values())) for s in splits) + " |")
    return lines + [""]


def _metrics_section(run_dir: Path, classes: list[str]) -> list[str]:
    results = final_metrics(run_dir / "metrics.jsonl")
    lines = ["## Final metrics", ""]
    if not results:
        return lines + ["No evaluation was recorded (metrics.jsonl has no val or test results).", ""]
    splits = list(results)
    lines += ["Video level: each video's views averaged, as `predict.py` scores a file.", "",
              "| split | step | videos | top-1 | top-5 | mean class | mAP | clip top-1 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for split, r in results.items():
        lines.append(f"| {split} | {r['step']} | {int(r.get('video/count', 0))} | {_pct(r.get('video/top1'))} | "
                     f"{_pct(r.get('video/top5'))} | {_pct(r.get('video/mean_class_accuracy'))} | "
                     f"{_pct(r.get('video/mAP'))} | {_pct(r.get('clip/top1'))} |")
    lines += ["", "Per-class accuracy (video level):", "", "| class | " + " | ".join(splits) + " |",
              "|---|" + "---:|" * len(splits)]
    for name in classes:
        row = [_pct(results[s].get("per_class_accuracy/video", {}).get(name)) for s in splits]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")
    for split in splits:
        image = Path("plots") / f"confusion_matrix_{split}.png"
        if (run_dir / image).is_file():
            lines += [f"Confusion matrix, {split} (rows: true class):", "", f"![{split} confusion matrix]({image})", ""]
    return lines


def _preprocessing_section(data: dict[str, Any], model_name: str, run_dir: Path) -> list[str]:
    from actionrec.data import ClipSpec

    clip = ClipSpec(num_frames=data["num_frames"], sampling=data["sampling"], frame_stride=data["frame_stride"],
                    size=data["size"])
    if data["sampling"] == "uniform":
        frames = f"{data['num_frames']} frames spread evenly over the video (TSN-style, one per segment's middle)"
    else:
        frames = f"{data['num_frames']} consecutive frames {data['frame_stride']} apart (dense)"
    return [
        "## Preprocessing a caller must apply", "",
        f"`{model_name}` takes `float32 (B, 3, {data['num_frames']}, {data['size']}, {data['size']})`, RGB, "
        "channels first then time; it returns logits (softmax for probabilities).", "",
        f"1. frames: {frames}; {data['eval_temporal_clips']} temporal clip(s) x {data['eval_spatial_crops']} "
        "spatial crop(s) per video at evaluation, probabilities averaged",
        f"2. size: short side resized to {clip.resolved_eval_short_side}, centre crop {data['size']}x{data['size']}"
        if data["eval_spatial_crops"] == 1 else
        f"2. size: short side resized to {data['size']}, {data['size']}x{data['size']} crops at the start, centre "
        "and end of the long side",
        f"3. values: pixels / 255, then (x - mean) / std per channel, mean {data['mean']}, std {data['std']}", "",
        f"`predict.py VIDEO --checkpoint {run_dir}` does all of it; an exported model carries the same spec "
        "(docs/export.md).", "",
    ]


def _pct(value: float | None) -> str:
    return "—" if value is None or value != value else f"{100 * value:.1f}%"
