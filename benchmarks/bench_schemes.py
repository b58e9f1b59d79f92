"""The TimeSformer attention-scheme comparison (the paper's Table 1) on the synthetic motion set, on a CPU.

    python benchmarks/bench_schemes.py                       # every model, the demo's size and step budget
    python benchmarks/bench_schemes.py --steps 100 --models timesformer_divided r3d_18

The CNN rows are the demo-sized models of configs/demo_<model>.yaml (their model sections).

Each model is trained by `train.py` itself (one process, same shards, clip size, global batch, optimiser,
schedule and step budget as `configs/demo.yaml`; only the `model` section differs) and evaluated on the
held-out test split, then evaluated again on the same test clips with their frames shuffled (a model that
uses frame order falls to what single frames tell; one that ignores it stays where it was). Writes
benchmarks/out/schemes/table.md (+ .json) with parameters, clip- and video-level top-1, video-level mAP, the
shuffled-frames video top-1 and train clips/s, and prints the table. The synthetic classes come in time-reversed pairs, so a model
that ignores frame order (space-only, whose from-scratch stem is per-frame too) can at best name the pair:
50% top-1.

Runs live in benchmarks/out/schemes/runs/scheme-<model>-<steps>steps. Running the same model with the same
step count again reuses that run (train.py resumes a finished run and evaluates it again); another step count
trains a new one, so a table never mixes budgets. Delete the runs folder to retrain from scratch.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actionrec.config import parse_config  # noqa: E402
from actionrec.engine.run_model import build_model_for  # noqa: E402

OUT = REPO / "benchmarks" / "out" / "schemes"

TINY_TIMESFORMER = {"name": "timesformer_tiny", "embed_dim": 96, "depth": 4, "num_heads": 4}


def demo_model(name: str) -> dict:
    """The model section of the CNN family's demo config (configs/demo_<name>.yaml): the demo-sized model."""
    return yaml.safe_load((REPO / "configs" / f"demo_{name}.yaml").read_text())["model"]


MODELS: dict[str, dict] = {
    "timesformer_space_only": {**TINY_TIMESFORMER, "attention_type": "space_only"},
    "timesformer_joint": {**TINY_TIMESFORMER, "attention_type": "joint_space_time"},
    "timesformer_divided": {**TINY_TIMESFORMER, "attention_type": "divided_space_time"},
    "timesformer_sparse_local_global": {**TINY_TIMESFORMER, "attention_type": "sparse_local_global"},
    "timesformer_axial": {**TINY_TIMESFORMER, "attention_type": "axial"},
    "r3d_18": demo_model("r3d_18_transformer"),
    "r2plus1d_18": demo_model("r2plus1d_18_transformer"),
    "resnet18_temporal": demo_model("resnet18_temporal"),
}


def last_record_with(path: Path, key: str) -> dict:
    found: dict = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if key in record:
            found = record
    return found


def mean_train_throughput(path: Path) -> float:
    values = [json.loads(line).get("train/clips_per_s_per_device") for line in path.read_text().splitlines()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def run_one(label: str, model: dict, base: dict, steps: int, out: Path) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["name"] = f"scheme-{label}-{steps}steps"  # the budget in the name: a rerun never reuses another budget's run
    cfg["output_dir"] = str(out / "runs")
    cfg["model"] = model
    cfg["train"].update(max_steps=steps, eval_every=0, checkpoint_every=steps)
    cfg["optim"]["warmup_steps"] = min(cfg["optim"].get("warmup_steps", 0), steps // 10)
    cfg["log"].update(wandb_mode="disabled", progress_bar=False)
    config_path = out / "configs" / f"{label}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir = out / "runs" / cfg["name"]
    print(f"== {label}: training {steps} steps", flush=True)
    subprocess.run([sys.executable, "train.py", "--config", str(config_path)], cwd=REPO, check=True)

    # "Does it use time?": the same test clips with their frames shuffled (train.py --eval-only --shuffle-frames).
    subprocess.run([sys.executable, "train.py", "--eval-only", "--shuffle-frames", "--checkpoint", str(run_dir),
                    "data.val_split=", "log.progress_bar=false"], cwd=REPO, check=True)
    shuffled = json.loads((run_dir / "eval" / "test_frames_shuffled_metrics.json").read_text())

    config, _ = parse_config(["--config", str(config_path)])
    classes = json.loads((run_dir / "classes.json").read_text())
    params = sum(p.numel() for p in build_model_for(config, len(classes)).parameters())
    metrics = run_dir / "metrics.jsonl"
    test = last_record_with(metrics, "test/video/top1")
    return {
        "model": label,
        "params_m": params / 1e6,
        "clip_top1": test.get("test/clip/top1", float("nan")),
        "video_top1": test.get("test/video/top1", float("nan")),
        "video_map": test.get("test/video/mAP", float("nan")),
        "shuffled_video_top1": shuffled["video/top1"],
        "train_clips_per_s": mean_train_throughput(metrics),
    }


def write_table(rows: list[dict], steps: int) -> str:
    lines = [
        "| model | params (M) | clip top-1 | video top-1 | video mAP | video top-1, frames shuffled | train clips/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['params_m']:.2f} | {row['clip_top1']:.3f} | {row['video_top1']:.3f} "
            f"| {row['video_map']:.2f} | {row['shuffled_video_top1']:.3f} | {row['train_clips_per_s']:.1f} |"
        )
    lines.append(f"\n{steps} steps per model, 1 process, test split (video level: mean of the views' probabilities); "
                 "frames shuffled: the same test clips with their frames in a random order (`train.py --eval-only "
                 "--shuffle-frames`).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml", help="base config (data, optimiser, batch)")
    parser.add_argument("--steps", type=int, default=0, help="training steps per model (default: the config's)")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--out", type=Path, default=OUT, help="table, configs and runs (default: %(default)s)")
    args = parser.parse_args(argv)
    base = yaml.safe_load((REPO / args.config).read_text())
    shards = REPO / base["data"]["shards"]
    if not (shards / "dataset.json").is_file():
        print(f"error: {shards} has no dataset.json: run `make demo` (or shards/synthetic.py + shards/pack.py) first",
              file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.steps = args.steps or base["train"]["max_steps"]
    rows = [run_one(label, MODELS[label], base, args.steps, args.out) for label in args.models]
    table = write_table(rows, args.steps)
    (args.out / "table.md").write_text(table)
    (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
