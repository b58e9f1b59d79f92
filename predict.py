"""Top-k action classes of videos, from a checkpoint written by train.py.

    python predict.py clip.mp4 --checkpoint runs/demo                      # the exported model
    python predict.py clip.mp4 --checkpoint runs/demo/checkpoints/latest   # or any checkpoint
    python predict.py long.mp4 --checkpoint runs/demo --window 2s --stride 1s --out timeline/   # what happens when
    accelerate launch predict.py videos/ --checkpoint runs/demo --out preds.csv   # a folder, a CSV or a shard set
    python predict.py clip.mp4 --onnx model.onnx                           # a model written by export.py
    python predict.py clip.mp4 --checkpoint runs/demo --explain --out where/   # where the model looks
"""

import argparse
import sys
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Classify videos (any format PyAV reads) with a trained model: "
                                     "top-k classes with probabilities, averaged over several views. One file "
                                     "prints its top-k; with --window, a long file is scored window by window; "
                                     "a folder, a CSV (column path) or a shard set gives one CSV.")
    parser.add_argument("video", help="video file, folder of videos, CSV with a `path` column, or shard set dir")
    model_source = parser.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--checkpoint", help="run dir, checkpoints/latest, a step_XXXXXXX dir or a model.safetensors")
    model_source.add_argument("--onnx", help="a .onnx written by export.py: ONNX Runtime on the CPU, the "
                              "preprocessing its file records (same views and lines as --checkpoint)")
    parser.add_argument("--temporal-clips", type=int, default=None, help="temporal views (default: the run's eval setting)")
    parser.add_argument("--spatial-crops", type=int, default=None, choices=(1, 3),
                        help="spatial views (default: the run's eval setting)")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (auto: each process's GPU)")
    parser.add_argument("--window", default=None,
                        help="long video: score windows of this length, frames (64) or seconds (2.5s); each "
                             "window's frames are sampled as the run's evaluation samples a video")
    parser.add_argument("--stride", default=None, help="long video: window start every N frames or Ns (default: --window)")
    parser.add_argument("--smooth", type=int, default=1,
                        help="long video: segments from the mean probabilities of this many windows centred on each "
                             "(odd; default 1: each window alone); windows.csv keeps each window's own")
    parser.add_argument("--out", default=None,
                        help="with --window: a folder for windows.csv, segments.csv, timeline.png; with --explain: "
                             "a folder for the overlay and the importance plot; with a folder, "
                             "CSV or shard set: the CSV to write (re-running resumes it)")
    parser.add_argument("--explain", action="store_true",
                        help="one video file: write into --out DIR where the model looks in its evaluation clip "
                             "(the map: --explain-method): an overlay GIF, a "
                             "per-frame importance PNG and the map as .npy")
    parser.add_argument("--explain-method", default="auto",
                        choices=["auto", "rollout", "gradient-rollout", "gradcam", "occlusion"],
                        help="--explain's map: auto (default: occlusion for a TimeSformer, Grad-CAM for a CNN), "
                             "rollout / gradient-rollout (TimeSformer attention), gradcam (CNN trunk), occlusion "
                             "(any model; one forward per placement of a 2x2-patch square)")
    parser.add_argument("--split", default="test", help="shard set input: the split to score (default test)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args()


def check_args(args: argparse.Namespace) -> str | None:
    """The one-line problem with the arguments, or None."""
    source = Path(args.video)
    if not source.exists():
        return f"{args.video} does not exist"
    if (args.temporal_clips is not None and args.temporal_clips < 1) or args.top_k < 1:
        return "--temporal-clips and --top-k must be >= 1"
    single = source.is_file() and source.suffix.lower() != ".csv"
    if args.explain:
        if not single or args.window is not None:
            return "--explain maps one clip of one video file; give a video file and no --window"
        if args.checkpoint is None:
            return "--explain needs the model's weights: give --checkpoint (an ONNX model cannot be explained)"
        if args.out is None:
            return "--explain needs --out DIR for the overlay GIF and the importance plot"
    if (args.stride is not None or args.smooth != 1) and args.window is None:
        return "--stride and --smooth need --window"
    if args.smooth < 1 or args.smooth % 2 == 0:
        return f"--smooth {args.smooth}: give an odd number of windows >= 1 (1: no smoothing)"
    if args.window is not None:
        if not single:
            return "--window scores one long video file; give a video file, not a folder, CSV or shard set"
        from actionrec.engine.long_video import Span

        try:
            Span.parse(args.window), Span.parse(args.stride or args.window)
        except ValueError as exc:
            return f"--window/--stride: {exc}"
        if args.out is None:
            return "--window needs --out DIR for windows.csv, segments.csv and timeline.png"
    elif not single and args.out is None:
        return "a folder, CSV or shard set needs --out FILE.csv for the predictions"
    return None


def main() -> int:
    args = parse_args()
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    source = Path(args.video)
    single = source.is_file() and source.suffix.lower() != ".csv"

    from actionrec.config import ConfigError
    from actionrec.engine.checkpoint import CheckpointNotFound
    from actionrec.engine.inference import load_predictor, predictor_of
    from actionrec.engine.many_videos import device_for, init_distributed

    videos = None
    if not single:
        from actionrec.engine.many_videos import video_list

        try:
            videos = video_list(source, args.split)
        except (ValueError, KeyError, FileNotFoundError) as exc:
            print(f"error: {str(exc).strip(chr(34))}", file=sys.stderr)
            return 2
    rank, world_size, local_rank = (0, 1, 0) if single else init_distributed()
    if args.explain:
        return predict_explain(args)
    try:
        if args.onnx:
            from actionrec.engine.export import onnx_classifier

            predictor = predictor_of(onnx_classifier(args.onnx))
        else:
            predictor = load_predictor(args.checkpoint, device_for(local_rank, args.device))
    except (CheckpointNotFound, ConfigError) as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    temporal = args.temporal_clips or predictor.temporal_clips
    spatial = args.spatial_crops or predictor.spatial_crops
    if args.window is not None:
        return predict_long(args, predictor, temporal, spatial)
    if single:
        return predict_one(args, predictor, temporal, spatial)
    return predict_folder(args, videos, predictor, temporal, spatial, rank, world_size)


def predict_one(args: argparse.Namespace, predictor, temporal: int, spatial: int) -> int:
    from actionrec.data import CorruptSample
    from actionrec.data.decode import PyAVFrameReader
    from actionrec.engine.inference import predict_reader

    try:
        with PyAVFrameReader(Path(args.video).read_bytes()) as reader:
            probs = predict_reader(reader, predictor.spec, predictor.score_clips, temporal, spatial)
    except CorruptSample as exc:
        print(f"error: {args.video} cannot be decoded: {exc}", file=sys.stderr)
        return 1
    top = probs.topk(min(args.top_k, len(probs)))
    print(f"{args.video}: {temporal} temporal x {spatial} spatial views")
    width = max(len(predictor.classes[int(i)]) for i in top.indices)
    for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        print(f"{rank}. {predictor.classes[i]:<{width}}  {p:.4f}")
    return 0


def predict_explain(args: argparse.Namespace) -> int:
    from actionrec.config import ConfigError
    from actionrec.data import CorruptSample
    from actionrec.engine.checkpoint import CheckpointNotFound
    from actionrec.engine.explain import NotExplainable, explain_video, write_explanation
    from actionrec.engine.inference import load_classifier
    from actionrec.engine.many_videos import device_for

    try:
        classifier = load_classifier(args.checkpoint, device_for(0, args.device))
        explanation = explain_video(classifier, args.video, args.explain_method)
    except (CheckpointNotFound, ConfigError, NotExplainable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CorruptSample as exc:
        print(f"error: {args.video} cannot be decoded: {exc}", file=sys.stderr)
        return 1
    top = explanation.probs.topk(min(args.top_k, len(explanation.probs)))
    frames = explanation.frame_indices
    print(f"{args.video}: one clip (frames {frames[0]}-{frames[-1]}, centre crop); {explanation.method} over a "
          f"{'x'.join(map(str, explanation.grid))} (t x h x w) grid")
    for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        print(f"{rank}. {classifier.classes[i]}  {p:.4f}")
    if not bool((explanation.importance > 0).any()):
        print(f"note: the map is zero everywhere: under {explanation.method} no place raises the score of "
              f"{classifier.classes[int(top.indices[0])]}; try another --explain-method")
    for path in write_explanation(explanation, classifier.classes, Path(args.out), Path(args.video).stem):
        print(f"wrote {path}")
    return 0


def predict_long(args: argparse.Namespace, predictor, temporal: int, spatial: int) -> int:
    from actionrec.data import CorruptSample
    from actionrec.engine.long_video import Span, predict_long_video
    from actionrec.logging import progress_bar

    out = Path(args.out)
    window, stride = Span.parse(args.window), Span.parse(args.stride or args.window)
    try:
        result = predict_long_video(
            args.video, out, window, stride, predictor.spec, predictor.score_clips, predictor.classes, temporal,
            spatial, args.top_k,
            progress=lambda it: progress_bar(it, enabled=not args.no_progress, desc="windows", unit="window"),
            smooth=args.smooth)
    except CorruptSample as exc:
        print(f"error: {args.video} cannot be decoded: {exc}", file=sys.stderr)
        return 1
    print(f"{args.video}: {result.windows} windows of {result.window_frames} frames every {result.stride_frames} "
          f"({result.fps:g} fps), {temporal} temporal x {spatial} spatial views each; {len(result.segments)} segments"
          + (f" (top-1 of the mean of {args.smooth} windows)" if args.smooth > 1 else ""))
    for segment in result.segments[:20]:
        print(f"{segment.start_s:9.2f}-{segment.end_s:9.2f} s  {predictor.classes[segment.label]}  {segment.score:.4f}")
    if len(result.segments) > 20:
        print(f"... {len(result.segments) - 20} more in {out / 'segments.csv'}")
    print(f"wrote {out / 'windows.csv'}, {out / 'segments.csv'}, {out / 'timeline.png'}")
    return 0


def predict_folder(args: argparse.Namespace, videos, predictor, temporal: int, spatial: int, rank: int,
                   world_size: int) -> int:
    from actionrec.engine.many_videos import predict_many
    from actionrec.logging import progress_bar

    out = Path(args.out)
    if rank == 0:
        print(f"scoring {videos.what} on {world_size} process(es) into {out}")
    result = predict_many(
        videos, out, predictor, temporal, spatial, args.top_k, rank, world_size,
        progress=lambda it, total: progress_bar(it, total=total, enabled=rank == 0 and not args.no_progress,
                                                desc="videos", unit="video"))
    if rank == 0:
        for name, reason in result.failed:
            print(f"skipped {name}: cannot be decoded ({reason})", file=sys.stderr)
        print(f"{result.scored} videos scored, {result.already_done} already in {out} from an earlier run, "
              f"{len(result.failed)} skipped (cannot be decoded); wrote {out}")
    if world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
