"""The loaders: shards in, batches of uint8 clips out, built in DataLoader workers.

    train: the epoch order (epochs.py: every video once per epoch, the same global batches on any world size)
           -> this process's slots of each micro batch -> read each sample by its byte offset (shards/index.py)
           -> decode the needed frames -> per-clip seeded sampling and augmentation -> batches
    eval:  this (rank, worker) slot's shard parts, streamed -> decode -> deterministic views -> batches
    (decode_on="device": the workers stop before decoding and ship bytes, indices and augmentation draws;
     the loader decodes and transforms each batch on the training process's device, see device_decode.py)

The DataLoader is iterated by the caller directly; do not hand it to `accelerator.prepare()` (it would
re-shard an already sharded stream and drop data).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from actionrec.data.assignment import eval_shard_parts
from actionrec.data.decode import CorruptSample, Decoder, DecoderName, open_frame_reader, resolve_decoder
from actionrec.data.device_decode import DecodeOn, DeviceBatchDecoder, check_decode_on, encode_for_device
from actionrec.data.epochs import EpochPlan, MicroBatchLayout, Slot, clip_rng
from actionrec.data.sampling import ClipSpec, eval_frame_indices, train_frame_indices
from actionrec.data.shardset import ShardSet
from actionrec.data.transforms import TrainAugment, draw_train_params, eval_view_params, read_eval_views, train_transform
from actionrec.shards.index import SampleReader, SplitIndex

logger = logging.getLogger(__name__)

# If this many training samples fail in a row, nothing decodable is left (wrong format, unreadable storage)
# and raising beats skipping a whole epoch one sample at a time.
MAX_CONSECUTIVE_FAILURES = 1000


@dataclass(frozen=True)
class LoaderOptions:
    """How a loader cuts, decodes and augments clips: everything but the shard set and the process's place.

    batch_size: clips per process per micro batch (B). accumulation: micro batches per optimizer step (A); the
    global batch, R x A x B clips for R processes, is what fixes the training order (epochs.py).
    clips_per_video (K): clips drawn from each video per epoch, sampled and augmented independently, usually
    from one decode (repeated augmentation; a batch of B clips holds about B / K videos).
    labels=False: labels are not read (label -1), for unlabelled sets (masked pre-training).
    decode_on="device": workers only read and sample; frames are decoded and augmented in the iterating
    process on its device, with the same clips (actionrec/data/device_decode.py).
    temporal_clips x spatial_crops: evaluation views per video.
    """

    clip: ClipSpec = ClipSpec()
    batch_size: int = 8
    num_workers: int = 2
    seed: int = 0
    augment: TrainAugment = TrainAugment()
    decoder: DecoderName | Decoder = "auto"
    decode_on: DecodeOn = "worker"
    clips_per_video: int = 1
    accumulation: int = 1
    labels: bool = True
    temporal_clips: int = 1
    spatial_crops: int = 1
    pin_memory: bool | None = None  # None: pin where CUDA is present
    prefetch_factor: int = 2
    worker_timeout_s: float = 0.0  # a worker silent this long raises "DataLoader timed out" (0 = wait forever)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.accumulation < 1 or self.clips_per_video < 1:
            raise ValueError(f"batch_size, accumulation and clips_per_video must be >= 1, got {self.batch_size}, "
                             f"{self.accumulation}, {self.clips_per_video}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.temporal_clips < 1 or self.spatial_crops not in (1, 3):
            raise ValueError(f"temporal_clips must be >= 1 and spatial_crops 1 or 3, got {self.temporal_clips}, "
                             f"{self.spatial_crops}")
        check_decode_on(self.decode_on)
        self.augment.resolved_range(self.clip.size)

    def replace(self, **changes) -> LoaderOptions:
        """A copy with `changes`; an unknown name raises TypeError naming it."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown loader option(s) {', '.join(unknown)}; LoaderOptions has {', '.join(sorted(known))}")
        return dataclasses.replace(self, **changes)


class ClipStream(IterableDataset):
    """The per-worker part of a loader: one instance is copied into every DataLoader worker.

    Yields whole batches (dicts, see `ClipLoader`) built in the worker. Training: micro batches
    [first_micro, first_micro + num_micro) of this process, worker w of W making those with index = w (mod W)
    counted from first_micro, so the DataLoader's round-robin yields them in order whatever W is.
    Evaluation: every (video, view) of this (rank, worker) slot's shard parts once.
    """

    def __init__(self, urls: list[str], options: LoaderOptions, *, train: bool, rank: int, world_size: int,
                 num_classes: int | None, index: SplitIndex | None = None, plan: EpochPlan | None = None):
        self.urls = urls
        self.options = options
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.num_classes = num_classes
        self.backend = resolve_decoder(options.decoder)
        # Read often below; kept as attributes for brevity.
        self.clip, self.batch_size, self.decode_on, self.labels = options.clip, options.batch_size, options.decode_on, options.labels
        self.temporal_clips, self.spatial_crops = options.temporal_clips, options.spatial_crops
        self.index, self.plan = index, plan
        self.layout = MicroBatchLayout(rank, world_size, options.batch_size, options.accumulation) if train else None
        self.first_micro = 0
        self.num_micro = 0
        self._worker = (0, 1)
        self._skipped = 0
        self._failures_in_a_row = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        self._worker = (info.id, info.num_workers) if info is not None else (0, 1)
        self._skipped = 0
        self._failures_in_a_row = 0
        self._heap = HeapTrimmer()
        return self._train_batches() if self.train else self._eval_batches()

    # -- training: the slots of the epoch order that fall to this process --------------------------------

    def _train_batches(self) -> Iterator[dict]:
        worker, num_workers = self._worker
        reader = SampleReader()
        try:
            for micro_batch in range(self.first_micro + worker, self.first_micro + self.num_micro, num_workers):
                yield self._train_micro_batch(micro_batch, reader)
        finally:
            reader.close()

    def _train_micro_batch(self, micro_batch: int, reader: SampleReader) -> dict:
        global_batch, micro, _ = self.layout.locate(micro_batch)
        epoch, batch_in_epoch = self.plan.split(global_batch)
        weight = self.plan.slot_weight(batch_in_epoch)
        slots = self.layout.slots(self.plan, micro_batch)
        places: dict[int, list[int]] = {}  # video -> its slots in this micro batch (one read and decode each)
        for place, slot in enumerate(slots):
            if not slot.padding:
                places.setdefault(slot.video, []).append(place)
        items: list[dict | None] = [None] * len(slots)
        skipped_clips: list[list] = []
        for video, where in places.items():
            self._heap.tick()
            clips = self._video_clips(reader, epoch, video, [slots[p] for p in where])
            url, _, _, key = self.index.ref(video)
            if isinstance(clips, Exception):
                self._skip({"__key__": key, "__url__": url}, clips, count=any(slots[p].clip == 0 for p in where))
                skipped_clips.extend([key, slots[p].clip] for p in where)
                continue
            self._failures_in_a_row = 0
            for place, item in zip(where, clips):
                items[place] = {**item, "key": key, "view": slots[place].clip, "weight": weight}
        batch = self._collate([item if item is not None else self._padding_item() for item in items])
        batch.update(epoch=epoch, global_batch=global_batch, micro=micro, micro_batch=micro_batch,
                     skipped_clips=skipped_clips)
        return batch

    def _video_clips(self, reader: SampleReader, epoch: int, video: int, slots: list[Slot]) -> list[dict] | Exception:
        """The clips of one video for `slots`, each sampled and augmented by its own generator (the same
        clip whichever process and micro batch computes it), or the exception that made the video corrupt."""
        url, offset, size, key = self.index.ref(video)
        t = self.clip.num_frames
        try:
            sample = reader.read(url, offset, size, key)
            label = self._label(sample)
            rngs = [clip_rng(self.options.seed, epoch, key, slot.clip) for slot in slots]
            with open_frame_reader(sample, self.backend) as frames_of:
                indices = [train_frame_indices(self.clip, frames_of.num_frames, rng) for rng in rngs]
                if self.decode_on == "device":
                    # Bytes and the same draws leave the worker; the training process decodes.
                    encoded = encode_for_device(sample, frames_of, np.concatenate(indices))
                    size_hw = (encoded.height, encoded.width)
                    clips = [{"encoded": encoded, "params": draw_train_params(*size_hw, self.clip, self.options.augment, rng)}
                             for rng in rngs]
                else:
                    # One decode of the union of the clips' frames (readers decode each index once).
                    frames = frames_of.read(np.concatenate(indices))  # (n*T, 3, H, W)
                    clips = [{"video": train_transform(frames[n * t:(n + 1) * t], self.clip, self.options.augment,
                                                       rng).permute(1, 0, 2, 3)}  # (3, T, S, S)
                             for n, rng in enumerate(rngs)]
        except Exception as exc:  # noqa: BLE001 - any failure of one sample is that sample's corruption
            return exc
        return [{**clip, "label": label, "frame_index": torch.from_numpy(idx)} for clip, idx in zip(clips, indices)]

    def _padding_item(self) -> dict:
        """A slot without a clip (past the epoch's last clip, or a corrupt video's): weight 0, no data."""
        t, size = self.clip.num_frames, self.clip.size
        frames = ({"encoded": None, "params": None} if self.decode_on == "device"
                  else {"video": torch.zeros(3, t, size, size, dtype=torch.uint8)})
        return {**frames, "label": 0, "key": "", "view": 0, "weight": 0.0,
                "frame_index": torch.zeros(t, dtype=torch.int64)}

    # -- evaluation: every (video, view) exactly once over ranks x workers -------------------------------

    def _eval_batches(self) -> Iterator[dict]:
        worker, num_workers = self._worker
        parts = eval_shard_parts(len(self.urls), self.rank, self.world_size, worker, num_workers)
        yield from self._batches(self._eval_items(self._part_samples(parts)), max_batches=None)

    def _part_samples(self, parts) -> Iterator[dict]:
        for part in parts:
            shard = wds.tariterators.tarfile_samples([{"url": self.urls[part.shard]}], handler=self._shard_error)
            for position, sample in enumerate(shard):
                if part.keeps(position):
                    yield sample

    def _eval_items(self, samples: Iterator[dict]) -> Iterator[dict]:
        n_t, n_s = self.temporal_clips, self.spatial_crops
        for sample in samples:
            self._heap.tick()
            try:
                label = self._label(sample)
                with open_frame_reader(sample, self.backend) as reader:
                    if self.decode_on == "device":
                        indices = [eval_frame_indices(self.clip, reader.num_frames, k, n_t) for k in range(n_t)]
                        encoded = encode_for_device(sample, reader, np.concatenate(indices))
                        views = [[{"encoded": encoded, "params": params} for params in row]
                                 for row in eval_view_params(encoded.height, encoded.width, self.clip, n_t, n_s)]
                    else:
                        indices, crops = read_eval_views(reader, self.clip, n_t, n_s)
                        views = [[{"video": crop} for crop in row] for row in crops]
            except Exception as exc:  # noqa: BLE001 - see _train_items
                self._skip(sample, exc)
                continue
            for k in range(n_t):
                for s in range(n_s):
                    yield {**views[k][s], "label": label, "key": sample["__key__"],
                           "view": k * n_s + s, "frame_index": torch.from_numpy(indices[k])}

    # -- shared -------------------------------------------------------------------------------------------------

    def _batches(self, items: Iterator[dict], max_batches: int | None) -> Iterator[dict]:
        buffer: list[dict] = []
        produced = 0
        for item in items:
            buffer.append(item)
            if len(buffer) == self.batch_size:
                yield self._collate(buffer)
                buffer = []
                produced += 1
                if produced == max_batches:
                    return
        if buffer or self._skipped:
            # Eval tail; an empty batch only carries the skipped count of a worker with nothing decodable left.
            yield self._collate(buffer)

    def _collate(self, items: list[dict]) -> dict:
        t, size = self.clip.num_frames, self.clip.size
        if self.decode_on == "device":
            # Compressed: the loader decodes on its device (DeviceBatchDecoder) into the "video" below.
            frames = {"encoded": [i["encoded"] for i in items], "params": [i["params"] for i in items]}
        else:
            frames = {"video": torch.stack([i["video"] for i in items]) if items
                      else torch.empty(0, 3, t, size, size, dtype=torch.uint8)}
        batch = {
            **frames,
            "label": torch.tensor([i["label"] for i in items], dtype=torch.int64),
            "key": [i["key"] for i in items],
            "view": torch.tensor([i["view"] for i in items], dtype=torch.int64),
            "frame_index": torch.stack([i["frame_index"] for i in items]) if items else torch.empty(0, t, dtype=torch.int64),
            "skipped": torch.tensor(self._skipped, dtype=torch.int64),
        }
        if self.train:
            batch["weight"] = torch.tensor([i["weight"] for i in items], dtype=torch.float32)
        self._skipped = 0
        return batch

    def _label(self, sample: dict) -> int:
        if not self.labels:
            return -1  # masked pre-training: labels are not read (an unlabelled set has none)
        raw = sample.get("cls")
        if raw is None:
            raise CorruptSample("no cls field")
        try:
            label = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptSample(f"cls field {raw[:20]!r} is not an integer") from exc
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise CorruptSample(f"label {label} outside the {self.num_classes} classes")
        return label

    def _skip(self, sample: dict, exc: Exception, count: bool = True) -> None:
        """Report a corrupt sample; `count`: it counts as one skipped video here (a training video whose clips
        fall into several micro batches is counted where its first clip is)."""
        reason = str(exc) if isinstance(exc, CorruptSample) else f"{type(exc).__name__}: {exc}"
        worker, _ = self._worker
        logger.warning(
            "rank %d worker %d: skipping corrupt sample %s in %s: %s",
            self.rank, worker, sample.get("__key__"), sample.get("__url__"), reason,
        )
        self._count_failure(reason, count)

    def _shard_error(self, exc: Exception) -> bool:
        worker, _ = self._worker
        logger.warning("rank %d worker %d: skipping unreadable shard data: %s", self.rank, worker, exc)
        self._count_failure(str(exc))
        return True

    def _count_failure(self, reason: str, count: bool = True) -> None:
        self._skipped += int(count)
        self._failures_in_a_row += 1
        if self.train and self._failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(
                f"{MAX_CONSECUTIVE_FAILURES} training samples in a row failed (last: {reason}); the shards are "
                "unreadable or not in a shard format this version reads - check them with shards/show.py"
            )


class HeapTrimmer:
    """Every `every` samples, hand the freed parts of the C heap back to the OS (glibc malloc_trim).

    Compressed samples (~0.5 MB) live on in the shuffle buffer while decode buffers come and go around
    them; glibc keeps the holes, and a worker's memory crept from 200 to 500 MB over a few hundred samples
    (benchmarks/bench_loader.py) instead of staying at its shuffle buffer. Trimming every 32 samples keeps
    it flat at a cost too small to measure; forcing those buffers into their own mmaps instead (mallopt
    M_MMAP_THRESHOLD) also kept it flat but cost 12-15 % CPU in page faults. No library exposes malloc_trim,
    hence ctypes; a no-op where libc is not glibc.
    """

    def __init__(self, every: int = 32):
        self.every = every
        self.count = 0

    def tick(self) -> None:
        self.count += 1
        if self.count % self.every == 0 and (trim := _malloc_trim()) is not None:
            trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, looked up once per process (None elsewhere). Not kept on the stream itself: a
    ctypes function pointer cannot be pickled, and spawn/forkserver workers pickle the dataset."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


class ClipLoader:
    """Iterate to get one pass of batch dicts: training, from the next micro batch to the end of its epoch
    (or `batches_per_pass` micro batches, across epochs); evaluation, every (video, view) once.

    batch = {"video": uint8 (B, C, T, H, W), "label": int64 (B,), "key": list[str], "view": int64 (B,),
             "frame_index": int64 (B, T), "skipped": int64 scalar (corrupt videos first met in this batch),
             training only: "weight": float32 (B,) loss weight per slot (0 for padding and corrupt videos,
             G / real clips otherwise: epochs.py), "epoch", "global_batch" (optimizer step index, from 0),
             "micro" (index within its step), "micro_batch" (this process's, from 0),
             "skipped_clips": [[key, clip], ...] of corrupt videos (their slots have weight 0 and key "")}
    With a `device_decoder` (decode_on="device") the workers' batches hold compressed videos, decoded here,
    in the iterating process: "video" is then on the decoder's device.
    A training loader's `next_micro_batch` is the data position: the micro batch the next pass starts at
    (the only counter; a run's RunData reads it for its checkpoint). `skipped_in_last_pass` totals the corrupt
    samples of the last pass.
    """

    def __init__(self, stream: ClipStream, start_micro_batch: int = 0, batches_per_pass: int | None = None,
                 device_decoder: DeviceBatchDecoder | None = None):
        self.stream = stream
        self.options = stream.options
        self.device_decoder = device_decoder  # decode_on="device": decodes each batch in this process
        self.num_workers = self.options.num_workers
        self.pin_memory = torch.cuda.is_available() if self.options.pin_memory is None else self.options.pin_memory
        if start_micro_batch < 0 or (batches_per_pass is not None and batches_per_pass < 1):
            raise ValueError(f"start micro batch must be >= 0 and batches_per_pass >= 1, got {start_micro_batch}, "
                             f"{batches_per_pass}")
        self.next_micro_batch = start_micro_batch
        self.batches_per_pass = batches_per_pass
        self.skipped_in_last_pass = 0

    @property
    def plan(self) -> EpochPlan:
        return self.stream.plan

    @property
    def micro_batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch * self.options.accumulation

    @property
    def epoch(self) -> int:
        """The epoch of the next training micro batch."""
        return self.next_micro_batch // self.micro_batches_per_epoch

    def __len__(self) -> int:
        if not self.stream.train:
            raise TypeError("an eval loader's per-rank length depends on the shard split; iterate it")
        if self.batches_per_pass is not None:
            return self.batches_per_pass
        return (self.epoch + 1) * self.micro_batches_per_epoch - self.next_micro_batch

    def _decode_on_device(self, batch: dict) -> dict:
        decoded, failures = self.device_decoder.decode(batch, train=self.stream.train)
        for key, reason in failures:
            logger.warning("rank %d: skipping corrupt sample %s (decoding on %s): %s",
                           self.stream.rank, key, self.device_decoder.device, reason)
        return decoded

    def __iter__(self) -> Iterator[dict]:
        if self.stream.train:
            self.stream.first_micro, self.stream.num_micro = self.next_micro_batch, len(self)
            yield from self._train_pass()
        else:
            yield from self._eval_pass()

    def _loader(self) -> wds.WebLoader:
        return wds.WebLoader(
            self.stream,
            batch_size=None,  # batches are built in the workers
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.options.prefetch_factor if self.num_workers > 0 else None,
            # A stuck worker (a stalled file system, a pipe: URL that never answers) ends the pass with an error
            # instead of a silent hang; a dead one PyTorch reports by itself. Workers only: without them the
            # reading happens here, under the hang watchdog.
            timeout=self.options.worker_timeout_s if self.num_workers > 0 else 0,
        )

    def _train_pass(self) -> Iterator[dict]:
        expected = len(self)
        self.skipped_in_last_pass = 0
        for batch in self._loader():
            if batch["micro_batch"] != self.next_micro_batch:
                raise RuntimeError(f"training loader produced micro batch {batch['micro_batch']} where "
                                   f"{self.next_micro_batch} was due")
            if self.device_decoder is not None:
                batch = self._decode_on_device(batch)
            self.skipped_in_last_pass += int(batch["skipped"])
            self.next_micro_batch += 1  # counted as consumed when handed out: a step takes what it is given
            yield batch
        if self.next_micro_batch != self.stream.first_micro + expected:
            raise RuntimeError(f"training loader produced {self.next_micro_batch - self.stream.first_micro} "
                               f"batches instead of {expected}")

    def _eval_pass(self) -> Iterator[dict]:
        self.skipped_in_last_pass = 0
        held: dict | None = None  # one batch of lookahead so an empty tail batch's skip count is not lost
        for batch in self._loader():
            if self.device_decoder is not None:
                batch = self._decode_on_device(batch)
            self.skipped_in_last_pass += int(batch["skipped"])
            if len(batch["key"]) == 0:
                if held is not None:
                    held["skipped"] = held["skipped"] + batch["skipped"]
                continue
            if held is not None:
                yield held
            held = batch
        if held is not None:
            yield held
        elif self.skipped_in_last_pass:
            logger.warning("rank %d: all %d samples of this rank's evaluation shards were corrupt",
                           self.stream.rank, self.skipped_in_last_pass)


def resolve_rank(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else RANK/WORLD_SIZE from the environment (torchrun, accelerate, SLURM via submitit),
    else an initialised torch.distributed group, else a single process."""
    if rank is not None and world_size is not None:
        resolved = (rank, world_size)
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        resolved = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    elif torch.distributed.is_available() and torch.distributed.is_initialized():
        resolved = (torch.distributed.get_rank(), torch.distributed.get_world_size())
    else:
        resolved = (0, 1)
    if not 0 <= resolved[0] < resolved[1]:
        raise ValueError(f"rank {resolved[0]} is not in a world of {resolved[1]} processes")
    return resolved


def _as_shardset(source: ShardSet | str | os.PathLike | list[str]) -> ShardSet:
    return source if isinstance(source, ShardSet) else ShardSet.open(source)


def _options(options: LoaderOptions | None, changes: dict) -> LoaderOptions:
    if options is not None and not isinstance(options, LoaderOptions):
        raise TypeError(f"the loader's third argument is a LoaderOptions, got {type(options).__name__}: pass "
                        "clip=ClipSpec(...) and the other settings as keywords")
    return (options or LoaderOptions()).replace(**changes)


def build_train_loader(
    shardset: ShardSet | str | os.PathLike | list[str],
    split: str = "train",
    options: LoaderOptions | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    start_batch: int = 0,
    batches_per_pass: int | None = None,
    device: torch.device | str | None = None,
    **option_changes,
) -> ClipLoader:
    """Training micro batches of this process (`rank` of `world_size`, default from the environment), from its
    micro batch `start_batch` (= optimizer step x accumulation) on. `options` (default LoaderOptions()) with
    `option_changes` applied, e.g. `build_train_loader(shards, clip=ClipSpec(...), batch_size=4)`.

    Every pass is one epoch (the rest of it, when started mid-epoch) unless `batches_per_pass` says otherwise;
    each epoch shows every video of `split` exactly once x clips_per_video, and global batch b holds the same
    clips on any world size and worker count (actionrec/data/epochs.py). Memory per worker: one micro batch of
    compressed samples plus the split's index (about 100 bytes per video).
    device (decode_on="device"): where frames are decoded (default: cuda where present, else cpu).
    """
    options = _options(options, option_changes)
    shardset = _as_shardset(shardset)
    rank, world_size = resolve_rank(rank, world_size)
    urls = shardset.urls(split)
    index = SplitIndex.load(urls)
    expected = shardset.num_samples(split)
    if expected is not None and expected != len(index):
        logger.warning("the manifest says %s has %d %s videos, its shards hold %d: training on the %d in the shards",
                       split, expected, split, len(index), len(index))
    plan = EpochPlan(len(index), options.clips_per_video, options.batch_size * world_size * options.accumulation,
                     options.seed)
    stream = ClipStream(urls, options, train=True, rank=rank, world_size=world_size,
                        num_classes=shardset.num_classes, index=index, plan=plan)
    return ClipLoader(stream, start_micro_batch=start_batch, batches_per_pass=batches_per_pass,
                      device_decoder=_device_decoder(device, stream))


def build_eval_loader(
    shardset: ShardSet | str | os.PathLike | list[str],
    split: str = "val",
    options: LoaderOptions | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str | None = None,
    **option_changes,
) -> ClipLoader:
    """Every (video, view) of `split` exactly once over all ranks and workers, no padding duplicates.

    Views per video: temporal_clips x spatial_crops (1 or 3), view index = temporal * spatial_crops + spatial.
    Ranks may get different numbers of batches: gather predictions per video key after the pass, not
    with per-batch collectives.
    """
    options = _options(options, option_changes)
    shardset = _as_shardset(shardset)
    rank, world_size = resolve_rank(rank, world_size)
    stream = ClipStream(shardset.urls(split), options, train=False, rank=rank, world_size=world_size,
                        num_classes=shardset.num_classes)
    return ClipLoader(stream, device_decoder=_device_decoder(device, stream))


def _device_decoder(device: torch.device | str | None, stream: ClipStream) -> DeviceBatchDecoder | None:
    if stream.decode_on != "device":
        return None
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return DeviceBatchDecoder(device, stream.backend, stream.clip)
