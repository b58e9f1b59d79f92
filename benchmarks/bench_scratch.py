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
from actionrec.data.sampling import ClipSpec  # noqa: E402
from actionrec.data.transforms import TrainAugment  # noqa: E402
from actionrec.engine.optim import build_optimizer, cosine_with_warmup  # noqa: E402
from actionrec.engine.run_model import model_build_options  # noqa: E402
from actionrec.models import build_model  # noqa: E402
from benchmarks.in_memory import (DATA_SETS, eval_clips, held_out_split, optimise, predictions_correct,  # noqa: E402
                                  render_set, train_clips)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=DATA_SETS, default="motion4")
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
    train_idx, val_idx = held_out_split(len(labels), rng)
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

    val_clips = eval_clips(videos, val_idx, spec)

    def evaluate() -> float:
        correct = predictions_correct(model, val_clips, labels[val_idx])
        per_class.update({name: round(correct[labels[val_idx] == c].float().mean().item(), 2)
                          for c, name in enumerate(names)})
        return correct.float().mean().item()

    history, losses, per_class = [], [], {}
    start = time.perf_counter()
    model.train()
    for step in tqdm(range(args.steps), desc="training", leave=False):
        indices = rng.choice(train_idx, args.batch)
        loss = F.cross_entropy(model(train_clips(videos, indices, spec, augment, rng)), labels[indices],
                               label_smoothing=recipe.optim.label_smoothing)
        losses.append(optimise(model, loss, optimizer, schedule, recipe.optim.grad_clip))
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
