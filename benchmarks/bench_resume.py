"""Time to the first training batch when a run resumes at 90 % of an epoch, against resuming at its start.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_resume.py --videos 96 --repeats 3
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_resume.py --smoke     # the test suite's run

Packs synthetic camera-like 10 s 456x256 videos (bench_loader.py's generator) with the real packer, then builds
the training loader at micro batch 0 and at 90 % of the first epoch (what a resumed run does) and times each
until its first batch is in hand: worker start-up, the epoch order, reading the sample index, reading and
decoding the first batch's samples. The two starts alternate, best of --repeats each. A loader that had to
re-read what it consumed before the resume point (the resampled-stream design this replaced) would take about
90 % of an epoch's reading longer at 90 %: the ratio shows that none of that happens.
Writes benchmarks/out/resume/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.data import ClipSpec, build_train_loader  # noqa: E402
from benchmarks.bench_loader import make_sources, pack  # noqa: E402

CLIP = ClipSpec(num_frames=8, sampling="uniform", size=224)
BATCH = 8


def first_batch_seconds(shards, start_batch: int, workers: int) -> float:
    begin = time.perf_counter()
    loader = build_train_loader(shards, clip=CLIP, batch_size=BATCH, num_workers=workers, seed=0, rank=0,
                                world_size=1, start_batch=start_batch, batches_per_pass=1)
    for _ in loader:
        pass
    return time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=96, help="videos in the training set")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for videos and shards (default: temp)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/resume"))
    parser.add_argument("--smoke", action="store_true", help="16 videos of 1 s, 1 repeat, 1 worker")
    args = parser.parse_args(argv)
    if args.smoke:
        args.videos, args.seconds, args.repeats, args.workers = 16, 1.0, 1, 1
    if args.videos < BATCH * 2 or args.repeats < 1:
        parser.error(f"--videos must be >= {2 * BATCH} and --repeats >= 1")
    torch.set_num_threads(1)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_resume_"))
    make_sources(work / "sources", args.videos, args.seconds, args.fps)
    shards = pack(work / "sources", work / "mp4", "mp4", args.fps)
    epoch = args.videos // BATCH
    late = int(0.9 * epoch)
    times: dict[str, list[float]] = {"start": [], "90 %": []}
    first_batch_seconds(shards, 0, args.workers)  # index sidecars, page cache: both starts find them warm
    for _ in range(args.repeats):  # alternating, so load spikes hit both
        times["start"].append(first_batch_seconds(shards, 0, args.workers))
        times["90 %"].append(first_batch_seconds(shards, late, args.workers))
    best = {name: min(values) for name, values in times.items()}
    ratio = best["90 %"] / best["start"]
    results = {"date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": f"{psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
               "videos": args.videos, "seconds": args.seconds, "batch": BATCH, "workers": args.workers,
               "repeats": args.repeats, "resume_batch": late, "batches_per_epoch": epoch,
               "seconds_to_first_batch": times, "best": best, "ratio_90_to_start": ratio}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    command = "PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_resume.py " + " ".join(argv or sys.argv[1:])
    table = "\n".join([
        f"Measured {results['date']} ({results['machine']}); {args.videos} videos of {args.seconds:g} s, 456x256, "
        f"{epoch} batches of {BATCH} per epoch, {args.workers} worker(s), best of {args.repeats} alternating runs.",
        f"Command: `{command.strip()}`", "",
        "| resume at | seconds to the first batch |", "|---|---|",
        f"| the epoch's start (batch 0) | {best['start']:.2f} |",
        f"| 90 % of the epoch (batch {late}) | {best['90 %']:.2f} |",
        f"| ratio | {ratio:.2f}x |",
    ])
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
