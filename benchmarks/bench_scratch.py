"""Which from-scratch set-up lets a model learn motion? An in-memory sweep, minutes per candidate on a CPU.

Videos are rendered once into memory (no shards, no decoding), then a registry model is trained on random
TSN clips with the trainer's own transforms and recipe (AdamW, warm-up + cosine, label smoothing, grad
clip) and scored on held-out videos (1 view) every `--eval-every` steps. Model options are given as
key=value, exactly as `model.options` in a run config:

    python benchmarks/bench_scratch.py --data motion4 --steps 800 init=scratch
    python benchmarks/bench_scratch.py --data motion4 --steps 800 init=vit          # the official set-up
    python benchmarks/bench_scratch.py --data synth --classes 4 --model timesformer_tiny attention_type=space_only
    python benchmarks/bench_scratch.py --data synth --steps 1500 --sampling dense --stride 2 --seed 2   # the demo's

Data sets: `synth` (the demo's generator, `--classes` of its classes) and `motion4` (the held-out generator
in `benchmarks/motion_heldout.py`). Prints one JSON line per evaluation and a final summary line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from actionrec.config import build_config  # noqa: E402
from actionrec.data.sampling import ClipSpec, eval_frame_indices, train_frame_indices  # noqa: E402
from actionrec.data.transforms import TrainAugment, eval_views, normalize_on_device, train_transform  # noqa: E402
from actionrec.engine.optim import build_optimizer, cosine_with_warmup  # noqa: E402
from actionrec.engine.run_model import model_build_options  # noqa: E402
from actionrec.models import build_model  # noqa: E402
from actionrec.shards.synthetic import ALL_CLASSES, render_video  # noqa: E402
from benchmarks.motion_heldout import DIRECTIONS, render_motion_video  # noqa: E402


CACHE = Path(__file__).resolve().parent / "out" / "scratch_sets"


def render_set(data: str, classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(N, T, C, H, W) uint8 videos and (N,) labels, rendered once and kept in benchmarks/out/scratch_sets
    (a sweep of many runs would otherwise spend a minute per run rendering the same videos)."""
    cached = CACHE / f"{data}-{classes}x{per_class}-seed{seed}.pt"
    if cached.is_file():
        return tuple(torch.load(cached, weights_only=False))
    result = _render_set(data, classes, per_class, seed)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{id(result)}")
    torch.save(list(result), tmp)
    tmp.replace(cached)
    return result


def _render_set(data: str, classes: int, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    names = list(DIRECTIONS) if data == "motion4" else list(ALL_CLASSES[:classes])
    videos, labels = [], []
    for label, name in enumerate(tqdm(names, desc=f"rendering {data}", leave=False)):
        for i in range(per_class):
            rng = np.random.default_rng([seed, label, i])
            video = render_motion_video(name, rng) if data == "motion4" else render_video(name, rng, 16, 64)
            videos.append(torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2))
            labels.append(label)
    return torch.stack(videos), torch.tensor(labels), names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=["synth", "motion4"], default="motion4")
    parser.add_argument("--classes", type=int, default=10, help="synth: how many of its classes")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--model", default="timesformer_tiny")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--sampling", choices=["uniform", "dense"], default="uniform")
    parser.add_argument("--stride", type=int, default=2, help="dense sampling: frames between sampled frames")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="", help="append the result as a JSON line to this file")
    parser.add_argument("options", nargs="*", help="model options key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    videos, labels, names = render_set(args.data, args.classes, args.per_class, seed=123)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(labels))
    cut = int(0.8 * len(order))
    train_idx, val_idx = order[:cut], order[cut:]
    spec = ClipSpec(num_frames=args.frames, sampling=args.sampling, frame_stride=args.stride, size=64)
    augment = TrainAugment()

    # A run config, so that model options are typed and checked as in train.py (`model.key=value` overrides)
    # and the model, optimiser (its weight-decay groups), schedule and loss are the trainer's own.
    model_section = {"name": args.model, **(dict(embed_dim=96, depth=4, num_heads=4)
                                            if args.model.startswith("timesformer") else {})}
    recipe = build_config({"data": {"num_frames": args.frames, "size": 64}, "model": model_section,
                           "optim": {"optimizer": "adamw", "lr": args.lr, "warmup_steps": args.warmup,
                                     "weight_decay": 0.05}, "train": {"max_steps": args.steps}},
                          overrides=[f"model.{pair}" for pair in args.options], check_paths=False)
    options = model_build_options(recipe)
    model = build_model(args.model, num_classes=len(names), **options)
    optimizer = build_optimizer(recipe, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(recipe))

    def batch_of(indices) -> torch.Tensor:
        clips = []
        for i in indices:
            frames = videos[i][train_frame_indices(spec, videos.shape[1], rng)]
            clips.append(train_transform(frames, spec, augment, rng).permute(1, 0, 2, 3))
        return normalize_on_device(torch.stack(clips))

    val_clips = normalize_on_device(torch.stack([
        eval_views(videos[i][eval_frame_indices(spec, videos.shape[1], 0, 1)], spec, 1)[0].permute(1, 0, 2, 3)
        for i in val_idx
    ]))

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            logits = torch.cat([model(val_clips[i : i + 64]) for i in range(0, len(val_clips), 64)])
        model.train()
        correct = logits.argmax(1) == labels[val_idx]
        per_class.update({name: round(correct[labels[val_idx] == c].float().mean().item(), 2)
                          for c, name in enumerate(names)})
        return correct.float().mean().item()

    history, losses, per_class = [], [], {}
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(args.steps), desc="training", leave=False):
        indices = rng.choice(train_idx, args.batch)
        loss = F.cross_entropy(model(batch_of(indices)), labels[indices], label_smoothing=recipe.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.optim.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            row = dict(step=step + 1, train_loss=round(float(np.mean(losses[-args.eval_every:])), 3),
                       val_top1=round(evaluate(), 3), seconds=round(time.perf_counter() - start, 1))
            history.append(row)
            print(json.dumps(row), flush=True)
    result = dict(data=args.data, classes=len(names), model=args.model, options=options, steps=args.steps,
                  seed=args.seed, lr=args.lr, per_class=args.per_class, sampling=args.sampling,
                  best_val_top1=max(r["val_top1"] for r in history), final_val_top1=history[-1]["val_top1"],
                  seconds=history[-1]["seconds"], final_per_class=per_class, history=history)
    print(json.dumps({k: v for k, v in result.items() if k != "history"}), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
