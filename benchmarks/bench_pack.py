"""Packing throughput and size: shards/pack.py (PyAV, in-process FFmpeg) against the ffmpeg CLI
transcoding the same files to the same settings, in the same run; shard bytes vs source bytes, mp4 vs jpg.

    python benchmarks/bench_pack.py [--videos 24] [--size 256] [--frames 48] [--short-side 128] [--repeats 2]

Writes OUT/bench_pack.json (--out, default benchmarks/out/bench_pack) and prints a Markdown table (pasted into
docs/shards.md).
"""

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.shards import EncodeSettings, PackOptions, SyntheticSpec, generate_synthetic, pack_videos  # noqa: E402
from actionrec.shards.encode import output_size  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "bench_pack"


def ffmpeg_command(source: Path, target: Path, settings: EncodeSettings, width: int, height: int) -> list[str]:
    """The CLI equivalent of our encoder: same filters, codec options, one thread like one pack worker."""
    tune = [] if settings.tune == "none" else ["-tune", settings.tune]
    bframes = [] if settings.bframes is None else ["-bf", str(settings.bframes)]
    return ["ffmpeg", "-nostdin", "-v", "error", "-y", "-threads", "1", "-i", str(source), "-an",
            "-filter_threads", "1", "-vf", f"fps={settings.fps:g},scale={width}:{height},format=yuv420p",
            "-c:v", "libx264", "-preset", settings.preset, *tune, *bframes, "-crf", str(settings.crf),
            "-g", str(settings.gop), "-keyint_min", str(settings.gop), "-sc_threshold", "0", "-threads", "1", str(target)]


def time_ffmpeg(out: Path, sources: list[Path], settings: EncodeSettings, size: int) -> tuple[float, int]:
    target_dir = out / "ffmpeg"
    shutil.rmtree(target_dir, ignore_errors=True)
    target_dir.mkdir(parents=True)
    width, height = output_size(size, size, settings.short_side)
    start = time.perf_counter()
    for i, source in enumerate(sources):
        subprocess.run(ffmpeg_command(source, target_dir / f"{i}.mp4", settings, width, height), check=True)
    elapsed = time.perf_counter() - start
    return elapsed, sum(p.stat().st_size for p in target_dir.iterdir())


def time_ffmpeg_one_process(out: Path, sources: list[Path], settings: EncodeSettings, size: int) -> float:
    """All files in one ffmpeg command (one input -> one output each): no per-file process start-up."""
    target_dir = out / "ffmpeg_one"
    shutil.rmtree(target_dir, ignore_errors=True)
    target_dir.mkdir(parents=True)
    width, height = output_size(size, size, settings.short_side)
    per_file = ffmpeg_command(Path("IN"), Path("OUT"), settings, width, height)
    options = per_file[per_file.index("-an"):-1]
    command = ["ffmpeg", "-nostdin", "-v", "error", "-y", "-threads", "1"]
    for source in sources:
        command += ["-i", str(source)]
    for i in range(len(sources)):
        command += ["-map", f"{i}:v", *options, str(target_dir / f"{i}.mp4")]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def payload_bytes(out: Path, shards: list[str], suffix: str) -> int:
    return sum(m.size for s in shards for m in tarfile.open(out / s) if m.name.endswith(suffix))


def time_pack(work: Path, src: Path, settings: EncodeSettings, workers: int) -> tuple[float, int, int]:
    out = work / f"pack_{settings.format}_{workers}"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    result = pack_videos(src, out, PackOptions(encode=settings, workers=workers), progress=False, log=lambda m: None)
    elapsed = time.perf_counter() - start
    assert result.total_packed == len(list(src.rglob("*.mp4"))) and not result.skipped
    shards = [s for split in result.shards.values() for s in split]
    return (elapsed, sum((out / s).stat().st_size for s in shards),
            payload_bytes(out, shards, ".mp4" if settings.format == "mp4" else ".jpg"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--size", type=int, default=256, help="source frame size (square)")
    parser.add_argument("--frames", type=int, default=48)
    parser.add_argument("--short-side", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of N (the machine is shared and noisy)")
    parser.add_argument("--out", type=Path, default=OUT, help="results and scratch folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if shutil.which("ffmpeg") is None:
        print("error: no ffmpeg CLI on PATH (apt-get install -y --no-install-recommends ffmpeg)", file=sys.stderr)
        return 2
    out = args.out
    src = out / "src"
    spec = SyntheticSpec(classes=4, videos_per_class=max(1, args.videos // 4), frames=args.frames, size=args.size)
    if not src.exists() or len(list(src.rglob("*.mp4"))) != spec.classes * spec.videos_per_class:
        shutil.rmtree(src, ignore_errors=True)
        generate_synthetic(src, spec, progress=True)
    sources = sorted(src.rglob("*.mp4"))
    source_bytes = sum(p.stat().st_size for p in sources)
    mp4 = EncodeSettings(short_side=args.short_side)
    jpg = EncodeSettings(format="jpg", short_side=args.short_side)
    version = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True).stdout.split("\n")[0]

    runs: dict[str, list[float]] = {"ffmpeg": [], "ffmpeg_one": [], "pack1": [], "pack2": [], "jpg1": []}
    sizes, payload = {}, {}
    for _ in range(args.repeats):  # interleaved, so load changes hit every contender alike
        t, sizes["ffmpeg"] = time_ffmpeg(out, sources, mp4, args.size)
        runs["ffmpeg"].append(t)
        runs["ffmpeg_one"].append(time_ffmpeg_one_process(out, sources, mp4, args.size))
        t, sizes["pack1"], payload["pack1"] = time_pack(out, src, mp4, 1)
        runs["pack1"].append(t)
        t, _, _ = time_pack(out, src, mp4, 2)
        runs["pack2"].append(t)
        t, sizes["jpg1"], payload["jpg1"] = time_pack(out, src, jpg, 1)
        runs["jpg1"].append(t)
    n = len(sources)
    best = {k: min(v) for k, v in runs.items()}
    vps = {k: n / v for k, v in best.items()}
    base = vps["ffmpeg_one"]
    rows = [
        ("ffmpeg CLI, one process per file", vps["ffmpeg"], vps["ffmpeg"], sizes["ffmpeg"], sizes["ffmpeg"]),
        ("ffmpeg CLI, one process for all files (baseline)", base, base, sizes["ffmpeg"], sizes["ffmpeg"]),
        ("shards/pack.py mp4, --workers 1", vps["pack1"], vps["pack1"], sizes["pack1"], payload["pack1"]),
        ("shards/pack.py mp4, --workers 2", vps["pack2"], vps["pack2"] / 2, sizes["pack1"], payload["pack1"]),
        ("shards/pack.py jpg, --workers 1", vps["jpg1"], vps["jpg1"], sizes["jpg1"], payload["jpg1"]),
    ]
    table = [f"{n} videos, {args.frames} frames {args.size}x{args.size} H.264 -> short side {args.short_side}, "
             f"{mp4.fps:g} fps, gop {mp4.gop}, crf {mp4.crf}, preset {mp4.preset}, tune {mp4.tune}, "
             f"B-frames {'the preset' if mp4.bframes is None else mp4.bframes}, 1 thread per worker; "
             f"source {source_bytes / 1e6:.2f} MB; baseline {' '.join(version.split()[:3])}; best of {args.repeats}. "
             "pack.py times are end to end (listing, split, encoding, tar writing, dataset.json, plot).",
             "",
             "| contender | videos/s | videos/s per worker | per worker vs baseline | output (shard files) | "
             "video payload | payload / source |",
             "|---|---|---|---|---|---|---|"]
    for name, total, per_worker, nbytes, video_bytes in rows:
        table.append(f"| {name} | {total:.1f} | {per_worker:.1f} | {per_worker / base:.2f}x | {nbytes / 1e6:.2f} MB | "
                     f"{video_bytes / 1e6:.2f} MB | {video_bytes / source_bytes:.2f} |")
    print("\n".join(table))
    (out / "bench_pack.json").write_text(json.dumps({"runs_s": runs, "videos": n, "bytes": sizes, "payload": payload,
                                                     "source_bytes": source_bytes, "ffmpeg": version,
                                                     "args": {**vars(args), "out": str(out)}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
