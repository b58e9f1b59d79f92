"""Top-k classes of many videos (a folder, a CSV with a `path` column, or a shard set) into one CSV, on any
number of processes, resumable.

Each process takes the inputs whose position in the list is its rank modulo the world size (so every video is
scored once, and which process owns a video does not depend on what an earlier run finished), appends one row
per video to its own part file `OUT.part-rank<r>` as soon as it is scored, and rank 0 merges the parts into OUT
(sorted by path) when all are done. A re-run first reads OUT and every part left beside it, and skips the
videos they hold: a run killed midway resumes where it stopped, on any number of processes. Videos that cannot
be decoded are reported (one line each), counted, and not written, so a re-run tries them again.
"""

from __future__ import annotations

import csv
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from actionrec.data.decode import CorruptSample, FrameReader, PyAVFrameReader, open_frame_reader
from actionrec.engine.inference import Predictor, predict_reader
from actionrec.engine.long_video import topk_cells, topk_columns


@dataclass(frozen=True)
class VideoInput:
    """One video to score: its name in the output's `path` column and how to open its frames."""

    name: str
    open: Callable[[], FrameReader]


@dataclass
class VideoList:
    """The inputs in a fixed order (the same on every rank); `count` is None when unknown up front."""

    items: Callable[[], Iterator[VideoInput]]
    count: int | None
    what: str


def _file_input(name: str, path: Path) -> VideoInput:
    return VideoInput(name, lambda: PyAVFrameReader(path.read_bytes()))


def video_list(source: Path, split: str = "test") -> VideoList:
    """A folder of videos (recursive, by extension), a .csv with a `path` column (relative paths are relative
    to the CSV's folder), or a shard set written by shards/pack.py (the samples of `split`).
    Raises ValueError with what to do when `source` is none of these."""
    from actionrec.shards.layouts import VIDEO_EXTENSIONS

    if source.is_file() and source.suffix.lower() == ".csv":
        with open(source, newline="") as handle:
            reader = csv.DictReader(handle)
            if "path" not in (reader.fieldnames or []):
                raise ValueError(f"{source} has no `path` column (it has {reader.fieldnames}); add a header line "
                                 "with a column named path")
            names = [row["path"] for row in reader if row["path"]]
        files = [(name, Path(name) if Path(name).is_absolute() else source.parent / name) for name in names]
        return VideoList(lambda: (_file_input(n, p) for n, p in files), len(files), f"{len(files)} videos listed in {source}")
    if source.is_dir() and (source / "dataset.json").is_file():
        from actionrec.data.shardset import ShardSet

        shardset = ShardSet.open(source)
        urls = shardset.urls(split)

        def samples() -> Iterator[VideoInput]:
            import webdataset as wds

            # Every rank reads every sample in shard order and keeps its own (reading is cheap beside scoring);
            # webdataset's node splitting would hand out whole shards, unevenly.
            stream = wds.WebDataset(urls, shardshuffle=False, nodesplitter=lambda src: src,
                                    workersplitter=lambda src: src, empty_check=False)
            for sample in stream:
                fields = {k: v for k, v in sample.items() if not k.startswith("__")}
                yield VideoInput(sample["__key__"], lambda fields=fields: open_frame_reader(fields, "pyav"))

        count = shardset.num_samples(split)
        return VideoList(samples, count, f"the {split} split of shard set {source} ({count} videos)")
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        if not files:
            raise ValueError(f"{source} holds no video files ({', '.join(sorted(VIDEO_EXTENSIONS))})")
        return VideoList(lambda: (_file_input(str(p), p) for p in files), len(files), f"{len(files)} videos in {source}")
    raise ValueError(f"{source} is neither a video file, a folder, a .csv with a path column nor a shard set")


@dataclass
class ManyVideosResult:
    scored: int = 0  # this run, all ranks
    already_done: int = 0  # found in OUT or its parts
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name, reason), all ranks


def _part_path(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.part-rank{rank}")


def _parts(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f"{out.name}.part-rank*"))


def _read_rows(path: Path) -> list[list[str]]:
    """The complete rows of a CSV (a part ends mid-row when its process was killed while writing one)."""
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return [row for row in rows[1:] if len(row) >= 3 and _is_number(row[2])]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _open_part(path: Path, header: list[str]):
    """The part file for appending, cut back to its last complete line (what a killed writer left)."""
    if path.exists():
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep != len(data):
            with open(path, "r+b") as handle:
                handle.truncate(keep)
        handle = open(path, "a", newline="")
        if keep == 0:
            csv.writer(handle).writerow(header)
        return handle
    handle = open(path, "w", newline="")
    csv.writer(handle).writerow(header)
    return handle


def predict_many(videos: VideoList, out: Path, predictor: Predictor, temporal_clips: int, spatial_crops: int,
                 top_k: int, rank: int, world_size: int, progress: Callable | None = None) -> ManyVideosResult:
    """Score this rank's share of `videos` into its part of `out`; then (all ranks) merge into `out` on rank 0.
    Needs torch.distributed initialised when world_size > 1."""
    header = ["path"] + topk_columns(min(top_k, len(predictor.classes)))
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    for path in ([out] if out.exists() else []) + _parts(out):
        done |= {row[0] for row in _read_rows(path)}
    if world_size > 1:
        dist.barrier()  # every rank has read what earlier runs wrote before any rank appends
    scored, skipped, failed = 0, 0, []
    share = (item for position, item in enumerate(videos.items()) if position % world_size == rank)
    total = None if videos.count is None else len(range(rank, videos.count, world_size))
    with _open_part(_part_path(out, rank), header) as handle:
        writer = csv.writer(handle)
        for item in (progress(share, total=total) if progress else share):
            if item.name in done:
                skipped += 1
                continue
            try:
                with item.open() as reader:
                    probs = predict_reader(reader, predictor.spec, predictor.score_clips, temporal_clips,
                                           spatial_crops)
            except (CorruptSample, OSError) as exc:
                failed.append((item.name, str(exc).splitlines()[0] if str(exc) else type(exc).__name__))
                continue
            writer.writerow([item.name] + topk_cells(probs, predictor.classes, top_k))
            handle.flush()  # a killed run keeps every row written so far
            scored += 1
    result = ManyVideosResult(scored, skipped, failed)
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (scored, skipped, failed))  # also: every part is complete
        result = ManyVideosResult(sum(g[0] for g in gathered), sum(g[1] for g in gathered),
                                  [f for g in gathered for f in g[2]])
    if rank == 0:
        _merge(out, header)
    if world_size > 1:
        dist.barrier()
    return result


def _merge(out: Path, header: list[str]) -> None:
    """OUT's rows and every part's, one row per path, sorted by path, written whole then renamed; parts removed."""
    rows: dict[str, list[str]] = {}
    parts = _parts(out)
    for path in ([out] if out.exists() else []) + parts:
        for row in _read_rows(path):
            rows.setdefault(row[0], row)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows[name] for name in sorted(rows))
    os.replace(tmp, out)
    for part in parts:
        part.unlink()


def init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (accelerate launch and torchrun set
    RANK/WORLD_SIZE); a gloo group when there are several processes (it carries only the barrier and the
    summary, so any device works with it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        # Ranks wait for each other only at the start and at the end; their shares may take hours.
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return rank, world_size, local_rank


def device_for(local_rank: int, requested: str) -> str:
    """`requested`, or with 'auto' this process's GPU (its local rank) where there is one, else the CPU."""
    if requested != "auto":
        return requested
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
