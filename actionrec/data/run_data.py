"""The data side of a run: its shard set, its loaders, and the one data position the checkpoint saves.

The trainer receives a RunData (built from `cfg.data` by `RunData.from_config`, or any object with the same
methods: tests and benchmarks pass their own) and never reaches into a loader. The data position is the
number of global batches (optimizer steps) consumed: with the epoch order of epochs.py it is all a resume
needs, on any number of processes, and nothing is re-read to get there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from actionrec.data.pipeline import ClipLoader, LoaderOptions, build_eval_loader, build_train_loader
from actionrec.data.sampling import ClipSpec
from actionrec.data.shardset import ShardSet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Place:
    """Where this process stands in the run: rank R of `world_size`, `accumulation` micro batches a step."""

    rank: int
    world_size: int
    accumulation: int


class RunData:
    def __init__(self, shardset: ShardSet, options: LoaderOptions, place: Place, *, train_split: str = "train",
                 eval_options: LoaderOptions | None = None, device: torch.device | None = None):
        self.shardset = shardset
        self.options = options.replace(accumulation=place.accumulation)
        self.eval_options = eval_options or self.options
        self.place = place
        self.train_split = train_split
        self.device = device
        self.classes = list(shardset.classes) if shardset.classes is not None else []
        self._loader: ClipLoader | None = None
        self._global_batches = 0  # the data position: optimizer steps' worth of batches consumed

    @classmethod
    def from_config(cls, cfg: Any, place: Place, device: torch.device | None = None) -> RunData:
        """The loaders a run config describes (`cfg.data`, with the batch and seed of `cfg.train`)."""
        options, eval_options = options_from_config(cfg)
        return cls(ShardSet.open(cfg.data.shards), options, place, train_split=cfg.data.train_split,
                   eval_options=eval_options, device=device)

    # -- what the trainer asks ---------------------------------------------------------------------------

    def num_samples(self, split: str) -> int | None:
        return self.shardset.num_samples(split) if split else 0

    @property
    def train_loader(self) -> ClipLoader:
        if self._loader is None:
            self._loader = build_train_loader(
                self.shardset, self.train_split, self.options, rank=self.place.rank, world_size=self.place.world_size,
                start_batch=self._global_batches * self.place.accumulation, device=self.device)
        return self._loader

    @property
    def batches_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch."""
        return self.train_loader.plan.batches_per_epoch

    @property
    def train_videos(self) -> int:
        return self.train_loader.plan.num_videos

    @property
    def position(self) -> int:
        """Global batches consumed (= optimizer steps taken, skipped non-finite steps included)."""
        if self._loader is None:
            return self._global_batches
        return self._loader.next_micro_batch // self.place.accumulation

    @property
    def epoch(self) -> float:
        return self.position / self.batches_per_epoch

    def train_batches(self) -> Iterator[dict]:
        """Endless micro batches of this process from the data position on (one loader pass per epoch)."""
        loader = self.train_loader
        while True:
            yield from loader

    def eval_loader(self, split: str) -> ClipLoader:
        return build_eval_loader(self.shardset, split, self.eval_options, rank=self.place.rank,
                                 world_size=self.place.world_size, device=self.device)

    # -- the checkpoint's part ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        loader = self._loader
        if loader is not None and loader.next_micro_batch % self.place.accumulation:
            raise RuntimeError("the data position is saved between optimizer steps only")
        plan = self.train_loader.plan
        return {"global_batches": self.position, "seed": plan.seed, "num_videos": plan.num_videos,
                "clips_per_video": plan.clips_per_video, "global_batch_size": plan.global_batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved global batch. Saved with another data set size, clips per video, seed or
        global batch, the order from there differs from the saved run's: said in one line."""
        plan = self.train_loader.plan
        now = {"seed": plan.seed, "num_videos": plan.num_videos, "clips_per_video": plan.clips_per_video,
               "global_batch_size": plan.global_batch}
        changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if k in state and state[k] != v]
        if changed:
            logger.warning("the training order changed since the checkpoint (%s): continuing at global batch %d "
                           "of the new order, so some videos of the current epoch may be seen twice or not at all",
                           ", ".join(changed), int(state["global_batches"]))
        self.seek(int(state["global_batches"]))

    def seek(self, global_batches: int) -> None:
        """Make the next micro batch the first of global batch `global_batches`."""
        self._global_batches = global_batches
        if self._loader is not None:
            self._loader.next_micro_batch = global_batches * self.place.accumulation


def options_from_config(cfg: Any) -> tuple[LoaderOptions, LoaderOptions]:
    """(training, evaluation) loader options of a run config."""
    from actionrec.data.transforms import TrainAugment

    data = cfg.data
    clip = ClipSpec(num_frames=data.num_frames, sampling=data.sampling, frame_stride=data.frame_stride, size=data.size)
    options = LoaderOptions(
        clip=clip, batch_size=cfg.train.per_device_batch_size, num_workers=data.num_workers, seed=cfg.train.seed,
        augment=TrainAugment(), decoder=data.decoder, decode_on=data.decode_on, clips_per_video=data.clips_per_video,
        labels=cfg.task == "classify", temporal_clips=data.eval_temporal_clips, spatial_crops=data.eval_spatial_crops,
        worker_timeout_s=cfg.train.hang_timeout_s / 2,  # before the hang watchdog: reported as the loader's fault
    )
    return options, options.replace(batch_size=data.eval_batch_size or cfg.train.per_device_batch_size)
