"""pack_videos: a source tree of videos -> split.csv + WebDataset shards + dataset.json + plot.

Labelled layouts give samples with a `cls` field; the `unlabelled` layout (videos without classes, for
masked pre-training) gives samples without one and a manifest with `"labelled": false` and no classes.

Flow: list the sources (layouts), fix the split (split.csv, written once), look at what earlier runs
already published (resume), re-encode the rest in worker processes with a bounded number in flight, write
them to byte-sized shards per split, then write the statistics and the manifest. A source that cannot be
packed is recorded with its reason and the pack goes on.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from actionrec.atomic import write_atomic
from actionrec.logging import progress_bar
from actionrec.shards.encode import EncodedVideo, EncodeSettings, UnpackableSource, encode_source
from actionrec.shards.layouts import SPLITS, UNLABELLED_GROUP, LayoutError, Source, list_sources, sample_key
from actionrec.shards.split import check_split_fractions, resolve_split
from actionrec.shards.stats import frames_per_category, per_class_counts, plot_frames_per_category
from actionrec.shards.writer import (SHARD_NAME, PackedSample, SplitShardWriter, read_published_shards,
                                     remove_partial_shards)

# No tqdm monitor thread: the pack forks worker processes (at start and after a worker crash), and forking a
# process that has other threads running can deadlock the child.
tqdm.monitor_interval = 0

# v2: --fps is a cap (fps_mode), tune and bframes recorded, new default encoding. actionrec.data.shardset's
# READABLE_FORMAT_VERSIONS lists what the loader reads (not imported here: it would pull torch into the packer).
FORMAT_VERSION = 2
# Encoding settings that format v1 did not record, with the values v1 used: a v1 pack in progress resumes
# when run with the same explicit settings.
V1_ENCODING = {"fps_mode": "exact", "tune": "none", "bframes": None}
STATE_FILE = ".pack-state.json"  # settings + classes of the pack in progress in OUT, checked on resume
MANIFEST, PLOT = "dataset.json", "frames_per_category.png"


class PackError(RuntimeError):
    """The pack cannot start or cannot produce anything; the message is the one line to show the user."""


@dataclass(frozen=True)
class PackOptions:
    encode: EncodeSettings = field(default_factory=EncodeSettings)
    layout: str | None = None  # None: auto-detect
    fold: int = 1  # UCF101 official split number
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    split_csv: str | None = None  # a user's own split (source,label,split)
    shard_bytes: int = 256 * 1024 * 1024
    workers: int = 1  # worker processes; 0 encodes in this process (debugging)
    train_per_class: int = 0  # pack only this many train videos per class (seeded choice); 0 = all
    # A pack in OUT made with other encoding settings or classes: False stops with one line (the safe
    # default for a user's data); True removes its shards and packs again, saying why in one line (for a
    # folder a script owns, such as `make demo`'s, whose settings change with the packer's defaults).
    repack: bool = False

    def __post_init__(self):
        check_split_fractions(self.val, self.test)  # before any work, not when the split is first needed
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.train_per_class < 0:
            raise ValueError(f"--train-per-class must be >= 0, got {self.train_per_class}")
        if self.shard_bytes < 1024:
            raise ValueError(f"--shard-size must be at least 1 KB, got {self.shard_bytes} bytes")
        if self.split_csv is not None and not os.path.isfile(self.split_csv):
            raise ValueError(f"--split-csv {self.split_csv} is not a file")


@dataclass
class Skipped:
    source: str
    reason: str


@dataclass
class PackResult:
    out: Path
    layout: str
    classes: list[str]
    packed: dict[str, int]  # per split, including samples from earlier (resumed) runs
    left_out: int  # train videos not packed because of --train-per-class
    newly_packed: int
    resumed: int  # samples found already published
    skipped: list[Skipped]
    shards: dict[str, list[str]]

    @property
    def total_packed(self) -> int:
        return sum(self.packed.values())


def pack_videos(src: str | os.PathLike, out: str | os.PathLike, options: PackOptions = PackOptions(),
                progress: bool = True, log=print) -> PackResult:
    src, out = Path(src), Path(out)
    try:
        listing = list_sources(src, options.layout, options.fold)
    except LayoutError as err:
        raise PackError(str(err)) from None
    labelled = listing.layout != "unlabelled"
    if options.train_per_class and not labelled:
        raise PackError("--train-per-class limits labelled videos per class; an unlabelled set has no classes")
    if out.resolve() == src.resolve() or (src.is_dir() and src.resolve() in out.resolve().parents
                                          and listing.layout in ("folder", "frames", "unlabelled")):
        raise PackError(f"--out {out} is inside SRC {src}: its shards would be read as videos; pick another --out")
    out.mkdir(parents=True, exist_ok=True)
    classes = _check_state(out, src, listing.layout, listing.classes, options, log)
    class_index = {name: i for i, name in enumerate(classes)}

    try:
        split_of = resolve_split(listing.sources, out / "split.csv", options.split_csv,
                                 options.val, options.test, options.seed)
    except (LayoutError, ValueError) as err:
        raise PackError(str(err)) from None
    sources, left_out = _limit_train_per_class(listing.sources, split_of, options.train_per_class, options.seed)
    removed = remove_partial_shards(out)
    if removed:
        log(f"removed {len(removed)} incomplete shard(s) of an interrupted run; their videos are packed again")
    published, next_index = read_published_shards(out)
    done = {s.key for s in published}
    # Shards hold samples in a seeded random order, not grouped by class: a streaming reader's shuffle
    # buffer only mixes neighbours, and a class-sorted shard would give it batches of one class.
    todo = sorted((s for s in sources if sample_key(s.relpath) not in done),
                  key=lambda s: (SPLITS.index(split_of[s.relpath]), _shuffled_rank(options.seed, s.relpath)))
    if published:
        log(f"resuming: {len(published)} videos already in {len({s.shard for s in published})} shard(s), "
            f"{len(todo)} to go")

    writers = {split: SplitShardWriter(out, split, options.shard_bytes, next_index[split]) for split in SPLITS}
    skipped = [Skipped(u.relpath, u.reason) for u in listing.unusable]
    newly_packed = 0
    executor = _start_pool(options.workers) if todo else None
    bar = progress_bar(total=len(todo), unit="video", desc="packing", enabled=progress)
    try:
        for source, result in _encode_all(todo, options.encode, options.workers, executor):
            if isinstance(result, str):
                skipped.append(Skipped(source.relpath, result))
            else:
                split = split_of[source.relpath]
                key = sample_key(source.relpath)
                meta = _sample_meta(source, result, options.encode.format)
                label = {"cls": str(class_index[source.label]).encode("ascii")} if labelled else {}
                writers[split].write(key, {**result.fields, **label, "json": json.dumps(meta).encode("utf-8")})
                newly_packed += 1
            bar.update(1)
            bar.set_postfix(packed=newly_packed, skipped=len(skipped), refresh=False)
    except BaseException:
        # Ctrl-C or an error mid-write: an open shard may end in half a sample, so it stays a temp file
        # (removed and redone by the next run) instead of being published.
        for writer in writers.values():
            writer.abandon()
        raise
    finally:
        bar.close()
    for writer in writers.values():
        writer.close()

    samples, _ = read_published_shards(out)
    shards = {split: sorted({s.shard for s in samples if s.split == split}) for split in SPLITS}
    _write_manifest(out, src, listing.layout, classes, samples, shards, skipped, options)
    packed = Counter(s.split for s in samples)
    return PackResult(out, listing.layout, classes, {split: packed[split] for split in SPLITS}, left_out,
                      newly_packed, len(published), skipped, shards)


def _limit_train_per_class(sources: list[Source], split_of: dict[str, str], per_class: int,
                           seed: int) -> tuple[list[Source], int]:
    """The few-label set: the first `per_class` train videos of each class in a seeded order (the same
    videos on every run), and every val and test video. Returns (sources to pack, train videos left out)."""
    if not per_class:
        return sources, 0
    kept_train: dict[str, list[Source]] = {}
    for source in sorted((s for s in sources if split_of[s.relpath] == "train"),
                         key=lambda s: _shuffled_rank(seed, s.relpath)):
        group = kept_train.setdefault(source.label, [])
        if len(group) < per_class:
            group.append(source)
    keep = {s.relpath for group in kept_train.values() for s in group}
    chosen = [s for s in sources if split_of[s.relpath] != "train" or s.relpath in keep]
    return chosen, len(sources) - len(chosen)


def _shuffled_rank(seed: int, relpath: str) -> str:
    return hashlib.sha1(f"{seed}:{relpath}".encode()).hexdigest()


def _sample_meta(source: Source, video: EncodedVideo, fmt: str) -> dict:
    return {"label": source.label or None, "source": source.relpath, "fps": video.fps, "num_frames": video.num_frames,
            "width": video.width, "height": video.height, "duration": round(video.duration, 6), "format": fmt}


def _settings_record(src: Path, layout: str, options: PackOptions) -> dict:
    return {**asdict(options.encode), "seed": options.seed, "val": options.val, "test": options.test,
            "layout": layout, "fold": options.fold if layout == "ucf101" else None,
            "source": str(src.resolve()), "shard_bytes": options.shard_bytes,
            "train_per_class": options.train_per_class}


def _check_state(out: Path, src: Path, layout: str, classes: list[str], options: PackOptions, log) -> list[str]:
    """First run: record settings and classes. Later runs (resume, or more videos): the encoding and the
    class indices must match what the published shards already hold; where they do not, the pack stops, or
    with options.repack starts over."""
    record = _settings_record(src, layout, options)
    state_path = out / STATE_FILE
    if state_path.exists():
        state = json.loads(state_path.read_text())
        before = {**V1_ENCODING, **state["settings"]}
        before.setdefault("train_per_class", 0)  # packs written before the option existed packed every video
        content_keys = [*asdict(options.encode), "layout", "fold", "train_per_class"]
        changed = [f"{k}: {before.get(k)} -> {record[k]}" for k in content_keys if before.get(k) != record[k]]
        new_classes = [name for name in classes if name not in state["classes"]]
        if changed:
            problem = f"{out} was packed with other settings ({'; '.join(changed)})"
            advice = "re-run with the same settings to resume, or use a new --out (or --repack to replace it)"
        elif new_classes:
            problem = f"SRC has classes the shards in {out} do not know ({', '.join(new_classes[:5])})"
            advice = "class indices would change: pack into a new --out (or --repack to replace it)"
        else:
            if any(before.get(k) != record[k] for k in ("seed", "val", "test")):
                log("note: split.csv already exists and is kept; --seed/--val/--test only apply to new videos")
            return state["classes"]
        if not options.repack:
            raise PackError(f"{problem}; {advice}")
        removed = _remove_pack(out)
        log(f"re-packing: {problem}; --repack removed its {removed} shard(s) (split.csv is kept)")
    elif any(out.glob("*-*.tar")) or (out / MANIFEST).exists():
        raise PackError(f"{out} holds shards of a pack without its {STATE_FILE}; use an empty --out")
    _write_json(state_path, {"settings": record, "classes": classes})
    return classes


def _remove_pack(out: Path) -> int:
    """Removes what the packer wrote to OUT except split.csv (a video keeps its split across re-packs);
    returns the number of published shards removed. Only names the packer writes are touched."""
    shards = [path for path in out.iterdir() if SHARD_NAME.match(path.name)]
    for path in shards:
        path.unlink()
    remove_partial_shards(out)
    for name in (MANIFEST, PLOT, STATE_FILE):
        (out / name).unlink(missing_ok=True)
    return len(shards)


def _encode_or_reason(source: Source, settings: EncodeSettings) -> EncodedVideo | str:
    """Runs in a worker: any failure becomes a reason string, so one bad file never stops the pack."""
    try:
        return encode_source(source, settings)
    except UnpackableSource as err:
        return str(err)
    except Exception as err:  # an FFmpeg/PIL error we did not anticipate is still this source's problem
        return f"failed to convert: {type(err).__name__}: {err}"


def _start_pool(workers: int) -> ProcessPoolExecutor | None:
    """Forked worker processes: fork does not re-import the caller's __main__ as spawn/forkserver would (an
    unguarded script calling pack_videos would start over in every worker)."""
    if workers == 0:
        return None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def _encode_all(sources: list[Source], settings: EncodeSettings, workers: int,
                executor: ProcessPoolExecutor | None):
    """Yield (source, EncodedVideo | reason) in input order, with at most 2 videos per worker in flight
    (memory stays bounded whatever the data set size, unlike Pool.imap which queues every result)."""
    if executor is None:
        for source in sources:
            yield source, _encode_or_reason(source, settings)
        return
    pending = iter(sources)
    in_flight: deque[tuple[Source, Future]] = deque()
    try:
        while True:
            while len(in_flight) < 2 * workers:
                source = next(pending, None)
                if source is None:
                    break
                in_flight.append((source, executor.submit(_encode_or_reason, source, settings)))
            if not in_flight:
                return
            source, future = in_flight.popleft()
            try:
                yield source, future.result()
            except BrokenProcessPool:
                # A worker died (a decoder crash takes the whole process down). Redo every video that was
                # in flight alone in a fresh process, so only the culprit is skipped.
                executor.shutdown(cancel_futures=True)
                retry = [source] + [s for s, _ in in_flight]
                in_flight.clear()
                for suspect in retry:
                    yield suspect, _encode_isolated(suspect, settings)
                executor = _start_pool(workers)
    finally:
        executor.shutdown(cancel_futures=True)


def _encode_isolated(source: Source, settings: EncodeSettings) -> EncodedVideo | str:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as single:
        try:
            return single.submit(_encode_or_reason, source, settings).result()
        except BrokenProcessPool:
            return "the decoder crashed on this file (worker process died)"


def _write_manifest(out: Path, src: Path, layout: str, classes: list[str], samples: list[PackedSample],
                    shards: dict[str, list[str]], skipped: list[Skipped], options: PackOptions) -> None:
    labelled = layout != "unlabelled"
    groups = classes if labelled else [UNLABELLED_GROUP]
    counts = per_class_counts(samples, groups)
    frame_stats = frames_per_category(samples, groups)
    plot_frames_per_category(frame_stats, counts, out / PLOT)
    splits = {split: {"shards": shards[split],
                      "num_samples": sum(1 for s in samples if s.split == split),
                      "num_frames": sum(s.meta["num_frames"] for s in samples if s.split == split)}
              for split in SPLITS}
    manifest = {
        "format_version": FORMAT_VERSION,
        "classes": classes,
        # false: videos without classes (masked pre-training only); counts and statistics are then over
        # the one group UNLABELLED_GROUP
        "labelled": labelled,
        "format": options.encode.format,
        "splits": splits,
        "per_class_counts": counts,
        "frames_per_category": frame_stats,
        "pack": _settings_record(src, layout, options),
        "skipped": [asdict(s) for s in sorted(skipped, key=lambda s: s.source)],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(out / MANIFEST, manifest)


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1) + "\n")


def format_summary(result: PackResult) -> str:
    lines = [f"packed {result.total_packed} videos ("
             + ", ".join(f"{split} {result.packed[split]}" for split in SPLITS)
             + f") into {sum(len(v) for v in result.shards.values())} shard(s) in {result.out}"
             + (f"; {result.resumed} were already packed by an earlier run" if result.resumed else "")
             + (f"; {result.left_out} train videos left out by --train-per-class" if result.left_out else "")
             + ("; unlabelled (for masked pre-training: task: pretrain)" if result.layout == "unlabelled" else ""),
             f"skipped {len(result.skipped)}" + (" (listed with reasons in dataset.json 'skipped'):"
                                                  if result.skipped else "")]
    for item in result.skipped[:10]:
        lines.append(f"  {item.source}: {item.reason}")
    if len(result.skipped) > 10:
        lines.append(f"  ... and {len(result.skipped) - 10} more")
    return "\n".join(lines)

