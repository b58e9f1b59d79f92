"""Does the default pre-training recipe help, as a user runs it? The real commands on three data families.

For each family: generate a labelled set and an unlabelled set (another seed of the same generator, so
pre-training never sees a test video), pack the labelled one with `--train-per-class 8` and the other as
`--layout unlabelled --test 0`; then for each seed, with `configs/pretrain_demo.yaml` and
`configs/finetune_demo.yaml` unchanged but for paths, run names and `train.seed`, on 2 CPU processes
(`accelerate launch`):

1. masked pre-training on the unlabelled shards;
2. the fine-tune from its encoder;
3. the same fine-tune from scratch (`model.pretrained=`).

and read the test video top-1 of both fine-tunes from their `metrics.jsonl`. Families: `synth` (the demo's
generator, `shards/synthetic.py`), `motion4` (`benchmarks/motion_heldout.py`), `camera6`
(`benchmarks/camera_set.py`). The in-memory sweep of variants is `bench_pretrain.py`; this is the check of
the defaults (docs/pretrain.md).

    python benchmarks/bench_pretrain_recipe.py --families synth motion4 camera6 --seeds 0 1
    python benchmarks/bench_pretrain_recipe.py --smoke          # tiny sets and runs: does it run

Writes WORK/bench_pretrain_recipe.{json,md} (WORK: --work, default benchmarks/out/pretrain_recipe); videos,
shards and runs stay in WORK, so a re-run reuses them (a finished run is not run again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from actionrec.engine.model_card import final_metrics  # noqa: E402

GENERATORS = {
    "synth": [sys.executable, str(REPO / "shards" / "synthetic.py"), "--no-progress"],
    "motion4": [sys.executable, str(REPO / "benchmarks" / "motion_heldout.py")],
    "camera6": [sys.executable, str(REPO / "benchmarks" / "camera_set.py")],
}
LAUNCH = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
          str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), str(REPO / "train.py")]
# --smoke: a handful of tiny videos and a few steps (the configs' model, clip size and pipeline otherwise)
SMOKE_RUN = ["train.max_steps=2", "train.eval_every=2", "train.checkpoint_every=2", "optim.warmup_steps=1",
             "log.log_every=1", "log.wandb_mode=disabled", "data.num_workers=0", "train.global_batch_size=4",
             "train.per_device_batch_size=2"]


def run(command: list[str], log: Path) -> float:
    """Run `command` in the repo with its output in `log`; its wall time. A failure ends the benchmark with the
    log's last lines."""
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"error: {' '.join(command[:6])} ... failed (exit {done.returncode}); see {log}:\n{tail}")
    return round(time.perf_counter() - started, 1)


def make_sets(family: str, work: Path, per_class: int, unlabelled_per_class: int) -> tuple[Path, Path]:
    """(labelled shards with 8 train videos per class, unlabelled shards) of one family, made once."""
    labelled, unlabelled = work / "shards" / f"{family}-8", work / "shards" / f"{family}-unlabelled"
    for videos, seed, count, shards, pack in (
        (work / "videos" / family, 1, per_class, labelled, ["--train-per-class", "8"]),
        (work / "videos" / f"{family}-extra", 2, unlabelled_per_class, unlabelled, ["--layout", "unlabelled", "--test", "0"]),
    ):
        if not (shards / "dataset.json").is_file():
            if not (videos / ".complete").is_file():
                run([*GENERATORS[family], "--out", str(videos), "--videos-per-class", str(count), "--seed", str(seed)],
                    work / "logs" / f"generate-{videos.name}.txt")
                (videos / ".complete").touch()
            run([sys.executable, str(REPO / "shards" / "pack.py"), str(videos), "--out", str(shards), *pack],
                work / "logs" / f"pack-{shards.name}.txt")
    return labelled, unlabelled


def test_top1(run_dir: Path) -> float | None:
    return final_metrics(run_dir / "metrics.jsonl").get("test", {}).get("video/top1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(GENERATORS), choices=list(GENERATORS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--videos-per-class", type=int, default=100, help="labelled set (8 per class are trained on)")
    parser.add_argument("--unlabelled-per-class", type=int, default=100)
    parser.add_argument("--work", type=Path, default=REPO / "benchmarks" / "out" / "pretrain_recipe")
    parser.add_argument("--smoke", action="store_true", help="10 videos per class, 2 steps per run: does it run")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (e.g. pretrain.target=hog)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.videos_per_class, args.unlabelled_per_class = 10, 2
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    extra = [*(SMOKE_RUN if args.smoke else []), *args.overrides]
    rows = []
    for family in args.families:
        labelled, unlabelled = make_sets(family, args.work, args.videos_per_class, args.unlabelled_per_class)
        for seed in args.seeds:
            runs = args.work / "runs"
            common = [f"output_dir={runs}", f"train.seed={seed}", *extra]
            pre, ft, scratch = (f"{kind}_{family}_s{seed}" for kind in ("pretrain", "finetune", "scratch"))
            row = {"family": family, "seed": seed}
            for name, config, options in (
                (pre, "pretrain_demo", [f"data.shards={unlabelled}"]),
                (ft, "finetune_demo", [f"data.shards={labelled}", f"model.pretrained={runs / pre}"]),
                (scratch, "finetune_demo", [f"data.shards={labelled}", "model.pretrained="]),
            ):
                if not (runs / name / "model.safetensors").is_file():
                    row[f"{name.split('_')[0]}_s"] = run(
                        [*LAUNCH, "--config", str(REPO / "configs" / f"{config}.yaml"), f"name={name}", *common, *options],
                        args.work / "logs" / f"{name}.txt")
            row["scratch"], row["pretrained"] = test_top1(runs / scratch), test_top1(runs / ft)
            if row["scratch"] is not None and row["pretrained"] is not None:
                row["gain"] = round(100 * (row["pretrained"] - row["scratch"]), 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = ["| data set | seed | from scratch | pre-trained | gain (points) |", "|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{100 * row[k]:.1f} %" if row.get(k) is not None else "—" for k in ("scratch", "pretrained")]
        lines.append(f"| {row['family']} | {row['seed']} | {cells[0]} | {cells[1]} | {row.get('gain', '—')} |")
    for family in args.families:
        gains = [row["gain"] for row in rows if row["family"] == family and "gain" in row]
        if gains:
            lines.append(f"| {family} | mean of {len(gains)} | | | {sum(gains) / len(gains):.1f} |")
    (args.work / "bench_pretrain_recipe.md").write_text("\n".join(lines) + "\n")
    (args.work / "bench_pretrain_recipe.json").write_text(json.dumps({"overrides": extra, "rows": rows}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
