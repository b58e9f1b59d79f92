"""What is in a packed shard set: summary, keys, or one sample's frames as PNGs.

    python shards/show.py OUT                      # splits, classes, frames per category, skipped sources
    python shards/show.py OUT --keys               # split, key, label of every sample
    python shards/show.py OUT --dump KEY [--to D]  # frames of one sample as D/frame_000.png ...
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.shards.catalog import describe, dump_sample, list_keys  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="a folder written by shards/pack.py (holds dataset.json)")
    parser.add_argument("--keys", action="store_true", help="list split, key and label of every sample")
    parser.add_argument("--dump", metavar="KEY", help="write this sample's frames as PNG files")
    parser.add_argument("--to", help="folder for --dump (default OUT/dump/<KEY>)")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
