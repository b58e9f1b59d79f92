"""Streaming loader: clips from WebDataset video shards, decoded and augmented in the workers."""

from actionrec.data.assignment import ShardPart, eval_shard_parts
from actionrec.data.decode import CorruptSample, resolve_decoder
from actionrec.data.epochs import EpochPlan, MicroBatchLayout, clip_rng
from actionrec.data.pipeline import ClipLoader, LoaderOptions, build_eval_loader, build_train_loader
from actionrec.data.run_data import Place, RunData
from actionrec.data.sampling import ClipSpec, eval_frame_indices, train_frame_indices
from actionrec.data.shardset import ShardSet
from actionrec.data.transforms import KINETICS_MEAN, KINETICS_STD, TrainAugment, normalize_on_device

__all__ = [
    "ClipLoader", "ClipSpec", "CorruptSample", "EpochPlan", "KINETICS_MEAN", "KINETICS_STD", "LoaderOptions",
    "MicroBatchLayout", "Place", "RunData", "ShardPart", "ShardSet", "TrainAugment", "build_eval_loader",
    "build_train_loader", "clip_rng", "eval_frame_indices", "eval_shard_parts", "normalize_on_device",
    "resolve_decoder", "train_frame_indices",
]
