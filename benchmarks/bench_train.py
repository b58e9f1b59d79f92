"""Step time of the actionrec training loop against a bare PyTorch loop, same model, same in-memory batches.

    python benchmarks/bench_train.py                # CPU, 1 process: writes benchmarks/out/bench_train.json

Both loops do the same work per step (uint8 batch -> normalise -> forward -> label-smoothed cross-entropy
-> backward -> grad clipping -> AdamW -> cosine LR); ours adds what it is for (Accelerate's accumulate and
autocast contexts, the data-position/step counters, the per-step non-finite/stop-signal check, windowed
loss/throughput reduction, the metrics.jsonl logger). Rounds alternate bare / ours so machine noise hits both; the median step time of each is compared.
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
from actionrec.engine import trainer as trainer_module  # noqa: E402
from actionrec.engine.faults import StopSignals  # noqa: E402
from actionrec.engine.optim import cosine_with_warmup  # noqa: E402
from actionrec.engine.trainer import DataSetup, Trainer, build_accelerator, run_loop  # noqa: E402
from actionrec.logging import RunMonitor, get_logger  # noqa: E402
from actionrec.models import build_model  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"


def make_batches(n: int, batch: int, frames: int, size: int, classes: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{
        "video": torch.randint(0, 256, (batch, 3, frames, size, size), dtype=torch.uint8, generator=g),
        "label": torch.randint(0, classes, (batch,), generator=g),
        "key": [f"v{i}" for i in range(batch)],
        "skipped": torch.tensor(0),
    } for _ in range(n)]


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--depth", type=int, default=4)
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    classes = 10
    model_options = {"embed_dim": args.embed_dim, "depth": args.depth, "num_heads": 4}
    total_steps = 2 + args.rounds * args.steps
    cfg = build_config({
        "name": "bench_train", "output_dir": str(OUT),
        "data": {"num_frames": args.frames, "size": args.size},
        "model": {"name": "timesformer_tiny", **model_options},
        "train": {"global_batch_size": args.batch, "per_device_batch_size": args.batch, "max_steps": total_steps,
                  "checkpoint_every": 10**6, "precision": "fp32"},
        "log": {"log_every": 10, "wandb_mode": "disabled", "progress_bar": False},
    }, check_paths=False)
    batches = make_batches(4, args.batch, args.frames, args.size, classes)

    accelerator = build_accelerator(cfg, accumulation=1)
    logger = get_logger(True)
    data = DataSetup(shardset=None, classes=[str(c) for c in range(classes)], clip=None,
                     train_samples=len(batches) * args.batch, batches_per_epoch=len(batches))
    ours_model = build_model("timesformer_tiny", num_classes=classes, num_frames=args.frames, img_size=args.size,
                             **model_options)
    bare_model = build_model("timesformer_tiny", num_classes=classes, num_frames=args.frames, img_size=args.size,
                             **model_options)
    bare_model.load_state_dict(ours_model.state_dict())
    trainer = Trainer(cfg, accelerator, data, ours_model, flops_per_clip=0.0, logger=logger)
    monitor = RunMonitor(cfg.run_dir, is_main_process=True, config={}, wandb_mode="disabled", project="bench")
    trainer_module.train_batches = lambda cfg, data, start, rank, world: itertools.cycle(batches)

    # Warm-up (allocator, first-call overheads) for both.
    bare_loop(bare_model, batches, 2, cfg)
    no_signals = StopSignals(())  # the loop's stop flag, never raised here
    cfg.train.max_steps = 2
    run_loop(trainer, monitor, no_signals)

    def ours_loop() -> None:
        cfg.train.max_steps = trainer.progress.step + args.steps
        run_loop(trainer, monitor, no_signals)

    # Wall time swings with other load on a shared machine; CPU time of this (single-threaded) process is
    # the work each loop does. Both are reported, each as the median over the alternating rounds.
    times = {"bare": {"wall": [], "cpu": []}, "ours": {"wall": [], "cpu": []}}
    for round_index in range(args.rounds):
        for name, loop in (("bare", lambda: bare_loop(bare_model, batches, args.steps, cfg)), ("ours", ours_loop)):
            wall, cpu = time.perf_counter(), time.process_time()
            loop()
            times[name]["wall"].append((time.perf_counter() - wall) / args.steps * 1000)
            times[name]["cpu"].append((time.process_time() - cpu) / args.steps * 1000)
        print(f"round {round_index + 1}: bare {times['bare']['wall'][-1]:.1f} ms/step ({times['bare']['cpu'][-1]:.1f} cpu), "
              f"ours {times['ours']['wall'][-1]:.1f} ms/step ({times['ours']['cpu'][-1]:.1f} cpu)")
    median = {name: {kind: statistics.median(v) for kind, v in kinds.items()} for name, kinds in times.items()}
    overhead = {kind: median["ours"][kind] / median["bare"][kind] - 1 for kind in ("wall", "cpu")}
    result = {
        "model": f"timesformer_tiny embed {args.embed_dim} depth {args.depth}, {args.frames}x{args.size}^2, batch {args.batch}",
        "device": "cpu, 1 thread", "steps_per_round": args.steps, "rounds": args.rounds,
        "median_ms_per_step": median, "overhead": overhead,
    }
    (OUT / "bench_train.json").write_text(json.dumps(result, indent=1))
    print(f"| loop | wall ms / step | CPU ms / step |\n|---|---|---|\n"
          f"| bare PyTorch | {median['bare']['wall']:.1f} | {median['bare']['cpu']:.1f} |\n"
          f"| actionrec (Accelerate) | {median['ours']['wall']:.1f} | {median['ours']['cpu']:.1f} |\n"
          f"| overhead | {100 * overhead['wall']:+.1f} % | {100 * overhead['cpu']:+.1f} % |\n"
          f"(median of {args.rounds} alternating rounds x {args.steps} steps; {result['model']})")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
