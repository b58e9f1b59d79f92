"""Pack a folder of videos into WebDataset shards (+ split.csv, dataset.json, frames_per_category.png).

    python shards/pack.py SRC --out OUT [--layout L] [--workers N] [--format mp4|jpg] ...
    python shards/pack.py VIDEOS --out OUT --layout unlabelled --test 0   # no classes: for masked pre-training
    python shards/pack.py SRC --out OUT --train-per-class 8               # a few-label training set
    python shards/pack.py SRC --out OUT --repack          # OUT packed with other settings: replace, don't stop

Re-running the same command resumes an interrupted pack (and packs videos added since) without
changing the split. Exit status: 0 when anything was packed, 1 when nothing could be, 2 on bad arguments.
"""

import argparse
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.shards.encode import FORMATS, FPS_MODES, X264_TUNES, EncodeSettings  # noqa: E402
from actionrec.shards.layouts import LAYOUTS  # noqa: E402
from actionrec.shards.pack import PackError, PackOptions, format_summary, pack_videos  # noqa: E402

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def byte_size(text: str) -> int:
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).upper() not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 256MB, 1GB, 500000)")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


DEFAULT = EncodeSettings()


def bframes_arg(text: str) -> int | None:
    if text == "preset":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of B-frames or 'preset', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Pack videos into WebDataset shards. Layouts: folder (SRC/<class>/<video>), "
                    "frames (SRC/<class>/<video>/<frame>.jpg), csv (path,label[,split]), ucf101 (classInd.txt + "
                    "train/testlist0N.txt), kinetics (label,youtube_id,time_start,time_end,split CSV), "
                    "ssv2 (labels.json + train/validation JSON), unlabelled (every video under SRC, or a CSV "
                    "with a path column and no label column; detected for a folder of videos without class "
                    "folders): a shard set for masked pre-training (task: pretrain).")
    parser.add_argument("src", help="folder (or CSV manifest) of videos")
    parser.add_argument("--out", required=True, help="output folder for shards, split.csv, dataset.json")
    parser.add_argument("--layout", choices=LAYOUTS, help="force a layout instead of auto-detecting it")
    parser.add_argument("--fold", type=int, default=1, help="UCF101 split (1-3) (default 1)")
    parser.add_argument("--val", type=float, default=0.1, help="val fraction per class where the layout has no val split (default 0.1)")
    parser.add_argument("--test", type=float, default=0.1, help="test fraction per class where the layout has no split (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    parser.add_argument("--split-csv", help="your own split: CSV with source,label,split (source relative to SRC)")
    parser.add_argument("--format", choices=FORMATS, default="mp4", help="mp4: H.264 per video; jpg: one JPEG per frame (default mp4)")
    parser.add_argument("--short-side", type=int, default=256, help="short side in pixels; smaller videos are not upscaled (default 256)")
    parser.add_argument("--fps", type=float, default=30.0,
                        help="frame-rate cap: faster sources are down-sampled to it, slower ones keep their own rate "
                             "(default 30; see --fps-mode)")
    parser.add_argument("--fps-mode", choices=FPS_MODES, default="cap",
                        help="cap: never up-sample, a source at or below --fps keeps its rate; exact: re-time every "
                             "video to exactly --fps, repeating frames of slower sources (default cap)")
    parser.add_argument("--gop", type=int, default=DEFAULT.gop,
                        help=f"keyframe interval in frames (default {DEFAULT.gop}; 1 = intra-only)")
    parser.add_argument("--crf", type=int, default=DEFAULT.crf, help=f"H.264 quality, lower is better (default {DEFAULT.crf})")
    parser.add_argument("--preset", default=DEFAULT.preset, help=f"x264 preset (default {DEFAULT.preset})")
    parser.add_argument("--tune", default=DEFAULT.tune, choices=X264_TUNES,
                        help=f"x264 tune (default {DEFAULT.tune}; fastdecode: no CABAC and no "
                             "deblocking, decodes about twice as fast for a few percent more bytes)")
    parser.add_argument("--bframes", type=bframes_arg, default=DEFAULT.bframes,
                        help=f"consecutive B-frames, or 'preset' for the x264 preset's choice (default {DEFAULT.bframes})")
    parser.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality for --format jpg (default 90)")
    parser.add_argument("--shard-size", type=byte_size, default="256MB", help="close a shard once it reaches this size (default 256MB)")
    parser.add_argument("--train-per-class", type=int, default=0, metavar="N",
                        help="pack only N train videos per class (a seeded choice; val and test stay whole): the "
                             "few-label set for fine-tuning (default 0: all)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="encoding processes (default: min(4, CPU count))")
    parser.add_argument("--repack", action="store_true",
                        help="if OUT holds a pack made with other encoding settings or classes, remove its shards "
                             "and pack again (one line says what changed; split.csv is kept) instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not os.path.exists(args.src):
        print(f"error: SRC {args.src!r} does not exist", file=sys.stderr)
        return 2
    if os.path.isfile(args.out):
        print(f"error: --out {args.out!r} is a file; give a folder", file=sys.stderr)
        return 2
    try:
        settings = EncodeSettings(format=args.format, short_side=args.short_side, fps=args.fps, fps_mode=args.fps_mode, gop=args.gop,
                                  crf=args.crf, preset=args.preset, tune=args.tune, bframes=args.bframes,
                                  jpeg_quality=args.jpeg_quality)
        options = PackOptions(encode=settings, layout=args.layout, fold=args.fold, val=args.val, test=args.test,
                              seed=args.seed, split_csv=args.split_csv, shard_bytes=args.shard_size,
                              workers=args.workers, train_per_class=args.train_per_class, repack=args.repack)
        result = pack_videos(args.src, args.out, options, progress=not args.no_progress)
    except (PackError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result))
    if result.total_packed == 0:
        first = result.skipped[0] if result.skipped else None
        print(f"error: nothing packable in {args.src}: all {len(result.skipped)} sources were skipped"
              + (f" (first: {first.source}: {first.reason})" if first else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
