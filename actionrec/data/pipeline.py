"""WebDataset pipelines that turn shards into batches of uint8 clips, and the loaders around them.

    shard URLs -> (train: resampled, seeded | eval: this slot's shard parts) -> tar samples (webdataset)
      -> (train: shuffle buffer) -> decode the needed frames -> transforms -> batches, all in the workers
    (decode_on="device": the workers stop before decoding and ship bytes, indices and augmentation draws;
     the loader decodes and transforms each batch on the training process's device, see device_decode.py)

The DataLoader is iterated by the caller directly; do not hand it to `accelerator.prepare()` (it would
re-shard an already sharded stream and drop data).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from actionrec.data.assignment import eval_shard_parts, train_worker_plan
from actionrec.data.decode import CorruptSample, DecoderName, open_frame_reader, resolve_decoder
from actionrec.data.device_decode import DecodeOn, DeviceBatchDecoder, check_decode_on, encode_for_device
from actionrec.data.sampling import ClipSpec, eval_frame_indices, train_frame_indices
from actionrec.data.shardset import ShardSet
from actionrec.data.transforms import TrainAugment, draw_train_params, eval_view_params, read_eval_views, train_transform

logger = logging.getLogger(__name__)

# A training stream is infinite (resampled): if this many samples fail in a row nothing decodable is
# left (wrong format, unreadable storage) and raising beats spinning forever.
MAX_CONSECUTIVE_FAILURES = 1000


class ClipStream(IterableDataset):
    """The per-worker part of a loader: one instance is copied into every DataLoader worker.

    Yields whole batches (dicts, see `collate`) built in the worker, with `skipped` = corrupt samples this
    worker dropped since its previous batch. A training sample gives `clips_per_video` clips (K), each
    sampled and augmented on its own from one decode of the union of their frames.
    """

    def __init__(
        self,
        urls: list[str],
        *,
        train: bool,
        clip: ClipSpec,
        batch_size: int,
        backend: str,
        rank: int,
        world_size: int,
        num_classes: int | None,
        seed: int = 0,
        augment: TrainAugment | None = None,
        shuffle_buffer: int = 0,  # train streams only; build_train_loader picks its size per shard format
        batches_per_epoch: int = 0,
        temporal_clips: int = 1,
        spatial_crops: int = 1,
        labels: bool = True,
        clips_per_video: int = 1,
        decode_on: DecodeOn = "worker",
    ):
        self.urls = urls
        self.decode_on = decode_on
        self.labels = labels
        self.train = train
        self.clip = clip
        self.batch_size = batch_size
        self.backend = backend
        self.rank = rank
        self.world_size = world_size
        self.num_classes = num_classes
        self.seed = seed
        self.augment = augment or TrainAugment()
        self.shuffle_buffer = shuffle_buffer
        self.batches_per_epoch = batches_per_epoch
        self.temporal_clips = temporal_clips
        self.spatial_crops = spatial_crops
        self.clips_per_video = clips_per_video
        self.epoch = 0
        self.first_batch = 0
        self.start_clips: list[int] | None = None  # per logical worker: clips consumed before first_batch
        self._worker = (0, 1)
        self._logical = (0, 1)  # (logical worker, logical workers) of the current training pass
        self._skipped = 0
        self._failures_in_a_row = 0

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        self._worker = (info.id, info.num_workers) if info is not None else (0, 1)
        self._skipped = 0
        self._failures_in_a_row = 0
        self._heap = _HeapTrimmer()
        return self._train_batches() if self.train else self._eval_batches()

    # -- training: resampled, seeded per (seed, rank, epoch, logical worker) --------------------------------

    def _train_batches(self) -> Iterator[dict]:
        worker, num_workers = self._worker
        plan = train_worker_plan(self.batches_per_epoch, self.first_batch, worker, num_workers)
        if plan.num_batches == 0:
            return
        self._logical = (plan.logical_worker, num_workers)
        stream_id = f"{self.seed}/{self.rank}/{self.epoch}/{plan.logical_worker}"
        pipeline = wds.DataPipeline(
            functools.partial(_resampled_urls, self.urls, random.Random(f"shards/{stream_id}")),
            wds.tarfile_to_samples(handler=self._shard_error),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(f"shuffle/{stream_id}")),
        )
        samples = iter(pipeline)
        # Fast-forward for resume: drop the samples this logical worker consumed before the resume point
        # without decoding them. Counted in clips (stream position = sample position x K + clip), so that a
        # corrupt sample (consumed, no clips) and a video whose K clips straddle two batches resume exactly.
        # Without a recorded position, the estimate assumes no corrupt sample came before.
        if self.start_clips is not None:
            clips_before = self.start_clips[plan.logical_worker]
        else:
            clips_before = plan.skip_batches * self.batch_size
        first_sample, first_clip = divmod(clips_before, self.clips_per_video)
        for _ in islice(samples, first_sample):
            pass
        items = self._train_items(samples, first_sample, first_clip, logical_worker=plan.logical_worker)
        yield from self._batches(items, max_batches=plan.num_batches)

    def _train_items(self, samples: Iterator[dict], first_sample: int, first_clip: int,
                     logical_worker: int) -> Iterator[dict]:
        k_clips, t = self.clips_per_video, self.clip.num_frames
        for position, sample in enumerate(samples, start=first_sample):
            self._heap.tick()
            # Per-sample generator: the clips and augmentation of a sample do not depend on what came before
            # (so fast-forwarding skips samples without replaying their random draws). Draw order: the K
            # clips' frame indices, then the K augmentations (for K = 1, the order of a single clip).
            rng = np.random.default_rng([self.seed, self.rank, self.epoch, logical_worker, position])
            try:
                label = self._label(sample)
                with open_frame_reader(sample, self.backend) as reader:
                    indices = [train_frame_indices(self.clip, reader.num_frames, rng) for _ in range(k_clips)]
                    if self.decode_on == "device":
                        # Bytes and the same draws leave the worker; the training process decodes.
                        encoded = encode_for_device(sample, reader, np.concatenate(indices))
                        size = (encoded.height, encoded.width)
                        clips = [{"encoded": encoded, "params": draw_train_params(*size, self.clip, self.augment, rng)}
                                 for _ in range(k_clips)]
                    else:
                        # One decode of the union of the K clips' frames (readers decode each index once).
                        frames = reader.read(np.concatenate(indices))  # (K*T, 3, H, W)
                        clips = [{"video": train_transform(frames[k * t : (k + 1) * t], self.clip, self.augment,
                                                           rng).permute(1, 0, 2, 3)}
                                 for k in range(k_clips)]  # K x (3, T, S, S)
            except Exception as exc:  # noqa: BLE001 - any failure of one sample is that sample's corruption
                self._skip(sample, exc)
                continue
            self._failures_in_a_row = 0
            for k in range(first_clip if position == first_sample else 0, k_clips):
                yield {**clips[k], "label": label, "key": sample["__key__"], "view": k,
                       "frame_index": torch.from_numpy(indices[k]), "position": position * k_clips + k + 1}

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
        if items and "position" in items[-1]:
            # Training: where this logical worker's stream stands after the batch (see StreamPosition).
            batch["stream_position"] = torch.tensor([self.epoch, *self._logical, items[-1]["position"]])
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

    def _skip(self, sample: dict, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, CorruptSample) else f"{type(exc).__name__}: {exc}"
        worker, _ = self._worker
        logger.warning(
            "rank %d worker %d: skipping corrupt sample %s in %s: %s",
            self.rank, worker, sample.get("__key__"), sample.get("__url__"), reason,
        )
        self._count_failure(reason)

    def _shard_error(self, exc: Exception) -> bool:
        worker, _ = self._worker
        logger.warning("rank %d worker %d: skipping unreadable shard data: %s", self.rank, worker, exc)
        self._count_failure(str(exc))
        return True

    def _count_failure(self, reason: str) -> None:
        self._skipped += 1
        self._failures_in_a_row += 1
        if self.train and self._failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            raise RuntimeError(
                f"{MAX_CONSECUTIVE_FAILURES} training samples in a row failed (last: {reason}); the shards are "
                "unreadable or not shard format v1 - check them with shards/show.py"
            )


class _HeapTrimmer:
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


def _resampled_urls(urls: list[str], rng: random.Random) -> Iterator[dict]:
    """Shards drawn with replacement, forever: every worker of every rank always has data (no rank runs dry)."""
    while True:
        yield {"url": urls[rng.randrange(len(urls))]}


@dataclass
class StreamPosition:
    """How far a training loader's streams have been consumed in one epoch: per logical worker, the clips
    of its sample stream consumed so far (stream position = sample position x clips_per_video + clip; a
    corrupt sample is consumed whole and gives no clip). Updated from each consumed batch's
    `stream_position`; what a checkpoint stores so that a resumed loader gives exactly the batches of the
    uninterrupted one, whatever corrupt samples came before.
    """

    epoch: int = -1
    clips: list[int] = field(default_factory=list)

    def advance(self, batch: dict) -> None:
        position = batch.get("stream_position")
        if position is None:  # an eval batch, or batches from elsewhere (tests)
            return
        epoch, worker, num_workers, clips = (int(v) for v in position)
        if epoch != self.epoch or len(self.clips) != num_workers:
            self.epoch, self.clips = epoch, [0] * num_workers
        self.clips[worker] = clips

    def clips_for(self, epoch: int, num_workers: int) -> list[int] | None:
        """The per-logical-worker clips to resume `epoch` with `num_workers` loader workers, or None when
        this position is of another epoch (resume at an epoch's start) or another worker count (whose
        streams differ anyway)."""
        if epoch != self.epoch or len(self.clips) != max(num_workers, 1):
            return None
        return list(self.clips)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "clips": list(self.clips)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.clips = int(state["epoch"]), [int(c) for c in state["clips"]]


class ClipLoader:
    """Iterate to get one epoch (train) or one full pass (eval) of batch dicts.

    batch = {"video": uint8 (B, C, T, H, W), "label": int64 (B,), "key": list[str], "view": int64 (B,),
             "frame_index": int64 (B, T), "skipped": int64 scalar,
             train only: "stream_position": int64 (4,) = epoch, logical worker, workers, clips consumed}
    With a `device_decoder` (decode_on="device") the workers' batches hold compressed videos, and each is
    decoded here, in the iterating process: "video" is then on the decoder's device; a video that fails to
    decode leaves its batch smaller and is counted in "skipped".
    Training loaders advance their epoch after each full pass (or use `set_epoch`). `skipped_in_last_pass`
    totals the corrupt samples of the last pass; `position` is where the batches yielded so far leave the
    streams (pass its `clips_for(...)` as `start_clips` with `start_batch` to resume exactly there).
    """

    def __init__(self, stream: ClipStream, num_workers: int, start_batch: int = 0,
                 pin_memory: bool | None = None, prefetch_factor: int = 2, start_clips: list[int] | None = None,
                 device_decoder: DeviceBatchDecoder | None = None):
        self.stream = stream
        self.device_decoder = device_decoder  # decode_on="device": decodes each batch in this process
        self.num_workers = num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.prefetch_factor = prefetch_factor
        if stream.train:
            self.epoch, self._first_batch = divmod(start_batch, stream.batches_per_epoch)
        else:
            self.epoch, self._first_batch = 0, 0
        self._start_clips = self._checked_start_clips(start_clips)
        self.position = StreamPosition()
        if self._start_clips is not None:
            self.position = StreamPosition(self.epoch, list(self._start_clips))
        self.skipped_in_last_pass = 0

    def _checked_start_clips(self, start_clips: list[int] | None) -> list[int] | None:
        if start_clips is None:
            return None
        workers = max(self.num_workers, 1)
        # Logical worker w made the batches w, w + workers, ... of the epoch: at least that many full batches.
        least = [len(range(w, self._first_batch, workers)) * self.stream.batch_size for w in range(workers)]
        if len(start_clips) != workers or any(c < low for c, low in zip(start_clips, least)):
            raise ValueError(f"start_clips {list(start_clips)} is not a stream position of batch {self._first_batch} "
                             f"of epoch {self.epoch} with {workers} logical worker(s) of {self.stream.batch_size} "
                             "clips a batch: pass the loader's own `position.clips_for(epoch, num_workers)`")
        return list(start_clips)

    def _decode_on_device(self, batch: dict) -> dict:
        decoded, failures = self.device_decoder.decode(batch, train=self.stream.train)
        for key, reason in failures:
            logger.warning("rank %d: skipping corrupt sample %s (decoding on %s): %s",
                           self.stream.rank, key, self.device_decoder.device, reason)
        if self.stream.train and batch["key"] and not decoded["key"]:
            raise RuntimeError(f"all {len(batch['key'])} clips of a training batch failed to decode on "
                               f"{self.device_decoder.device}; check the shards with shards/show.py or set "
                               "data.decode_on=worker")
        return decoded

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._first_batch, self._start_clips = epoch, 0, None

    def __len__(self) -> int:
        if not self.stream.train:
            raise TypeError("an eval loader's per-rank length depends on the shard split; iterate it")
        return self.stream.batches_per_epoch - self._first_batch

    def __iter__(self) -> Iterator[dict]:
        self.stream.epoch, self.stream.first_batch = self.epoch, self._first_batch
        self.stream.start_clips = self._start_clips
        expected = len(self) if self.stream.train else None
        loader = wds.WebLoader(
            self.stream,
            batch_size=None,  # batches are built in the workers
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )
        self.skipped_in_last_pass = 0
        produced = 0
        held: dict | None = None  # one batch of lookahead so an empty tail batch's skip count is not lost
        for batch in loader:
            if self.device_decoder is not None:
                batch = self._decode_on_device(batch)
            self.skipped_in_last_pass += int(batch["skipped"])
            if len(batch["key"]) == 0:
                if held is not None:
                    held["skipped"] = held["skipped"] + batch["skipped"]
                continue
            if held is not None:
                produced += 1
                self.position.advance(held)
                yield held
            held = batch
        if held is not None:
            produced += 1
            self.position.advance(held)
            yield held
        if self.stream.train:
            if produced != expected:
                raise RuntimeError(f"training loader produced {produced} batches instead of {expected}")
            self.epoch, self._first_batch, self._start_clips = self.epoch + 1, 0, None
        elif self.skipped_in_last_pass and held is None:
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


def _check_common(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")


def build_train_loader(
    shardset: ShardSet | str | os.PathLike | list[str],
    split: str = "train",
    clip: ClipSpec = ClipSpec(),
    batch_size: int = 8,
    num_workers: int = 2,
    batches_per_epoch: int | None = None,
    seed: int = 0,
    start_batch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    augment: TrainAugment = TrainAugment(),
    shuffle_buffer: int | None = None,
    decoder: DecoderName = "auto",
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
    labels: bool = True,
    clips_per_video: int = 1,
    start_clips: list[int] | None = None,
    decode_on: DecodeOn = "worker",
    device: torch.device | str | None = None,
) -> ClipLoader:
    """Resampled training batches: exactly `batches_per_epoch` per rank per epoch, deterministic given
    (seed, rank, epoch, num_workers), resumable at global batch `start_batch` (= optimizer step x accumulation).
    Resuming is exact when `start_clips` gives the stream position the earlier loader's `position` recorded
    at that batch; without it the position is estimated as if no sample before it was corrupt.

    batch_size is per process, in clips. clips_per_video (K): clips drawn from each decoded video, sampled and
    augmented independently (repeated augmentation; a batch of B clips holds about B / K videos).
    batches_per_epoch defaults to the split's videos x K / (batch_size x world_size): every video once.
    Memory per worker is bounded by `shuffle_buffer` compressed samples (default 128 for mp4 shards, 16 for
    jpg shards, whose samples are about 15x larger). Workers restart each epoch and refill the buffer.
    labels=False: labels are not read (label -1), for unlabelled sets (masked pre-training).
    decode_on="device": workers only read and sample; frames are decoded and augmented on `device` (default:
    cuda where present, else cpu) in this process, with the same clips (see actionrec/data/device_decode.py).
    """
    _check_common(batch_size, num_workers)
    shardset = _as_shardset(shardset)
    rank, world_size = resolve_rank(rank, world_size)
    if shuffle_buffer is None:
        # Compressed samples held per worker: ~1 MB per 10 s mp4 at 256p, ~15 MB as jpg frames.
        shuffle_buffer = 16 if shardset.format == "jpg" else 128
    if clips_per_video < 1:
        raise ValueError(f"clips_per_video must be >= 1, got {clips_per_video}")
    if batches_per_epoch is None:
        videos = shardset.num_samples(split)
        if not videos:
            raise ValueError(f"batches_per_epoch is needed: the shard set does not say how many {split} videos it has")
        batches_per_epoch = max(1, videos * clips_per_video // (batch_size * world_size))
    if batches_per_epoch < 1 or start_batch < 0 or shuffle_buffer < 1:
        raise ValueError("batches_per_epoch and shuffle_buffer must be >= 1 and start_batch >= 0")
    augment.resolved_range(clip.size)
    check_decode_on(decode_on)
    stream = ClipStream(
        shardset.urls(split), train=True, clip=clip, batch_size=batch_size, backend=resolve_decoder(decoder),
        rank=rank, world_size=world_size, num_classes=shardset.num_classes, seed=seed, augment=augment,
        shuffle_buffer=shuffle_buffer, batches_per_epoch=batches_per_epoch, labels=labels,
        clips_per_video=clips_per_video, decode_on=decode_on,
    )
    return ClipLoader(stream, num_workers, start_batch=start_batch, pin_memory=pin_memory,
                      prefetch_factor=prefetch_factor, start_clips=start_clips,
                      device_decoder=_device_decoder(decode_on, device, stream))


def build_eval_loader(
    shardset: ShardSet | str | os.PathLike | list[str],
    split: str = "val",
    clip: ClipSpec = ClipSpec(),
    batch_size: int = 8,
    num_workers: int = 2,
    temporal_clips: int = 1,
    spatial_crops: int = 1,
    rank: int | None = None,
    world_size: int | None = None,
    decoder: DecoderName = "auto",
    pin_memory: bool | None = None,
    prefetch_factor: int = 2,
    labels: bool = True,
    decode_on: DecodeOn = "worker",
    device: torch.device | str | None = None,
) -> ClipLoader:
    """Every (video, view) of `split` exactly once over all ranks and workers, no padding duplicates.

    Views per video: temporal_clips x spatial_crops (1 or 3), view index = temporal * spatial_crops + spatial.
    Ranks may get different numbers of batches: gather predictions per video key after the pass, not
    with per-batch collectives.
    """
    _check_common(batch_size, num_workers)
    if temporal_clips < 1 or spatial_crops not in (1, 3):
        raise ValueError(f"temporal_clips must be >= 1 and spatial_crops 1 or 3, got {temporal_clips}, {spatial_crops}")
    check_decode_on(decode_on)
    shardset = _as_shardset(shardset)
    rank, world_size = resolve_rank(rank, world_size)
    stream = ClipStream(
        shardset.urls(split), train=False, clip=clip, batch_size=batch_size, backend=resolve_decoder(decoder),
        rank=rank, world_size=world_size, num_classes=shardset.num_classes,
        temporal_clips=temporal_clips, spatial_crops=spatial_crops, labels=labels, decode_on=decode_on,
    )
    return ClipLoader(stream, num_workers, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                      device_decoder=_device_decoder(decode_on, device, stream))


def _device_decoder(decode_on: DecodeOn, device: torch.device | str | None,
                    stream: ClipStream) -> DeviceBatchDecoder | None:
    if decode_on != "device":
        return None
    device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return DeviceBatchDecoder(device, stream.backend, stream.clip)
