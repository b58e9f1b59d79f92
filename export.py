"""Export a trained run as one self-contained model file with its preprocessing spec and class names.

    python export.py runs/demo --format onnx --out model.onnx    # ONNX (ONNX Runtime, TensorRT, ...)
    python export.py runs/demo --format pt2 --out model.pt2      # torch.export's ExportedProgram

The batch size is dynamic; frames and size are the run's (docs/export.md says why and what the spec holds).
"""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description="Export a run's model (fp32, batch size dynamic, frames and size "
                                     "fixed) with its preprocessing spec and class names inside the file.")
    parser.add_argument("checkpoint", help="run dir, checkpoints/latest, a step_XXXXXXX dir or a model.safetensors")
    parser.add_argument("--format", choices=("onnx", "pt2"), default="onnx",
                        help="onnx: ONNX model (spec in metadata_props); pt2: torch.export archive (spec as an extra file)")
    parser.add_argument("--out", type=Path, default=None, help="output file (default: model.onnx / model.pt2 in the run dir)")
    args = parser.parse_args()
    if not Path(args.checkpoint).exists():
        print(f"error: checkpoint {args.checkpoint} does not exist", file=sys.stderr)
        return 2
    out = args.out or (Path(args.checkpoint) if Path(args.checkpoint).is_dir() else Path(args.checkpoint).parent) / f"model.{args.format}"
    if out.suffix != f".{args.format}":
        print(f"error: --out {out} should end in .{args.format} for --format {args.format}", file=sys.stderr)
        return 2

    from actionrec.config import ConfigError
    from actionrec.engine.checkpoint import CheckpointNotFound
    from actionrec.engine.export import export_run

    try:
        spec = export_run(args.checkpoint, args.format, out)
    except (CheckpointNotFound, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {spec['model']}, {len(spec['classes'])} classes, input {spec['input']['name']} "
          f"(batch, 3, {spec['num_frames']}, {spec['size']}, {spec['size']}) float32 normalised, batch dynamic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
