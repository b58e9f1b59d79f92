"""What the training loader hands out, per epoch: videos seen, missing, repeated, and how mixed its batches are.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_order.py --shards data/shards/synth   # the demo's settings
    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_order.py --smoke                      # the test suite's run

Runs the real training loader of every rank (2 processes x 1 worker x 8 clips by default: the demo's
settings) over several epochs and collects the key of every clip it hands out with a non-zero weight: per
epoch, how many distinct training videos were seen, how many never, how many more than once. Shuffle quality:
the mean number of distinct classes in a global batch, against the same batches cut from uniform random
permutations of the training labels (200 of them). Writes benchmarks/out/order/{results.json,table.md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.data import ClipSpec, ShardSet, build_train_loader  # noqa: E402


def collect(shards: ShardSet, ranks: int, workers: int, batch: int, epochs: int, seed: int):
    """Per epoch: Counter of video keys trained on; per global batch: the labels trained on."""
    seen = [collections.Counter() for _ in range(epochs)]
    labels: dict[int, list[int]] = collections.defaultdict(list)
    for rank in range(ranks):
        loader = build_train_loader(shards, clip=ClipSpec(num_frames=8, sampling="dense", frame_stride=2, size=64),
                                    batch_size=batch, num_workers=workers, seed=seed, rank=rank, world_size=ranks)
        for epoch in range(epochs):
            for b in loader:
                real = [n for n, w in enumerate(b["weight"].tolist()) if w > 0]
                seen[epoch].update(b["key"][n] for n in real)
                labels[b["global_batch"]].extend(int(b["label"][n]) for n in real)
    return seen, [labels[g] for g in sorted(labels)]


def random_permutation_mixing(all_labels: np.ndarray, global_batch: int, trials: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(trials):
        order = all_labels[rng.permutation(len(all_labels))]
        means.append(np.mean([len(set(order[i:i + global_batch])) for i in range(0, len(order), global_batch)]))
    return float(np.mean(means))


def smoke_shards(work: Path) -> Path:
    from actionrec.shards.encode import EncodeSettings
    from actionrec.shards.pack import PackOptions, pack_videos
    from actionrec.shards.synthetic import SyntheticSpec, generate_synthetic

    generate_synthetic(work / "videos", SyntheticSpec(classes=4, videos_per_class=6, frames=16, size=32), progress=False)
    pack_videos(work / "videos", work / "shards", PackOptions(encode=EncodeSettings(short_side=32), val=0.0, test=0.0,
                shard_bytes=20000, workers=0), progress=False, log=lambda *a, **k: None)
    return work / "shards"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=Path("data/shards/synth"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8, help="clips per process per micro batch")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/order"))
    parser.add_argument("--smoke", action="store_true", help="a 24-video set made here, 2 epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.smoke:
        args.shards, args.epochs = smoke_shards(Path(tempfile.mkdtemp(prefix="bench_order_"))), 2
    shards = ShardSet.open(args.shards)
    seen, batch_labels = collect(shards, args.processes, args.workers, args.batch, args.epochs, args.seed)
    videos = shards.num_samples("train")
    rows = [{"epoch": e, "clips": sum(c.values()), "distinct": len(c), "missing": videos - len(c),
             "repeated": sum(1 for n in c.values() if n > 1)} for e, c in enumerate(seen)]
    ever = len(set().union(*[set(c) for c in seen]))
    global_batch = args.processes * args.batch
    ours = float(np.mean([len(set(labels)) for labels in batch_labels]))
    all_labels = np.array([label for labels in batch_labels[: len(batch_labels) // args.epochs] for label in labels])
    uniform = random_permutation_mixing(all_labels, global_batch, 200, args.seed)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "shards": str(args.shards), "train_videos": videos,
               "processes": args.processes, "workers": args.workers, "batch_per_process": args.batch,
               "epochs": rows, "videos_ever_seen": ever, "mean_distinct_classes_per_global_batch": ours,
               "uniform_permutation_mean_distinct_classes": uniform, "classes": len(shards.classes or [])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    command = "PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_order.py " + " ".join(argv or sys.argv[1:])
    lines = [f"Measured {results['date']}; {args.shards}: {videos} training videos, {args.processes} processes x "
             f"{args.workers} worker(s), {args.batch} clips per process (global batch {global_batch}).",
             f"Command: `{command.strip()}`", "",
             "| epoch | clips | distinct videos | missing | videos drawn twice or more |", "|---|---|---|---|---|"]
    lines += [f"| {r['epoch']} | {r['clips']} | {r['distinct']} ({r['distinct'] / videos:.0%}) | {r['missing']} | "
              f"{r['repeated']} |" for r in rows]
    lines += ["", f"Over {args.epochs} epochs {ever} of the {videos} training videos were seen.",
              f"Distinct classes per global batch of {global_batch}: {ours:.2f} (uniform random permutation: "
              f"{uniform:.2f}, mean of 200; {results['classes']} classes)."]
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
