"""Loader throughput and memory, measured in one run against the ffmpeg CLI limit and a naive loader.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_loader.py --videos 24

Builds 256p-short-side shards with the real packer (mp4 and jpg) from synthetic camera-like videos, then
measures clips/s for 8x224^2 clips (TSN-uniform sampling) with 1 and 2 workers:
  - the actionrec loader (PyAV and torchcodec backends, mp4 and jpg shards),
  - (a) the ffmpeg CLI decoding the same frames, one thread per process (the decoder's limit),
  - (b) a naive map-style DataLoader decoding each whole video file with PyAV (SlowFast/TimeSformer style);
peak memory (PSS of the loader's process tree) over N and 10N videos; and a profile of where the loader's
time goes. Writes benchmarks/out/loader/{results.json,table.md,clips_per_s.png}.

With --clips-per-video 1,2,4 it measures only repeated augmentation instead: CPU ms per training clip when
each decoded video gives K clips (data.clips_per_video), TSN-uniform and dense, 1 worker, against K = 1 in
the same run. Writes benchmarks/out/loader/clips_per_video.{json,md}.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import psutil
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # actionrec, and tests/ for its shard helpers

from actionrec.data import ClipSpec, ShardSet, TrainAugment, build_train_loader, train_frame_indices  # noqa: E402
from actionrec.data.decode import resolve_decoder, torchcodec_load_error  # noqa: E402
from actionrec.data.transforms import train_transform  # noqa: E402
from tests.data_shard_fixtures import replicate_shards  # noqa: E402  (the loader tests' memory test uses it too)

CLIP = ClipSpec(num_frames=8, sampling="uniform", size=224)
BATCH = 8


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--videos", type=int, default=24, help="N: videos in the throughput set (10N for memory)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each synthetic video")
    parser.add_argument("--memory-videos", type=int, default=64,
                        help="N for the memory test (N and 10N videos, made by repeating the packed samples)")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate of the packed videos")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to measure")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved repetitions per measurement; the best is kept (the machine is shared)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/loader"), help="results folder")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for videos/shards (default: temp)")
    parser.add_argument("--clips-per-video", default="",
                        help="comma-separated K values: measure only CPU per clip with K clips per decoded video")
    args = parser.parse_args(argv)
    try:
        args.worker_counts = [int(w) for w in args.workers.split(",")]
        args.clip_counts = [int(k) for k in args.clips_per_video.split(",")] if args.clips_per_video else []
    except ValueError:
        parser.error(f"--workers and --clips-per-video must be comma-separated integers, got {args.workers!r}, "
                     f"{args.clips_per_video!r}")
    if any(k < 1 for k in args.clip_counts):
        parser.error(f"every --clips-per-video value must be >= 1, got {args.clips_per_video!r}")
    if args.videos < 2 or args.memory_videos < BATCH or args.seconds <= 0 or args.repeats < 1 \
            or any(w < 1 for w in args.worker_counts):
        parser.error(f"--videos must be >= 2, --memory-videos >= {BATCH}, --seconds > 0, --repeats >= 1 and "
                     "every worker count >= 1")
    if shutil.which("ffmpeg") is None:
        parser.error("the ffmpeg CLI is needed for the limit measurement: apt-get install ffmpeg")
    return args


# -- data ---------------------------------------------------------------------------------------------------


def synthetic_camera_video(path: Path, seconds: float, fps: float, seed: int, width=456, height=256) -> None:
    """A panning textured scene with moving objects and sensor noise: compresses and decodes like real
    footage (flat or pure-noise frames would flatter or punish the decoder)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((height // 16 + 2, width // 8 + 40, 3))
    background = torch.nn.functional.interpolate(
        torch.from_numpy(coarse).permute(2, 0, 1)[None].float(), scale_factor=16, mode="bicubic"
    )[0].permute(1, 2, 0).numpy()
    background = (np.clip(background, 0, 1) * 200 + 20).astype(np.float32)
    objects = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-4, 4), rng.uniform(-2, 2),
                rng.uniform(15, 40), rng.uniform(0, 255, 3)) for _ in range(4)]
    ys, xs = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for i in range(int(seconds * fps)):
            pan = int(i * 1.5) % (background.shape[1] - width)
            frame = background[:height, pan : pan + width].copy()
            for x0, y0, vx, vy, r, colour in objects:
                cx, cy = (x0 + vx * i) % width, (y0 + vy * i) % height
                frame[(xs - cx) ** 2 + (ys - cy) ** 2 < r * r] = colour
            frame += rng.normal(0, 3, frame.shape).astype(np.float32)
            image = np.clip(frame, 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_sources(folder: Path, count: int, seconds: float, fps: float) -> None:
    classes = ["juggling", "surfing", "typing", "waving"]
    for i in tqdm(range(count), desc="synthetic videos", unit="video"):
        target = folder / classes[i % len(classes)] / f"video_{i:04d}.mp4"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            synthetic_camera_video(target, seconds, fps, seed=i)


def pack(sources: Path, out: Path, fmt: str, fps: float) -> ShardSet:
    from actionrec.shards import EncodeSettings, PackOptions, pack_videos

    if not (out / "dataset.json").exists():
        options = PackOptions(encode=EncodeSettings(format=fmt, short_side=256, fps=fps), val=0.0, test=0.0,
                              workers=2)
        pack_videos(sources, out, options, progress=True, log=lambda line: None)
    return ShardSet.open(out)


def extract_mp4s(shardset: ShardSet, folder: Path) -> tuple[list[tuple[Path, int]], dict[Path, int]]:
    """The packed mp4 of every sample as a file (what the naive loader and ffmpeg read) with its label, and
    each file's frame count (from the sample's json, as the loader reads it)."""
    folder.mkdir(parents=True, exist_ok=True)
    files, num_frames = [], {}
    for url in shardset.urls("train"):
        for sample in wds.WebDataset(url, shardshuffle=False):
            path = folder / f"{sample['__key__'].replace('/', '_')}.mp4"
            path.write_bytes(sample["mp4"])
            files.append((path, int(sample["cls"])))
            num_frames[path] = json.loads(sample["json"])["num_frames"]
    return files, num_frames


# -- measurements -------------------------------------------------------------------------------------------


@dataclass
class Throughput:
    clips_per_s: float  # wall clock, steady state (after the first batch)
    cpu_ms_per_clip: float  # CPU time of the main process + its workers over the whole pass, per clip


def _cpu_seconds() -> float:
    """CPU seconds of this process plus its finished children (the DataLoader workers once joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _measure(batches: Iterator[dict], size_of) -> Throughput:
    cpu_start = _cpu_seconds()
    first = size_of(next(batches))  # worker start-up and shuffle-buffer fill are not throughput
    start = time.perf_counter()
    count = sum(size_of(batch) for batch in batches)
    wall = time.perf_counter() - start
    return Throughput(count / wall, 1000 * (_cpu_seconds() - cpu_start) / (count + first))


def loader_throughput(workers: int, shardset: ShardSet, batches: int, decoder: str, clip: ClipSpec = CLIP,
                      clips_per_video: int = 1) -> Throughput:
    loader = build_train_loader(shardset, clip=clip, batch_size=BATCH, num_workers=workers, batches_per_pass=batches,
                                seed=0, rank=0, world_size=1, decoder=decoder, augment=TrainAugment(),
                                clips_per_video=clips_per_video)
    return _measure(iter(loader), lambda batch: len(batch["key"]))


class NaiveVideoDataset(Dataset):
    """The common map-style pattern: open the file, decode every frame, then pick the clip's frames."""

    def __init__(self, files: list[tuple[Path, int]]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path, label = self.files[index]
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1  # same one-thread-per-worker budget as the loader
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rng = np.random.default_rng(index)
        indices = train_frame_indices(CLIP, len(frames), rng)
        clip = torch.from_numpy(np.stack([frames[i] for i in indices])).permute(0, 3, 1, 2)
        return {"video": train_transform(clip, CLIP, TrainAugment(), rng).permute(1, 0, 2, 3), "label": label}


def naive_throughput(workers: int, files: list[tuple[Path, int]], clips: int) -> Throughput:
    repeated = (files * (clips // len(files) + 1))[:clips]
    loader = DataLoader(NaiveVideoDataset(repeated), batch_size=BATCH, num_workers=workers, shuffle=True)
    return _measure(iter(loader), lambda batch: len(batch["label"]))


def ffmpeg_decode(path: Path, indices: list[int], fps: float) -> tuple[float, float]:
    """ffmpeg's own (wall, CPU) seconds from -benchmark, process start-up and input probing excluded, for
    the clip's frames: the cheaper of one input seek per frame (keyframe seek + decode up to the frame) and
    one decoding pass with a select filter."""
    seeks, maps = [], []
    for k, index in enumerate(indices):
        seeks += ["-threads", "1", "-ss", f"{index / fps:.6f}", "-i", str(path)]
        maps += ["-map", f"{k}:v", "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "rgb24", "-y", "/dev/null"]
    select = "+".join(f"eq(n\\,{i})" for i in sorted(set(indices)))
    one_pass = ["-threads", "1", "-i", str(path), "-vf", f"select={select}", "-fps_mode", "passthrough",
                "-frames:v", str(len(set(indices))), "-f", "rawvideo", "-pix_fmt", "rgb24", "-y", "/dev/null"]
    results = []
    for command in (seeks + maps, one_pass):
        run = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-benchmark", "-filter_threads", "1", *command],
                             capture_output=True, text=True, check=True)
        line = [ln for ln in run.stderr.splitlines() if ln.startswith("bench:") and "rtime=" in ln][-1]
        fields = dict(item.split("=") for item in line.removeprefix("bench:").split())
        wall = float(fields["rtime"].rstrip("s"))
        results.append((wall, float(fields["utime"].rstrip("s")) + float(fields["stime"].rstrip("s"))))
    return min(results)


def ffmpeg_throughput(workers: int, files: list[tuple[Path, int]], fps: float, num_frames: dict[Path, int]) -> Throughput:
    jobs = [(path, train_frame_indices(CLIP, num_frames[path], np.random.default_rng(i)).tolist())
            for i, (path, _) in enumerate(files)]
    streams = [jobs[w::workers] for w in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        per_stream = list(pool.map(lambda stream: [ffmpeg_decode(p, ix, fps) for p, ix in stream], streams))
    busiest = max(sum(wall for wall, _ in stream) for stream in per_stream)
    cpu = sum(cpu for stream in per_stream for _, cpu in stream)
    return Throughput(len(jobs) / busiest, 1000 * cpu / len(jobs))


def peak_pss_mib(source: Path, workers: int, batches: int) -> float:
    """Peak proportional set size of the loader process and its workers over one pass (polled every 50 ms)."""
    script = (
        "import sys\nfrom actionrec.data import ClipSpec, build_train_loader\n"
        f"loader = build_train_loader(sys.argv[1], clip=ClipSpec(num_frames=8, size=224), batch_size={BATCH}, "
        f"num_workers={workers}, batches_per_pass={batches}, rank=0, world_size=1)\n"
        "for batch in loader:\n    pass\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script, str(source)],
                               env=dict(os.environ, PYTHONPATH=str(Path.cwd())))
    root, peak = psutil.Process(process.pid), 0.0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_full_info().pss for p in tree) / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.05)
    if process.returncode != 0:
        raise RuntimeError(f"memory run failed with exit code {process.returncode}")
    return peak


PROFILE_PHASES = [  # (label, substrings of "file:function" whose own time belongs to the phase)
    ("H.264 decode (libavcodec, PyAV)", ["'decode' of 'av.codec.context.CodecContext'"]),
    ("YUV->RGB conversion (swscale)", ["'to_ndarray' of 'av.video.frame.VideoFrame'"]),
    ("mp4 open + demux (PyAV)", ["av.container.core.open", "'demux' of", "av/container", "av/packet"]),
    ("crop + resize (uint8, torch)", ["interpolate", "resize", "_upsample", "crop"]),
    ("tar read + shuffle (webdataset)", ["webdataset", "tarfile", "gopen", "'read' of '_io"]),
    ("collate (torch.stack)", ["stack"]),
]


def profile_loader(shardset: ShardSet, decoder: str, batches: int) -> list[tuple[str, float]]:
    """Where one worker's time goes: cProfile of the loader run in-process, own time grouped by phase."""
    loader = build_train_loader(shardset, clip=CLIP, batch_size=BATCH, num_workers=0, batches_per_pass=batches,
                                seed=1, rank=0, world_size=1, decoder=decoder)
    profiler = cProfile.Profile(time.process_time)  # CPU time: other jobs on the machine do not count
    start = time.process_time()
    profiler.enable()
    for _ in loader:
        pass
    profiler.disable()
    total = time.process_time() - start
    shares = dict.fromkeys([label for label, _ in PROFILE_PHASES], 0.0)
    for (filename, _, function), (_, _, own, _, _) in pstats.Stats(profiler).stats.items():
        name = f"{filename}:{function}"
        for label, needles in PROFILE_PHASES:
            if any(needle in name for needle in needles):
                shares[label] += own
                break
    rows = [(label, seconds / total) for label, seconds in shares.items()]
    rows.append(("Python glue, sampling, other", 1.0 - sum(share for _, share in rows)))
    top = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: -item[1][2])[:15]
    raw = [(f"{filename}:{function}", own / total) for (filename, _, function), (_, _, own, _, _) in top]
    return rows, raw


def shard_bytes_per_video(folder: Path, videos: int) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.tar")) / videos


def write_report(results: dict, out: Path, command: str) -> str:
    from actionrec.logging import headless_pyplot

    plt = headless_pyplot()

    workers = results["workers"]
    rows = [("ffmpeg CLI, same frames (limit)", "ffmpeg"), ("actionrec loader, mp4, PyAV", "loader_pyav"),
            ("actionrec loader, mp4, torchcodec", "loader_torchcodec"), ("actionrec loader, jpg shards", "loader_jpg"),
            ("naive map-style, whole-video PyAV decode", "naive")]
    rows = [(label, key) for label, key in rows if key in results["clips_per_s"]]
    best = results["default_decoder_key"]
    clips, cpu = results["clips_per_s"], results["cpu_ms_per_clip"]
    lines = [f"Measured {results['date']} on {results['machine']}; {results['videos']} videos of "
             f"{results['seconds']:g} s at {results['fps']:g} fps, 456x256; best of {results['repeats']} interleaved runs.",
             f"Command: `{command}`", "",
             "| 8x224² clips, TSN-uniform | " + " | ".join(f"clips/s, {w} worker{'s' * (w > 1)}" for w in workers)
             + " | CPU ms per clip |",
             "|---|" + "---|" * (len(workers) + 1)]
    for label, key in rows:
        lines.append(f"| {label} | " + " | ".join(f"{clips[key][str(w)]:.1f}" for w in workers)
                     + f" | {min(cpu[key].values()):.0f} |")
    for name, base in (("loader / ffmpeg limit", "ffmpeg"), ("loader / naive", "naive")):
        ratios = [clips[best][str(w)] / clips[base][str(w)] for w in workers]
        cpu_ratio = min(cpu[base].values()) / min(cpu[best].values())
        lines.append(f"| **{name}** ({best.split('_')[1]}) | " + " | ".join(f"**{r:.2f}x**" for r in ratios)
                     + f" | **{cpu_ratio:.2f}x** |")
    memory = results["memory"]
    lines += ["", "| peak memory (PSS, loader + 2 workers) | MiB |", "|---|---|",
              f"| N = {memory['n']} videos | {memory['pss_n']:.0f} |",
              f"| 10N = {memory['n'] * 10} videos | {memory['pss_10n']:.0f} |",
              f"| **growth N -> 10N** | **{100 * (memory['pss_10n'] / memory['pss_n'] - 1):+.1f} %** |",
              "", f"| shard format | bytes per {results['seconds']:g} s video |", "|---|---|"]
    for fmt, size in results["bytes_per_video"].items():
        lines.append(f"| {fmt} | {size / 2**20:.2f} MiB |")
    lines += ["", "| where a worker's CPU time goes (PyAV backend, cProfile) | share |", "|---|---|"]
    lines += [f"| {label} | {100 * share:.0f} % |" for label, share in results["profile"]]
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")

    figure, axis = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(workers)
    for k, w in enumerate(workers):
        values = [results["clips_per_s"][key][str(w)] for _, key in rows]
        axis.barh([i + k * width for i in range(len(rows))], values, height=width, label=f"{w} worker(s)")
    axis.set_yticks([i + width * (len(workers) - 1) / 2 for i in range(len(rows))], [label for label, _ in rows])
    axis.invert_yaxis()
    axis.set_xlabel("clips/s (8 x 224², higher is better)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "clips_per_s.png", dpi=120)
    return table


def clips_per_video_report(args, mp4: ShardSet, command: str) -> str:
    """CPU ms per 8x224² training clip with K clips per decoded video, 1 worker, the default decoder."""
    samplings = {"TSN-uniform": CLIP, "dense, stride 4": ClipSpec(num_frames=8, sampling="dense", frame_stride=4, size=224)}
    # The same number of clips for every K (so K = 4 decodes a quarter of the videos); enough of them that
    # the first fill of the shuffle buffer (counted in the CPU time) weighs little.
    batches = max(24, 4 * args.videos // BATCH)
    cpu = {name: {k: float("inf") for k in args.clip_counts} for name in samplings}
    clips = {name: {k: 0.0 for k in args.clip_counts} for name in samplings}
    runs = [(name, k) for _ in range(args.repeats) for name in samplings for k in args.clip_counts]
    for name, k in tqdm(runs, desc="clips per video", unit="run"):  # interleaved, best of the repeats
        result = loader_throughput(1, mp4, batches, "auto", clip=samplings[name], clips_per_video=k)
        cpu[name][k] = min(cpu[name][k], result.cpu_ms_per_clip)
        clips[name][k] = max(clips[name][k], result.clips_per_s)
    decoder = resolve_decoder("auto")  # what "auto" decoded with
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "videos": args.videos, "seconds": args.seconds,
               "fps": args.fps, "repeats": args.repeats, "decoder": decoder, "clips_per_batch": BATCH,
               "batches": batches, "cpu_ms_per_clip": cpu, "clips_per_s": clips}
    (args.out / "clips_per_video.json").write_text(json.dumps(results, indent=1))
    lines = [f"Measured {results['date']}; {args.videos} videos of {args.seconds:g} s at {args.fps:g} fps, 456x256, "
             f"packed with the default settings; 1 worker, {decoder}; {batches} batches of {BATCH} clips per run, "
             f"best of {args.repeats} interleaved runs.", f"Command: `{command}`", "",
             "| 8x224² clips | " + " | ".join(f"K = {k}" for k in args.clip_counts) + " |",
             "|---|" + "---|" * len(args.clip_counts)]
    for name in samplings:
        base = cpu[name][args.clip_counts[0]]
        lines.append(f"| {name}: CPU ms per clip | " + " | ".join(
            f"{cpu[name][k]:.0f} ({base / cpu[name][k]:.2f}x)" for k in args.clip_counts) + " |")
        lines.append(f"| {name}: clips/s, 1 worker | " + " | ".join(f"{clips[name][k]:.1f}" for k in args.clip_counts)
                     + " |")
    table = "\n".join(lines)
    (args.out / "clips_per_video.md").write_text(table + "\n")
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_loader_"))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    make_sources(work / "sources", args.videos, args.seconds, args.fps)
    mp4 = pack(work / "sources", work / "mp4", "mp4", args.fps)
    command = "PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_loader.py " + " ".join(argv or sys.argv[1:])
    if args.clip_counts:
        print(clips_per_video_report(args, mp4, command.strip()))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    jpg = pack(work / "sources", work / "jpg", "jpg", args.fps)
    files, num_frames = extract_mp4s(mp4, work / "files")
    batches = max(8, 4 * args.videos // BATCH)
    decoders = ["pyav"] + (["torchcodec"] if torchcodec_load_error() is None else [])
    measures = {"ffmpeg": functools.partial(ffmpeg_throughput, files=files, fps=args.fps, num_frames=num_frames),
                **{f"loader_{d}": functools.partial(loader_throughput, shardset=mp4, batches=batches, decoder=d)
                   for d in decoders},
                "loader_jpg": functools.partial(loader_throughput, shardset=jpg, batches=batches, decoder="pyav"),
                "naive": functools.partial(naive_throughput, files=files, clips=6 * BATCH)}
    clips = {key: {str(w): 0.0 for w in args.worker_counts} for key in measures}
    cpu_ms = {key: {str(w): float("inf") for w in args.worker_counts} for key in measures}
    runs = [(key, w) for _ in range(args.repeats) for w in args.worker_counts for key in measures]
    for key, w in tqdm(runs, desc="throughput", unit="run"):  # interleaved: load spikes hit every row alike
        result = measures[key](w)
        clips[key][str(w)] = max(clips[key][str(w)], result.clips_per_s)
        cpu_ms[key][str(w)] = min(cpu_ms[key][str(w)], result.cpu_ms_per_clip)
    copies = -(-args.memory_videos // args.videos)
    n_set = replicate_shards(work / "mp4", work / "mem_n", copies)
    n = copies * args.videos
    memory = {"n": n, "pss_n": peak_pss_mib(n_set, 2, n // BATCH),
              "pss_10n": peak_pss_mib(replicate_shards(work / "mp4", work / "mem_10n", 10 * copies), 2, 10 * n // BATCH)}
    # The loader's default decoder, "auto": PyAV (actionrec.data.decode.resolve_decoder).
    default_key = f"loader_{resolve_decoder('auto')}"
    results = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB, load {os.getloadavg()[0]:.1f}",
        "videos": args.videos, "seconds": args.seconds, "fps": args.fps, "workers": args.worker_counts,
        "repeats": args.repeats,
        "clips_per_s": clips, "cpu_ms_per_clip": cpu_ms, "memory": memory, "default_decoder_key": default_key,
        "bytes_per_video": {"mp4 (H.264 crf 24, GOP 4, fastdecode, no B-frames: format v2's default)":
                            shard_bytes_per_video(work / "mp4", args.videos),
                            "jpg (quality 90)": shard_bytes_per_video(work / "jpg", args.videos)},
    }
    results["profile"], results["profile_top_functions"] = profile_loader(mp4, "pyav", batches)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(write_report(results, args.out, command.strip()))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
