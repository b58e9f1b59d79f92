"""decode_on=worker vs decode_on=device: clips/s and CPU ms per 8x224² training clip, mp4 and jpg shards.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_device_decode.py --videos 8 --seconds 4

Packs camera-like synthetic videos with the real packer (bench_loader.py's generator), then reads the same
training batches both ways, interleaved, best of --repeats. CPU ms per clip counts the training process and
its loader workers together, so on a CPU-only machine the device path (which decodes in the training process
with the same readers) should cost about what the worker path costs; on a GPU machine the training process's
CPU share drops to reading, sampling and launching nvJPEG/NVDEC. Writes benchmarks/out/device_decode/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.data import TrainAugment, build_train_loader  # noqa: E402
from actionrec.data.device_decode import pynvvideocodec_load_error  # noqa: E402
from benchmarks.bench_loader import BATCH, CLIP, _measure, make_sources, pack  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=8, help="synthetic 456x256 videos to pack")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each video")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=1, help="loader workers")
    parser.add_argument("--batches", type=int, default=0, help="batches of 8 clips per run (0: 3 passes' worth)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs per row; the best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where decode_on=device decodes (default: cuda where present)")
    parser.add_argument("--formats", default="mp4,jpg", help="comma-separated shard formats to measure")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/device_decode"))
    args = parser.parse_args(argv)
    args.format_list = [f for f in args.formats.split(",") if f]
    if args.videos < 2 or args.seconds <= 0 or args.workers < 0 or args.repeats < 1 or \
            not set(args.format_list) <= {"mp4", "jpg"}:
        parser.error("--videos must be >= 2, --seconds > 0, --workers >= 0, --repeats >= 1, --formats of mp4,jpg")
    return args


def throughput(shards, decode_on: str, args) -> tuple[float, float]:
    loader = build_train_loader(shards, clip=CLIP, batch_size=BATCH, num_workers=args.workers,
                                batches_per_pass=args.batches, seed=0, rank=0, world_size=1,
                                augment=TrainAugment(), decode_on=decode_on, device=args.device)

    def clips(batch: dict) -> int:
        if batch["video"].is_cuda:
            torch.cuda.synchronize()  # the clips are decoded, not just queued
        return len(batch["key"])

    result = _measure(iter(loader), clips)
    return result.clips_per_s, result.cpu_ms_per_clip


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    args.batches = args.batches or max(6, 3 * args.videos // BATCH)
    work = Path(tempfile.mkdtemp(prefix="bench_device_decode_"))
    try:
        make_sources(work / "sources", args.videos, args.seconds, args.fps)
        shards = {fmt: pack(work / "sources", work / fmt, fmt, args.fps) for fmt in args.format_list}
        rows = [(fmt, where) for fmt in args.format_list for where in ("worker", "device")]
        best = {row: (0.0, float("inf")) for row in rows}
        for fmt, where in tqdm([r for _ in range(args.repeats) for r in rows], desc="decode_on", unit="run"):
            speed, cpu = throughput(shards[fmt], where, args)
            best[(fmt, where)] = (max(best[(fmt, where)][0], speed), min(best[(fmt, where)][1], cpu))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    decoders = {"jpg": "nvJPEG" if args.device.startswith("cuda") else "Pillow",
                "mp4": "NVDEC" if args.device.startswith("cuda") and pynvvideocodec_load_error() is None else "PyAV"}
    command = "PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_device_decode.py " + " ".join(argv or sys.argv[1:])
    lines = [f"Measured {time.strftime('%Y-%m-%d %H:%M')}; {args.videos} videos of {args.seconds:g} s at "
             f"{args.fps:g} fps, 456x256, default packing; {args.workers} worker(s), {args.batches} batches of "
             f"{BATCH} 8x224² TSN-uniform clips per run, best of {args.repeats}; decode_on=device on "
             f"{args.device}.", f"Command: `{command.strip()}`", "",
             "| shards | decode_on | decoder | clips/s | CPU ms per clip (process + workers) | CPU vs worker |",
             "|---|---|---|---|---|---|"]
    for fmt, where in rows:
        speed, cpu = best[(fmt, where)]
        decoder = decoders[fmt] if where == "device" else ("PyAV" if fmt == "mp4" else "Pillow")
        ratio = cpu / best[(fmt, "worker")][1]
        lines.append(f"| {fmt} | {where} | {decoder} | {speed:.1f} | {cpu:.1f} | {ratio:.2f}x |")
    table = "\n".join(lines)
    (args.out / "results.json").write_text(json.dumps({f"{f}/{w}": best[(f, w)] for f, w in rows}, indent=1))
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
