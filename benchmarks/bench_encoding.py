"""Pack-time encoding against decode cost, side by side in one run: CPU per training clip, bytes, fidelity.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_encoding.py --videos 3

Makes two kinds of camera-like 10 s 456x256 30 fps sources (the loader benchmark's panning textured scene
with moving objects and sensor noise, and an FFmpeg `mandelbrot` zoom with temporal noise: fine detail in
motion everywhere), packs them with the real packer once per encoding, and for each (encoding, decoder)
measures through the real loader (one process, no workers, one thread, CPU clock):
  - CPU ms per 8 x 224^2 training clip, TSN-uniform and dense (stride 4): tar reading, demux, decode, RGB
    conversion, crop/resize and collate, the whole per-clip cost of a loader worker;
  - bytes per video (the shard tar bytes / videos);
  - PSNR of every --psnr-step-th decoded frame of the first --psnr-seconds against the source frame shown at the same
    time (RGB, at the source's size; a smaller short side is scaled back up, so its lost detail counts).
The grid is reduced around the promising settings rather than the full cross product: GOP 32/16/8/4 and
intra-only at v1's settings (preset veryfast, crf 23, the preset's 3 B-frames), B-frames off, x264
`tune=fastdecode` at GOP 16/8/4, the v2 default (fastdecode, GOP 4, no B-frames) with a higher CRF, a
15 fps cap and a 224 short side, and the decoder flags (skip_loop_filter, 2 threads) on v1's encoding.
Ratios are against v1's defaults measured in the same run: GOP 16, crf 23, preset veryfast, no tune,
decoded by v1's decoder="auto" (torchcodec where it loads).
Writes benchmarks/out/encoding/{results.json,table.md,cost_vs_bytes.png}.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import av
import numpy as np
import psutil
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.data import ClipSpec, ShardSet, build_train_loader  # noqa: E402
from actionrec.data.decode import Decoder, PyAVFrameReader, torchcodec_load_error  # noqa: E402
from actionrec.shards import EncodeSettings, PackOptions, pack_videos  # noqa: E402
from benchmarks.bench_loader import synthetic_camera_video  # noqa: E402

BATCH = 8
CLIPS = {"uniform": ClipSpec(num_frames=8, sampling="uniform", size=224),
         "dense": ClipSpec(num_frames=8, sampling="dense", frame_stride=4, size=224)}
OLD = EncodeSettings(gop=16, crf=23, preset="veryfast", tune="none", bframes=None, fps=30, fps_mode="exact")  # the packer's defaults until v2
NEW = EncodeSettings()  # the packer's defaults now


@dataclass(frozen=True)
class Encoding:
    name: str
    settings: EncodeSettings
    decoders: tuple[str, ...] = ("pyav",)  # "pyav", "torchcodec", "pyav+slf" (skip_loop_filter), "pyav+2t" (2 threads)


def grid() -> list[Encoding]:
    fast = replace(OLD, tune="fastdecode")
    fast_nob = replace(fast, bframes=0)
    rows = [Encoding("v1 default: GOP 16", OLD, ("torchcodec", "pyav", "pyav+slf", "pyav+2t")),
            Encoding("GOP 32", replace(OLD, gop=32)),
            Encoding("GOP 8", replace(OLD, gop=8)),
            Encoding("GOP 4", replace(OLD, gop=4), ("torchcodec", "pyav", "pyav+slf")),
            Encoding("GOP 4, no B-frames", replace(OLD, gop=4, bframes=0)),
            Encoding("intra-only (GOP 1)", replace(OLD, gop=1)),
            Encoding("fastdecode, GOP 16", replace(fast, gop=16)),
            Encoding("fastdecode, GOP 8", replace(fast, gop=8)),
            Encoding("fastdecode, GOP 4", replace(fast, gop=4)),
            Encoding("fastdecode, GOP 4, no B, crf 23", replace(fast_nob, gop=4, fps_mode="cap"), ("torchcodec", "pyav")),
            Encoding("fastdecode, GOP 4, no B, crf 24", replace(fast_nob, gop=4, crf=24, fps_mode="cap"), ("torchcodec", "pyav")),
            Encoding("fastdecode, GOP 4, no B, crf 25", replace(fast_nob, gop=4, crf=25, fps_mode="cap")),
            Encoding("fastdecode, GOP 5, no B, crf 23", replace(fast_nob, gop=5, fps_mode="cap")),
            Encoding("fastdecode, GOP 6, no B, crf 24", replace(fast_nob, gop=6, crf=24, fps_mode="cap")),
            Encoding("v2 default, 15 fps cap", replace(NEW, fps=15)),
            Encoding("v2 default, short side 224", replace(NEW, short_side=224))]
    # The row with the packer's current defaults is labelled as such (added if no row has them).
    rows = [replace(e, name=f"{e.name} (v2 default)") if e.settings == NEW else e for e in rows]
    if not any(e.settings == NEW for e in rows):
        rows.append(Encoding("v2 default", NEW, ("torchcodec", "pyav")))
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=3, help="videos per content type (default 3)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each source video (default 10)")
    parser.add_argument("--clips", type=int, default=32, help="measured clips per (encoding, decoder, sampling)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved repetitions; the lowest CPU per clip is kept (the machine is shared)")
    parser.add_argument("--psnr-step", type=int, default=1,
                        help="PSNR of every n-th frame (default 1; a step sharing a factor with a GOP length "
                             "over-weights that encoding's keyframes, which x264 codes at higher quality)")
    parser.add_argument("--psnr-seconds", type=float, default=4.0, help="PSNR over the first seconds of each video")
    parser.add_argument("--only", default="", help="comma-separated substrings: measure only matching encodings "
                                                   "(the v1 and v2 defaults are always measured)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/encoding"), help="results folder")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for videos/shards (default: temp)")
    args = parser.parse_args(argv)
    if args.videos < 1 or args.seconds <= 0 or args.clips < BATCH or args.repeats < 1 or args.psnr_step < 1:
        parser.error(f"--videos must be >= 1, --seconds > 0, --clips >= {BATCH}, --repeats and --psnr-step >= 1")
    if shutil.which("ffmpeg") is None:
        parser.error("the ffmpeg CLI makes the mandelbrot sources: apt-get install ffmpeg")
    return args


# -- sources ------------------------------------------------------------------------------------------------


def mandelbrot_video(path: Path, seconds: float, seed: int) -> None:
    """FFmpeg's mandelbrot zoom with temporal noise: detail in motion over the whole frame."""
    start_x = -0.743643887037151 + 0.0005 * seed
    source = (f"mandelbrot=size=456x256:rate=30:maxiter=512:start_x={start_x}:start_y=-0.131825904205330,"
              f"noise=alls=6:allf=t+u:all_seed={seed},format=yuv420p")
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-f", "lavfi", "-i", source,
                    "-t", f"{seconds}", "-c:v", "libx264", "-crf", "18", "-preset", "veryfast", str(path)], check=True)


def make_sources(folder: Path, videos: int, seconds: float) -> None:
    jobs = [("camera", i) for i in range(videos)] + [("mandelbrot", i) for i in range(videos)]
    for kind, i in tqdm(jobs, desc="source videos", unit="video"):
        target = folder / kind / f"{kind}_{i:03d}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            continue
        if kind == "camera":
            synthetic_camera_video(target, seconds, 30, seed=i)
        else:
            mandelbrot_video(target, seconds, seed=i)


# -- measurements -------------------------------------------------------------------------------------------


def decoder_for(name: str) -> str | Decoder:
    return {"pyav+slf": Decoder("pyav", skip_loop_filter=True), "pyav+2t": Decoder("pyav", threads=2)}.get(name, name)


def cpu_ms_per_clip(shardset: ShardSet, decoder: str, sampling: str, clips: int, seed: int) -> float:
    """CPU per clip of a whole loader pass in this process. The shuffle buffer holds one batch, so filling it
    reads 8 samples more than the clips use (a worker in steady state reads one sample per clip)."""
    loader = build_train_loader(shardset, clip=CLIPS[sampling], batch_size=BATCH, num_workers=0,
                                batches_per_epoch=clips // BATCH, seed=seed, rank=0, world_size=1,
                                shuffle_buffer=BATCH, decoder=decoder_for(decoder))
    start = time.process_time()
    count = sum(len(batch["key"]) for batch in loader)
    return 1000 * (time.process_time() - start) / count


def psnr_db(shards: Path, sources: Path, decoder: str, seconds: float, step: int = 1) -> dict[str, float]:
    """Mean PSNR per content type of every `step`-th decoded frame of the first `seconds` against the source frame
    shown at the same time (RGB, at the source's size)."""
    import webdataset as wds

    settings = decoder_for(decoder)
    settings = settings if isinstance(settings, Decoder) else Decoder("pyav")  # torchcodec: identical pixels
    scores: dict[str, list[float]] = {}
    for sample in wds.WebDataset(sorted(str(p) for p in shards.glob("*.tar")), shardshuffle=False, empty_check=False):
        meta = json.loads(sample["json"])
        reference, source_rate = source_frames(sources / meta["source"], seconds)
        with PyAVFrameReader(sample["mp4"], settings) as reader:
            # A step sharing a factor with the GOP length over-weights keyframes (every 3rd frame of GOP 6 is a
            # keyframe half the time), which are coded at higher quality; step 1 has no such bias.
            picks = list(range(0, min(reader.num_frames, round(seconds * meta["fps"])), step))
            out = reader.read(picks)  # (N, 3, H, W)
        ref = reference[[min(len(reference) - 1, round(i * source_rate / meta["fps"])) for i in picks]]
        if out.shape[-2:] != ref.shape[1:3]:  # smaller short side: back to the source size, lost detail counts
            out = torch.nn.functional.interpolate(out.float(), size=ref.shape[1:3], mode="bicubic").clamp(0, 255)
        err = (out.float() - torch.from_numpy(ref).permute(0, 3, 1, 2).float()) ** 2
        mse = err.mean(dim=(1, 2, 3)).clamp_min(1e-10)
        scores.setdefault(meta["label"], []).extend((10 * torch.log10(255.0**2 / mse)).tolist())
    return {kind: float(np.mean(values)) for kind, values in scores.items()}


@functools.cache
def source_frames(path: Path, seconds: float) -> tuple[np.ndarray, float]:
    """The first `seconds` of a source as (N, H, W, 3) uint8 and its frame rate (kept for every encoding)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate)
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(round(seconds * rate) + 1), container.decode(stream))]
    return np.stack(frames), rate


def settings_slug(settings: EncodeSettings) -> str:
    """A folder name per encoding, so --work caches packs across runs whatever --only selects."""
    return "enc-" + hashlib.sha1(json.dumps(asdict(settings), sort_keys=True).encode()).hexdigest()[:10]


def pack(sources: Path, out: Path, settings: EncodeSettings) -> ShardSet:
    if not (out / "dataset.json").exists():
        pack_videos(sources, out, PackOptions(encode=settings, val=0.0, test=0.0, workers=2), progress=False,
                    log=lambda _message: None)
    return ShardSet.open(out)


@dataclass
class Row:
    encoding: str
    decoder: str
    settings: dict
    bytes_per_video: float
    psnr: dict[str, float]
    cpu_ms: dict[str, float] = field(default_factory=lambda: {s: float("inf") for s in CLIPS})


def baseline_decoder() -> str:
    """v1's decoder="auto": torchcodec where it loads, else PyAV (then with this version's faster reader, so the
    ratios understate the gain over v1)."""
    return "torchcodec" if torchcodec_load_error() is None else "pyav"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_encoding_"))
    torch.set_num_threads(1)
    make_sources(work / "sources", args.videos, args.seconds)
    encodings = [e for e in grid() if not args.only or e.settings in (OLD, NEW)
                 or any(s and s in e.name for s in args.only.split(","))]
    available = {"pyav", "pyav+slf", "pyav+2t"} | ({"torchcodec"} if torchcodec_load_error() is None else set())
    rows: list[Row] = []
    shardsets: dict[str, ShardSet] = {}
    for encoding in tqdm(encodings, desc="pack + PSNR", unit="encoding"):
        folder = work / settings_slug(encoding.settings)
        shardsets[encoding.name] = pack(work / "sources", folder, encoding.settings)
        tar_bytes = sum(p.stat().st_size for p in folder.glob("*.tar"))
        scores = {}
        for decoder in encoding.decoders:
            if decoder not in available:
                continue
            pixels = "slf" if decoder == "pyav+slf" else "default"  # skip_loop_filter is the only flag that changes pixels
            if pixels not in scores:
                scores[pixels] = psnr_db(folder, work / "sources", decoder, args.psnr_seconds, args.psnr_step)
            rows.append(Row(encoding.name, decoder, asdict(encoding.settings), tar_bytes / (2 * args.videos),
                            scores[pixels]))
    runs = [(row, sampling, r) for r in range(args.repeats) for row in rows for sampling in CLIPS]
    for row, sampling, r in tqdm(runs, desc="CPU per clip", unit="run"):  # interleaved: load spikes hit all rows
        ms = cpu_ms_per_clip(shardsets[row.encoding], row.decoder, sampling, args.clips, seed=r)
        row.cpu_ms[sampling] = min(row.cpu_ms[sampling], ms)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": f"{psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
               "videos": 2 * args.videos, "seconds": args.seconds, "clips": args.clips, "repeats": args.repeats,
               "baseline_decoder": baseline_decoder(),
               "rows": [asdict(row) for row in rows]}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    command = "PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_encoding.py " + " ".join(argv or sys.argv[1:])
    print(write_report(results, args.out, command.strip()))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def write_report(results: dict, out: Path, command: str) -> str:
    from actionrec.logging import headless_pyplot

    rows = results["rows"]
    base = next(r for r in rows if r["encoding"].startswith("v1 default") and r["decoder"] == results["baseline_decoder"])
    base_psnr = float(np.mean(list(base["psnr"].values())))
    lines = [f"Measured {results['date']} on {results['machine']}; {results['videos']} videos "
             f"({results['videos'] // 2} camera-like, {results['videos'] // 2} mandelbrot), {results['seconds']:g} s "
             f"456x256 30 fps; {results['clips']} clips per cell, best of {results['repeats']}. Ratios against v1's "
             f"default encoding with v1's default decoder ({results['baseline_decoder']}).",
             f"Command: `{command}`", "",
             "| encoding | decoder | CPU ms/clip TSN | dense | TSN cost vs v1 | bytes/video | bytes vs v1 "
             "| PSNR camera | PSNR mandelbrot | ΔPSNR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mean_psnr = float(np.mean(list(r["psnr"].values())))
        lines.append(f"| {r['encoding']} | {r['decoder']} | {r['cpu_ms']['uniform']:.1f} | {r['cpu_ms']['dense']:.1f} "
                     f"| {r['cpu_ms']['uniform'] / base['cpu_ms']['uniform']:.2f} | {r['bytes_per_video'] / 1e6:.2f} MB "
                     f"| {r['bytes_per_video'] / base['bytes_per_video']:.2f} | {r['psnr'].get('camera', float('nan')):.2f} "
                     f"| {r['psnr'].get('mandelbrot', float('nan')):.2f} | {mean_psnr - base_psnr:+.2f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")

    plt = headless_pyplot()
    figure, axis = plt.subplots(figsize=(9, 5.5))
    markers = {"pyav": "s", "torchcodec": "^", "pyav+slf": "D", "pyav+2t": "v"}
    for decoder, marker in markers.items():
        chosen = [r for r in rows if r["decoder"] == decoder]
        if chosen:
            axis.scatter([r["bytes_per_video"] / 1e6 for r in chosen], [r["cpu_ms"]["uniform"] for r in chosen],
                         marker=marker, label=decoder)
    for r in rows:
        if r["decoder"] == "pyav":
            axis.annotate(r["encoding"], (r["bytes_per_video"] / 1e6, r["cpu_ms"]["uniform"]), fontsize=6,
                          xytext=(3, 2), textcoords="offset points")
    axis.axhline(base["cpu_ms"]["uniform"] / 3, color="grey", linestyle=":", label="1/3 of v1's CPU")
    axis.axvline(2 * base["bytes_per_video"] / 1e6, color="grey", linestyle="--", label="2x v1's bytes")
    axis.set_xlabel("bytes per 10 s video (MB)")
    axis.set_ylabel("CPU ms per 8x224² TSN clip (lower is better)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "cost_vs_bytes.png", dpi=120)
    return table


if __name__ == "__main__":
    sys.exit(main())
