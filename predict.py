"""Top-k action classes of a video file, from a checkpoint written by train.py.

    python predict.py clip.mp4 --checkpoint runs/demo                      # the exported model
    python predict.py clip.mp4 --checkpoint runs/demo/checkpoints/latest   # or any checkpoint
    python predict.py clip.mp4 --onnx model.onnx                           # a model written by export.py
"""

import argparse
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description="Classify a video (any format PyAV reads) with a trained model: "
                                     "top-k classes with probabilities, averaged over several views.")
    parser.add_argument("video", help="video file")
    model_source = parser.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--checkpoint", help="run dir, checkpoints/latest, a step_XXXXXXX dir or a model.safetensors")
    model_source.add_argument("--onnx", help="a .onnx written by export.py: ONNX Runtime on the CPU, the "
                              "preprocessing its file records (same views and lines as --checkpoint)")
    parser.add_argument("--temporal-clips", type=int, default=None, help="temporal views (default: the run's eval setting)")
    parser.add_argument("--spatial-crops", type=int, default=None, choices=(1, 3),
                        help="spatial views (default: the run's eval setting)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    if not Path(args.video).is_file():
        print(f"error: video {args.video} does not exist", file=sys.stderr)
        return 2
    if (args.temporal_clips is not None and args.temporal_clips < 1) or args.top_k < 1:
        print("error: --temporal-clips and --top-k must be >= 1", file=sys.stderr)
        return 2

    from actionrec.config import ConfigError
    from actionrec.data import CorruptSample
    from actionrec.engine.checkpoint import CheckpointNotFound
    from actionrec.engine.inference import load_classifier, predict_video

    try:
        if args.onnx:
            from actionrec.engine.export import onnx_classifier

            classifier = onnx_classifier(args.onnx)
        else:
            classifier = load_classifier(args.checkpoint, args.device)
    except (CheckpointNotFound, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    temporal = args.temporal_clips or classifier.cfg.data.eval_temporal_clips
    spatial = args.spatial_crops or classifier.cfg.data.eval_spatial_crops
    try:
        probs = predict_video(classifier, args.video, temporal, spatial)
    except CorruptSample as exc:
        print(f"error: {args.video} cannot be decoded: {exc}", file=sys.stderr)
        return 1
    top = probs.topk(min(args.top_k, len(probs)))
    print(f"{args.video}: {temporal} temporal x {spatial} spatial views")
    width = max(len(classifier.classes[int(i)]) for i in top.indices)
    for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        print(f"{rank}. {classifier.classes[i]:<{width}}  {p:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
