"""The training order: which clip fills every slot of every global batch, on any number of processes.

An epoch is one pass over the training set: every video exactly once, `clips_per_video` (K) clips each, in
an order fixed by (seed, epoch) alone:

    epoch e:   order_e = a seeded permutation of the N videos      (numpy, seed and epoch only)
    clips:     position p in [0, N*K) is clip p % K of video order_e[p // K]   (a video's K clips adjacent,
               so they usually share one decode)
    batches:   global batch b of the epoch holds positions [b*G, (b+1)*G), G = the global batch size; the
               last one is topped up with padding slots (weight 0, no data) so that every optimizer step
               has G slots and no clip of the next epoch, and the loss of that step is the mean over its
               real clips (real slots weigh G / real clips: see `slot_weight`)
    slots:     slot q of a global batch goes to micro batch m = q // (R*B), rank r = (q % (R*B)) // B,
               place q % B, for R processes x B clips per micro batch x A accumulation steps (G = R*A*B)

Nothing here depends on R, B or A except which process computes a slot, so global batch b holds the same
clips — same video, same clip index, and (with per-clip seeds, see `clip_rng`) the same frames and
augmentation — on 1 process or 64, with any number of loader workers, and a run resumes on any world size
at its next global batch. The permutation is uniform over the whole epoch (no shuffle buffer, no shard
locality): training workers read each sample by its byte offset (actionrec/shards/index.py), so shuffle
quality costs no memory.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np


def stable_key_hash(key: str) -> tuple[int, int]:
    """Two 32-bit words of a video key, the same in every process and Python run (str hash is salted)."""
    digest = hashlib.sha1(key.encode()).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")


def clip_rng(seed: int, epoch: int, key: str, clip: int) -> np.random.Generator:
    """The generator of one training clip's frame indices and augmentation: a function of (seed, epoch, video
    key, clip index) only, so a clip is the same whichever process, worker or micro batch computes it."""
    return np.random.default_rng([seed, epoch, *stable_key_hash(key), clip])


@dataclass(frozen=True)
class Slot:
    """One place of a micro batch: clip `clip` of video `video` (index into the split's canonical order:
    shards in manifest order, samples in file order), or padding (video -1) at the end of an epoch."""

    epoch: int
    video: int
    clip: int

    @property
    def padding(self) -> bool:
        return self.video < 0


@dataclass(frozen=True)
class EpochPlan:
    num_videos: int
    clips_per_video: int
    global_batch: int  # clips per optimizer step, all processes and micro batches together
    seed: int
    _orders: dict = field(default_factory=dict, compare=False, repr=False)  # epoch -> permutation (memo)

    def __post_init__(self) -> None:
        if self.num_videos < 1:
            raise ValueError("the training split has no videos: pack some with shards/pack.py")
        if self.clips_per_video < 1 or self.global_batch < 1:
            raise ValueError(f"clips_per_video and the global batch must be >= 1, got {self.clips_per_video}, "
                             f"{self.global_batch}")

    @property
    def clips_per_epoch(self) -> int:
        return self.num_videos * self.clips_per_video

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch; the last may hold padding."""
        return math.ceil(self.clips_per_epoch / self.global_batch)

    @property
    def padding_per_epoch(self) -> int:
        return self.batches_per_epoch * self.global_batch - self.clips_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """(N,) the videos of `epoch` in training order."""
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a worker needs the current epoch (and briefly the next)
                self._orders.clear()
            rng = np.random.default_rng([self.seed, epoch, 0x0E0C])
            self._orders[epoch] = rng.permutation(self.num_videos)
        return self._orders[epoch]

    def split(self, global_batch: int) -> tuple[int, int]:
        """Global batch index since the start of training -> (epoch, batch within the epoch)."""
        return divmod(global_batch, self.batches_per_epoch)

    def real_clips(self, batch_in_epoch: int) -> int:
        """Real (non-padding) slots of global batch `batch_in_epoch`."""
        return min(self.global_batch, self.clips_per_epoch - batch_in_epoch * self.global_batch)

    def slot_weight(self, batch_in_epoch: int) -> float:
        """Loss weight of a real slot: the micro-batch loss is sum(weight x clip loss) / B, which, averaged
        over the R x A micro batches of the step, is the mean over the step's real clips."""
        return self.global_batch / self.real_clips(batch_in_epoch)

    def slots(self, global_batch: int, first: int, count: int) -> list[Slot]:
        """Slots [first, first + count) of global batch `global_batch` (counted from the start of training)."""
        epoch, batch = self.split(global_batch)
        order = self.order(epoch)
        k = self.clips_per_video
        out = []
        for q in range(first, first + count):
            position = batch * self.global_batch + q
            if position >= self.clips_per_epoch:
                out.append(Slot(epoch, -1, 0))
            else:
                out.append(Slot(epoch, int(order[position // k]), position % k))
        return out


@dataclass(frozen=True)
class MicroBatchLayout:
    """How one process cuts the global batches: R processes x A micro batches of B clips each."""

    rank: int
    world_size: int
    per_device: int  # B
    accumulation: int  # A

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size or self.per_device < 1 or self.accumulation < 1:
            raise ValueError(f"bad layout: rank {self.rank} of {self.world_size}, {self.per_device} clips x "
                             f"{self.accumulation} micro batches")

    @property
    def global_batch(self) -> int:
        return self.world_size * self.accumulation * self.per_device

    def locate(self, micro_batch: int) -> tuple[int, int, int]:
        """This process's micro batch `micro_batch` (counted from the start of training) ->
        (global batch, micro index within its step, first slot)."""
        global_batch, micro = divmod(micro_batch, self.accumulation)
        return global_batch, micro, (micro * self.world_size + self.rank) * self.per_device

    def slots(self, plan: EpochPlan, micro_batch: int) -> list[Slot]:
        global_batch, _, first = self.locate(micro_batch)
        return plan.slots(global_batch, first, self.per_device)
