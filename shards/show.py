"""What is in a packed shard set: summary, keys, or one sample's frames as PNGs.

    python shards/show.py OUT                      # splits, classes, frames per category, skipped sources
    python shards/show.py OUT --keys               # split, key, label of every sample
    python shards/show.py OUT --dump KEY [--to D]  # frames of one sample as D/frame_000.png ...
    python shards/show.py --audit runs/NAME        # per epoch of a run: videos trained on, missing, repeated
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.shards.catalog import describe, dump_sample, list_keys  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a folder written by shards/pack.py (holds dataset.json); with --audit, a run dir")
    parser.add_argument("--audit", action="store_true",
                        help="OUT is a run dir: read its sample log (samples/rank*.jsonl) and print, per epoch, the "
                        "training videos seen, missing and seen more than once")
    parser.add_argument("--keys", action="store_true", help="list split, key and label of every sample")
    parser.add_argument("--dump", metavar="KEY", help="write this sample's frames as PNG files")
    parser.add_argument("--to", help="folder for --dump (default OUT/dump/<KEY>)")
    args = parser.parse_args(argv)
    if args.audit:
        return audit_run(Path(args.out))
    if not (Path(args.out) / "dataset.json").is_file():
        print(f"error: {args.out} has no dataset.json: not a packed shard set (run shards/pack.py first)",
              file=sys.stderr)
        return 2
    if args.to and not args.dump:
        print("error: --to only goes with --dump KEY", file=sys.stderr)
        return 2
    if args.keys:
        for split, key, label in list_keys(args.out):
            print(f"{split}\t{key}\t{label}")
        return 0
    if args.dump:
        dest = Path(args.to) if args.to else Path(args.out) / "dump" / args.dump.replace("/", "_")
        try:
            paths = dump_sample(args.out, args.dump, dest)
        except KeyError as err:
            print(f"error: {err.args[0]}", file=sys.stderr)
            return 1
        print(f"wrote {len(paths)} frames of {args.dump} to {dest}")
        return 0
    print(describe(args.out))
    return 0


def audit_run(run_dir: Path) -> int:
    import yaml

    from actionrec.data.sample_log import SAMPLES_DIR, audit
    from actionrec.data.shardset import ShardSet
    from actionrec.shards.index import load_indexes

    if not (run_dir / SAMPLES_DIR).is_dir():
        print(f"error: {run_dir} has no {SAMPLES_DIR}/ folder: not a run dir, or trained with data.sample_log=false",
              file=sys.stderr)
        return 2
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    data = config.get("data", {})
    num_videos = None
    try:  # the training split's size as the run saw it: its shards' sample indexes
        shardset = ShardSet.open(data["shards"])
        num_videos = sum(len(index) for index in load_indexes(shardset.urls(data.get("train_split", "train")),
                                                               announce=False))
    except (KeyError, OSError, ValueError) as exc:
        print(f"note: the run's shard set cannot be opened ({exc}): missing videos are not counted", file=sys.stderr)
    result = audit(run_dir, num_videos, int(data.get("clips_per_video", 1)))
    print(result.table())
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
