"""Cost of a checkpoint against a training step: the demo model and TimeSformer-B (8 x 224²), one CPU process.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_checkpoint.py --repeats 3
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_checkpoint.py --smoke     # the test suite's run

For each model: AdamW through Accelerate (what the trainer prepares), a few optimizer steps on random clips of
the configured batch (timed, after one warm-up step), then the trainer's own checkpoint write
(CheckpointManager.save: Accelerate's save_state into a temporary folder, renamed when complete) timed --repeats
times. Reports seconds per checkpoint, its size, and its share of training time at one checkpoint per
N steps (N = checkpoint every 30 min / step time). Writes benchmarks/out/checkpoint/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from actionrec.config import build_config  # noqa: E402
from actionrec.engine.checkpoint import CheckpointManager, TrainProgress  # noqa: E402
from actionrec.engine.faults import folder_bytes, human_bytes  # noqa: E402
from actionrec.engine.run_model import build_model_for, resolve_run_model  # noqa: E402

DEMO = {"model": {"name": "timesformer_tiny", "attention_type": "divided_space_time", "embed_dim": 96, "depth": 4,
                  "num_heads": 4}, "data": {"num_frames": 8, "size": 64}}
BASE = {"model": {"name": "timesformer_base"}, "data": {"num_frames": 8, "size": 224}}


def measure(name: str, settings: dict, batch: int, steps: int, repeats: int, out: Path) -> dict:
    cfg = resolve_run_model(build_config({**settings, "name": name, "output_dir": str(out)}, check_paths=False))
    model = build_model_for(cfg, num_classes=10, load_weights=False)
    acc = Accelerator(cpu=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model, optimizer = acc.prepare(model, optimizer)
    progress = TrainProgress(world_size=1)
    acc.register_for_checkpointing(progress)
    clips = torch.randn(batch, 3, cfg.data.num_frames, cfg.data.size, cfg.data.size)
    labels = torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(clips), labels)
        acc.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up; the optimizer state exists from here on, as in a checkpoint mid-run
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    manager = CheckpointManager(cfg.run_dir, acc, keep_last=1, logger=logging.getLogger("bench"), seed=0)
    times = []
    for i in range(repeats):
        progress.step = i + 1
        start = time.perf_counter()
        path = manager.save(progress.step, {"config.yaml": "{}"})
        times.append(time.perf_counter() - start)
    size = folder_bytes(path)
    every = max(1, round(30 * 60 / step_s))
    best = min(times)
    return {"model": name, "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
            "step_s": step_s, "checkpoint_s": best, "checkpoint_s_all": times, "bytes": size,
            "steps_per_30_min": every, "share_at_30_min": best / (best + every * step_s),
            "share_per_step": best / step_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--base-batch", type=int, default=2, help="TimeSformer-B clips per step")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/checkpoint"))
    parser.add_argument("--smoke", action="store_true", help="the demo model only, 1 step, 1 repeat")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure("demo", DEMO, 8, 1 if args.smoke else args.steps, 1 if args.smoke else args.repeats, Path(tmp))]
        if not args.smoke:
            rows.append(measure("timesformer_base", BASE, args.base_batch, args.steps, args.repeats, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1))
    lines = ["| model | params | batch | step s | checkpoint s (best of reps) | size | share at one per 30 min | "
             "checkpoint / step |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params_M']:.1f} M | {r['batch']} | {r['step_s']:.2f} | {r['checkpoint_s']:.2f} | "
                     f"{human_bytes(r['bytes'])} | {100 * r['share_at_30_min']:.3f} % | {r['share_per_step']:.2f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    main()
