"""Step time of the actionrec training loop against a bare PyTorch loop, same model, same in-memory batches.

    python benchmarks/bench_train.py                # CPU, 1 process: writes benchmarks/out/bench_train.json

Both loops do the same work per step (uint8 batch -> normalise -> forward -> label-smoothed cross-entropy
-> backward -> grad clipping -> AdamW -> cosine LR); ours adds what it is for (Accelerate's accumulate and
autocast contexts, the data-position/step counters, the per-step non-finite/stop-signal check, windowed
loss/throughput reduction, the metrics.jsonl logger, the per-micro-batch sample log). A third loop is ours with
the sample log off (data.sample_log=false), which measures what the log costs. Rounds alternate the loops so
machine noise hits all; the median step time of each is compared. --smoke: a few steps, for the test suite.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.config import build_config  # noqa: E402
from actionrec.data import normalize_on_device  # noqa: E402
from actionrec.data.sample_log import SampleLog  # noqa: E402
from actionrec.engine.faults import StopSignals  # noqa: E402
from actionrec.engine.optim import cosine_with_warmup  # noqa: E402
from actionrec.engine.trainer import Trainer, build_accelerator, run_loop  # noqa: E402
from actionrec.logging import RunMonitor, get_logger  # noqa: E402
from actionrec.models import build_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def make_batches(n: int, batch: int, frames: int, size: int, classes: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{
        "video": torch.randint(0, 256, (batch, 3, frames, size, size), dtype=torch.uint8, generator=g),
        "label": torch.randint(0, classes, (batch,), generator=g),
        "key": [f"v{b * batch + i}" for i in range(batch)],
        "view": torch.zeros(batch, dtype=torch.int64),
        "weight": torch.ones(batch),
        "skipped": torch.tensor(0),
        "skipped_clips": [],
    } for b in range(n)]


class InMemoryData:
    """The trainer's data side (RunData's interface) over fixed in-memory batches, one epoch = the list."""

    def __init__(self, batches: list[dict], classes: list[str]):
        self.batches, self.classes = batches, classes
        self.position = 0  # global batches handed out (accumulation 1)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.batches)

    @property
    def train_videos(self) -> int:
        return sum(len(b["key"]) for b in self.batches)

    @property
    def epoch(self) -> float:
        return self.position / len(self.batches)

    def num_samples(self, split: str) -> int:
        return 0  # no evaluation splits

    def train_batches(self):
        while True:
            epoch, index = divmod(self.position, len(self.batches))
            self.position += 1
            yield {**self.batches[index], "epoch": epoch, "global_batch": self.position - 1}

    def state_dict(self) -> dict:
        return {"global_batches": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seek(state["global_batches"])

    def seek(self, global_batches: int) -> None:
        self.position = global_batches


def bare_loop(model, batches, steps: int, cfg) -> None:
    """The minimal correct loop."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg))
    source = itertools.cycle(batches)
    for _ in range(steps):
        batch = next(source)
        video = normalize_on_device(batch["video"], cfg.data.mean, cfg.data.std)
        loss = F.cross_entropy(model(video), batch["label"], label_smoothing=cfg.optim.label_smoothing)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--smoke", action="store_true", help="2 rounds of 2 steps of a 1-block model (the test suite's run)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the run dir and bench_train.json go (default {OUT})")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.rounds, args.depth, args.embed_dim = 2, 2, 1, 32
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    classes = 10
    model_options = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": 4}
    total_steps = 2 + args.rounds * args.steps
    cfg = build_config({
        "name": "bench_train", "output_dir": str(out),
        "data": {"num_frames": args.frames, "size": args.size},
        "model": {"name": "timesformer_tiny", **model_options},
        "train": {"global_batch_size": args.batch, "per_device_batch_size": args.batch, "max_steps": total_steps,
                  "checkpoint_every": 10**6, "precision": "fp32"},
        "log": {"log_every": 10, "wandb_mode": "disabled", "progress_bar": False},
    }, check_paths=False)
    batches = make_batches(4, args.batch, args.frames, args.size, classes)

    accelerator = build_accelerator(cfg, accumulation=1)
    logger = get_logger(True)
    data = InMemoryData(batches, [str(c) for c in range(classes)])
    ours_model = build_model("timesformer_tiny", num_classes=classes, num_frames=args.frames, img_size=args.size,
                             **model_options)
    bare_model = build_model("timesformer_tiny", num_classes=classes, num_frames=args.frames, img_size=args.size,
                             **model_options)
    bare_model.load_state_dict(ours_model.state_dict())
    trainer = Trainer(cfg, accelerator, data, ours_model, flops_per_clip=0.0, logger=logger)
    monitor = RunMonitor(cfg.run_dir, is_main_process=True, config={}, wandb_mode="disabled", project="bench")

    # Warm-up (allocator, first-call overheads) for both.
    bare_loop(bare_model, batches, 2, cfg)
    no_signals = StopSignals(())  # the loop's stop flag, never raised here
    cfg.train.max_steps = 2
    run_loop(trainer, monitor, no_signals)

    def ours_loop(sample_log: bool) -> None:
        trainer.sample_log = SampleLog(cfg.run_dir, 0, enabled=sample_log)
        cfg.train.max_steps = trainer.progress.step + args.steps
        run_loop(trainer, monitor, no_signals)
        trainer.sample_log.close()

    # Wall time swings with other load on a shared machine; CPU time of this (single-threaded) process is
    # the work each loop does. Both are reported, each as the median over the alternating rounds.
    loops = {"bare": lambda: bare_loop(bare_model, batches, args.steps, cfg), "ours": lambda: ours_loop(True),
             "ours_no_log": lambda: ours_loop(False)}
    times = {name: {"wall": [], "cpu": []} for name in loops}
    for round_index in range(args.rounds):
        for name, loop in loops.items():
            wall, cpu = time.perf_counter(), time.process_time()
            loop()
            times[name]["wall"].append((time.perf_counter() - wall) / args.steps * 1000)
            times[name]["cpu"].append((time.process_time() - cpu) / args.steps * 1000)
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {t['wall'][-1]:.1f} ms/step ({t['cpu'][-1]:.1f} cpu)"
                                                       for name, t in times.items()))
    median = {name: {kind: statistics.median(v) for kind, v in kinds.items()} for name, kinds in times.items()}
    overhead = {kind: median["ours"][kind] / median["bare"][kind] - 1 for kind in ("wall", "cpu")}
    log_cost = {kind: median["ours"][kind] / median["ours_no_log"][kind] - 1 for kind in ("wall", "cpu")}
    result = {
        "model": f"timesformer_tiny embed {args.embed_dim} depth {args.depth}, {args.frames}x{args.size}^2, batch {args.batch}",
        "device": "cpu, 1 thread", "steps_per_round": args.steps, "rounds": args.rounds,
        "median_ms_per_step": median, "overhead": overhead, "sample_log_cost": log_cost,
    }
    (out / "bench_train.json").write_text(json.dumps(result, indent=1))
    print(f"| loop | wall ms / step | CPU ms / step |\n|---|---|---|\n"
          f"| bare PyTorch | {median['bare']['wall']:.1f} | {median['bare']['cpu']:.1f} |\n"
          f"| actionrec (Accelerate) | {median['ours']['wall']:.1f} | {median['ours']['cpu']:.1f} |\n"
          f"| actionrec, sample log off | {median['ours_no_log']['wall']:.1f} | {median['ours_no_log']['cpu']:.1f} |\n"
          f"| overhead | {100 * overhead['wall']:+.1f} % | {100 * overhead['cpu']:+.1f} % |\n"
          f"| sample log cost | {100 * log_cost['wall']:+.1f} % | {100 * log_cost['cpu']:+.1f} % |\n"
          f"(median of {args.rounds} alternating rounds x {args.steps} steps; {result['model']})")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
