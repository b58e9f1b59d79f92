"""Packing labelled videos into WebDataset shards (format v1, see docs/shards.md)."""

from actionrec.shards.catalog import decode_frames, describe, dump_sample, find_sample, list_keys, load_manifest
from actionrec.shards.encode import EncodedVideo, EncodeSettings, UnpackableSource, encode_source
from actionrec.shards.layouts import LAYOUTS, LayoutError, Listing, Source, list_sources, sample_key
from actionrec.shards.pack import FORMAT_VERSION, PackError, PackOptions, PackResult, format_summary, pack_videos
from actionrec.shards.split import read_split_csv, stratified_split
from actionrec.shards.synthetic import ALL_CLASSES, CLASS_PAIRS, SyntheticSpec, generate_synthetic

__all__ = [
    "ALL_CLASSES", "CLASS_PAIRS", "FORMAT_VERSION", "LAYOUTS", "EncodeSettings", "EncodedVideo", "LayoutError",
    "Listing", "PackError", "PackOptions", "PackResult", "Source", "SyntheticSpec", "UnpackableSource",
    "decode_frames", "describe", "dump_sample", "encode_source", "find_sample", "format_summary",
    "generate_synthetic", "list_keys", "list_sources", "load_manifest", "pack_videos", "read_split_csv",
    "sample_key", "stratified_split",
]
