"""Pack-time encoding against decode cost, side by side in one run: CPU per training clip, bytes, fidelity.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_encoding.py --videos 3

Makes three kinds of 10 s 456x256 30 fps sources (--content):
  - camera: the loader benchmark's panning textured scene with moving objects and light noise (sigma 3 before
    the source's crf 18, so most of it is smoothed away by the encoder);
  - sensor: the same scene with camera sensor noise, new in every frame (FFmpeg `noise=alls=12:allf=t`,
    --sensor-noise: about 6 grey levels of luma std against the camera source), which x264 cannot predict
    from frame to frame;
  - mandelbrot: an FFmpeg `mandelbrot` zoom with temporal noise: fine detail in motion everywhere.
Each content type is packed on its own with the real packer once per encoding, and for each (content,
encoding, decoder) the real loader measures (one process, no workers, one thread, CPU clock):
  - the marginal CPU ms per 8 x 224^2 training clip, TSN-uniform and dense (stride 4): tar reading, demux,
    decode, RGB conversion, crop/resize and collate, the whole per-clip cost of a loader worker in steady
    state (a first batch opens the shards and is not counted);
  - bytes per video (the shard tar bytes / videos);
  - PSNR of every --psnr-step-th decoded frame of the first --psnr-seconds against the source frame shown at the same
    time (RGB, at the source's size; a smaller short side is scaled back up, so its lost detail counts).
The grid is reduced around the promising settings rather than the full cross product: GOP 32/16/8/4 and
intra-only at v1's settings (preset veryfast, crf 23, the preset's 3 B-frames), B-frames off, x264
`tune=fastdecode` at GOP 16/8/4, the v2 default (fastdecode, GOP 4, no B-frames) with a higher CRF, a
15 fps cap and a 224 short side, and the decoder flags (skip_loop_filter, 2 threads) on v1's encoding.
Ratios are against v1's defaults measured in the same repetition: GOP 16, crf 23, preset veryfast, no tune,
decoded by v1's decoder="auto" (torchcodec where it loads). The v1 -> v2 ratio is split into its two causes, each
with the other held fixed: the encoding (v1 vs v2 packing, read by the same decoder) and the decoder switch
(torchcodec, v1's `auto`, vs the PyAV GOP-prefix reader, v2's `auto`, on the same packing); the split table gives
each ratio per content type as the median and range over the --repeats repetitions.
Writes benchmarks/out/encoding/{results.json,table.md,cost_vs_bytes.png}.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
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
CONTENTS = ("camera", "sensor", "mandelbrot")
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
    parser.add_argument("--content", default=",".join(CONTENTS),
                        help=f"comma-separated content types to measure (default all: {','.join(CONTENTS)})")
    parser.add_argument("--sensor-noise", type=int, default=12,
                        help="strength of the sensor content's noise (FFmpeg noise=alls; default 12: about 6 grey "
                             "levels of luma std; the sources are kept in --work, so another strength needs another "
                             "--work)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each source video (default 10)")
    parser.add_argument("--clips", type=int, default=32,
                        help="measured clips per (content, encoding, decoder, sampling) and repetition (a first "
                             "batch is read before and not counted)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repetitions (default 3); each is kept, ratios are taken within one "
                             "repetition and reported as median and range (the machine is shared)")
    parser.add_argument("--psnr-step", type=int, default=1,
                        help="PSNR of every n-th frame (default 1; a step sharing a factor with a GOP length "
                             "over-weights that encoding's keyframes, which x264 codes at higher quality)")
    parser.add_argument("--psnr-seconds", type=float, default=4.0, help="PSNR over the first seconds of each video")
    parser.add_argument("--only", default="", help="comma-separated substrings: measure only matching encodings "
                                                   "(the v1 and v2 defaults are always measured)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/encoding"), help="results folder")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for videos/shards (default: temp)")
    args = parser.parse_args(argv)
    content = [c for c in args.content.split(",") if c]
    if not content or set(content) - set(CONTENTS):
        parser.error(f"--content takes a comma-separated subset of {','.join(CONTENTS)}, got {args.content!r}")
    args.content = content
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


def sensor_noise_video(path: Path, camera: Path, seed: int, strength: int) -> None:
    """The camera scene with sensor noise drawn anew in every frame (luma and chroma), as a camera's sensor
    adds it: x264 can neither predict it from the previous frame nor, at crf 23-24, smooth all of it away."""
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(camera), "-vf",
                    f"noise=alls={strength}:allf=t:all_seed={seed},format=yuv420p", "-c:v", "libx264", "-crf", "18",
                    "-preset", "veryfast", str(path)], check=True)


def source_folder(work: Path, kind: str) -> Path:
    """One pack source per content type (a single class folder inside), so each type is measured on its own."""
    return work / "sources" / kind


def make_sources(work: Path, kinds: list[str], videos: int, seconds: float, sensor_noise: int) -> None:
    # sensor videos are made from the camera videos of the same seed
    needed = sorted(set(kinds) | ({"camera"} if "sensor" in kinds else set()), key=CONTENTS.index)
    jobs = [(kind, i) for kind in needed for i in range(videos)]
    for kind, i in tqdm(jobs, desc="source videos", unit="video"):
        target = source_folder(work, kind) / kind / f"{kind}_{i:03d}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            continue
        if kind == "camera":
            synthetic_camera_video(target, seconds, 30, seed=i)
        elif kind == "sensor":
            sensor_noise_video(target, source_folder(work, "camera") / "camera" / f"camera_{i:03d}.mp4", seed=i,
                               strength=sensor_noise)
        else:
            mandelbrot_video(target, seconds, seed=i)


# -- measurements -------------------------------------------------------------------------------------------


def decoder_for(name: str) -> str | Decoder:
    return {"pyav+slf": Decoder("pyav", skip_loop_filter=True), "pyav+2t": Decoder("pyav", threads=2)}.get(name, name)


def cpu_ms_per_clip(shardset: ShardSet, decoder: str, sampling: str, clips: int, seed: int) -> float:
    """Marginal CPU per clip of a loader pass in this process: the first batch (opening the shards and their
    sample indexes, the decoder's first use) is not counted, so every counted clip reads one sample,
    as a worker in steady state does. The loader holds one batch of lookahead; with one batch more in the
    epoch than are timed, the timed stretch makes exactly the timed number of batches, with or without it."""
    timed = clips // BATCH
    loader = build_train_loader(shardset, clip=CLIPS[sampling], batch_size=BATCH, num_workers=0,
                                batches_per_pass=timed + 2, seed=seed, rank=0, world_size=1,
                                decoder=decoder_for(decoder))
    batches = iter(loader)
    next(batches)
    start = time.process_time()
    count = sum(len(batch["key"]) for batch in islice(batches, timed))
    elapsed = time.process_time() - start
    for _ in batches:  # the last batch, untimed
        pass
    return 1000 * elapsed / count


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
        pack_videos(sources, out, PackOptions(encode=settings, layout="folder", val=0.0, test=0.0, workers=2),
                    progress=False, log=lambda _message: None)
    return ShardSet.open(out)


@dataclass
class Row:
    content: str
    encoding: str
    decoder: str
    settings: dict
    bytes_per_video: float
    psnr: float
    cpu_ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in CLIPS})  # one per repetition


def baseline_decoder() -> str:
    """v1's decoder="auto": torchcodec where it loads, else PyAV (then with this version's faster reader, so the
    ratios understate the gain over v1)."""
    return "torchcodec" if torchcodec_load_error() is None else "pyav"


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_encoding_"))
    torch.set_num_threads(1)
    make_sources(work, args.content, args.videos, args.seconds, args.sensor_noise)
    encodings = [e for e in grid() if not args.only or e.settings in (OLD, NEW)
                 or any(s and s in e.name for s in args.only.split(","))]
    available = {"pyav", "pyav+slf", "pyav+2t"} | ({"torchcodec"} if torchcodec_load_error() is None else set())
    rows: list[Row] = []
    shardsets: dict[tuple[str, str], ShardSet] = {}
    jobs = [(content, encoding) for content in args.content for encoding in encodings]
    for content, encoding in tqdm(jobs, desc="pack + PSNR", unit="encoding"):
        sources = source_folder(work, content)
        folder = work / content / settings_slug(encoding.settings)
        shardsets[content, encoding.name] = pack(sources, folder, encoding.settings)
        tar_bytes = sum(p.stat().st_size for p in folder.glob("*.tar"))
        scores = {}
        for decoder in encoding.decoders:
            if decoder not in available:
                continue
            pixels = "slf" if decoder == "pyav+slf" else "default"  # skip_loop_filter is the only flag that changes pixels
            if pixels not in scores:
                scores[pixels] = psnr_db(folder, sources, decoder, args.psnr_seconds, args.psnr_step)[content]
            rows.append(Row(content, encoding.name, decoder, asdict(encoding.settings), tar_bytes / args.videos,
                            scores[pixels]))
    runs = [(row, sampling, r) for r in range(args.repeats) for row in rows for sampling in CLIPS]
    for row, sampling, r in tqdm(runs, desc="CPU per clip", unit="run"):  # interleaved: load spikes hit all rows
        row.cpu_ms[sampling].append(cpu_ms_per_clip(shardsets[row.content, row.encoding], row.decoder, sampling,
                                                    args.clips, seed=r))
    results = {"date": time.strftime("%Y-%m-%d %H:%M"),
               "machine": f"{psutil.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end",
               "videos_per_content": args.videos, "seconds": args.seconds, "clips": args.clips,
               "repeats": args.repeats, "baseline_decoder": baseline_decoder(),
               "rows": [asdict(row) for row in rows]}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    command = "PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_encoding.py " + shlex.join(argv or sys.argv[1:])
    print(write_report(results, args.out, command.strip()))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def ratio_range(numerator: dict, denominator: dict, sampling: str = "uniform") -> str:
    """numerator / denominator CPU per clip, taken within each repetition (the machine's load moves the CPU
    clock between repetitions, not within one): median and range over the repetitions."""
    ratios = np.array(numerator["cpu_ms"][sampling]) / np.array(denominator["cpu_ms"][sampling])
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"{np.median(ratios):.2f}x ({ratios.min():.2f}-{ratios.max():.2f})"


def ms_range(row: dict, sampling: str) -> str:
    values = np.array(row["cpu_ms"][sampling])
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{np.median(values):.1f} ({values.min():.1f}-{values.max():.1f})"


def write_report(results: dict, out: Path, command: str) -> str:
    from actionrec.logging import headless_pyplot

    rows = results["rows"]
    contents = list(dict.fromkeys(r["content"] for r in rows))

    def find(content: str, settings: EncodeSettings, decoder: str) -> dict | None:
        return next((r for r in rows if r["content"] == content and r["settings"] == asdict(settings)
                     and r["decoder"] == decoder), None)

    lines = [f"Measured {results['date']} on {results['machine']}; {results['videos_per_content']} videos per content "
             f"type, {results['seconds']:g} s 456x256 30 fps; marginal CPU per 8 x 224² clip, {results['clips']} "
             f"clips per cell, {results['repeats']} interleaved repetitions: median (range). Ratios against v1's "
             f"default encoding with v1's default decoder ({results['baseline_decoder']}) on the same content, "
             f"taken within each repetition.",
             f"Command: `{command}`", "",
             "| content | encoding | decoder | CPU ms/clip TSN | dense | TSN cost vs v1 | bytes/video | bytes vs v1 "
             "| PSNR | ΔPSNR |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = find(r["content"], OLD, results["baseline_decoder"])
        lines.append(f"| {r['content']} | {r['encoding']} | {r['decoder']} | {ms_range(r, 'uniform')} "
                     f"| {ms_range(r, 'dense')} | {ratio_range(r, base)} | {r['bytes_per_video'] / 1e6:.2f} MB "
                     f"| {r['bytes_per_video'] / base['bytes_per_video']:.2f} | {r['psnr']:.2f} "
                     f"| {r['psnr'] - base['psnr']:+.2f} |")
    # The v1 -> v2 gain split into its two causes, each with the other held fixed (x = times less CPU per clip).
    split = ["", "The split (TSN clips; times less CPU per clip, median (range) over the repetitions):", "",
             "| content | v1 -> v2 (v1 pack + torchcodec -> v2 pack + pyav) | encoding, read by torchcodec "
             "| encoding, read by pyav | decoder, on v1 packing | decoder, on v2 packing |",
             "|---|---|---|---|---|---|"]
    for content in contents:
        cells = {(pack_, dec): find(content, pack_, dec) for pack_ in (OLD, NEW) for dec in ("torchcodec", "pyav")}
        if any(cell is None for cell in cells.values()):
            continue  # torchcodec did not load, or --only left out a cell: no split
        v1t, v1p, v2t, v2p = cells[OLD, "torchcodec"], cells[OLD, "pyav"], cells[NEW, "torchcodec"], cells[NEW, "pyav"]
        split.append(f"| {content} | {ratio_range(v1t, v2p)} | {ratio_range(v1t, v2t)} | {ratio_range(v1p, v2p)} "
                     f"| {ratio_range(v1t, v1p)} | {ratio_range(v2t, v2p)} |")
    if len(split) > 5:
        lines += split
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")

    plt = headless_pyplot()
    figure, axis = plt.subplots(figsize=(9, 5.5))
    markers = {"pyav": "s", "torchcodec": "^", "pyav+slf": "D", "pyav+2t": "v"}
    for content, colour in zip(contents, ("tab:blue", "tab:orange", "tab:green")):
        for decoder, marker in markers.items():
            chosen = [r for r in rows if r["decoder"] == decoder and r["content"] == content]
            if chosen:
                axis.scatter([r["bytes_per_video"] / 1e6 for r in chosen],
                             [np.median(r["cpu_ms"]["uniform"]) for r in chosen], marker=marker, color=colour,
                             label=f"{content}, {decoder}")
        base = find(content, OLD, results["baseline_decoder"])
        axis.axhline(np.median(base["cpu_ms"]["uniform"]) / 3, color=colour, linestyle=":", linewidth=0.8)
    for r in rows:
        if r["decoder"] == "pyav":
            axis.annotate(r["encoding"], (r["bytes_per_video"] / 1e6, np.median(r["cpu_ms"]["uniform"])),
                          fontsize=6, xytext=(3, 2), textcoords="offset points")
    axis.set_xlabel("bytes per 10 s video (MB)")
    axis.set_ylabel("CPU ms per 8x224² TSN clip (lower is better; dotted: 1/3 of v1's)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "cost_vs_bytes.png", dpi=120)
    return table


if __name__ == "__main__":
    sys.exit(main())
