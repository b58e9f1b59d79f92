"""Does masked pre-training help a few-label fine-tune? An in-memory comparison, one process on a CPU.

Videos are rendered into memory (no shards, no decoding): an unlabelled set (another seed of the same
generator, so pre-training never sees a test video), and a labelled set split 80/20 whose 80 % gives
`--labelled` videos per class for fine-tuning and whose 20 % is the held-out test. Then:

1. masked pre-training of the demo's encoder (`MaskedVideoModel`, the trainer's AdamW groups and schedule,
   masks as the trainer draws them) for `--pretrain-steps`;
2. the same fine-tune twice, from the pre-trained encoder and from scratch (same seed, data order, steps),
   scored on the held-out videos every `--eval-every` steps.

    python benchmarks/bench_pretrain.py --data motion4 --pretrain-steps 1000 --target motion --mask-ratio 0.25 global_pool=mean
    python benchmarks/bench_pretrain.py --data synth --mask-ratio 0.9 --decoder-depth 2      # VideoMAE's pixel target
    python benchmarks/bench_pretrain.py --data motion4 --variants scratch                   # one fine-tune only

Prints one JSON line per evaluation and a summary line (`--out` appends the result to a file). The real
commands (shards, 2 processes, configs/pretrain_demo.yaml + configs/finetune_demo.yaml) are in docs/pretrain.md.
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
from actionrec.models.masked import MaskedVideoModel  # noqa: E402
from benchmarks.in_memory import (DATA_SETS, eval_clips, held_out_split, linear_probe_top1, optimise,  # noqa: E402
                                  predictions_correct, render_set, train_clips)

MODEL = {"name": "timesformer_tiny", "attention_type": "divided_space_time", "embed_dim": 96, "depth": 4, "num_heads": 4}


@torch.no_grad()
def masked_loss_against_the_mean(model: MaskedVideoModel, clips: torch.Tensor, seed: int) -> dict[str, float]:
    """The masked loss on held-out clips (fixed masks) beside predicting the mean target (the best prediction
    that ignores the visible cubes: the targets' variance about their mean over these clips). A target worth
    keeping gets a ratio clearly below 1; a target that is mostly noise stays at 1 however long it trains."""
    model.eval()
    mask = model.random_mask(len(clips), torch.Generator().manual_seed(seed + 10_000))
    pred = torch.cat([model(clips[i : i + 64], mask[i : i + 64]) for i in range(0, len(clips), 64)])
    target = model.targets(clips, mask)
    model.train()
    loss = F.mse_loss(pred, target).item()
    predict_mean = (target - target.mean(dim=0)).pow(2).mean().item()
    return {"heldout_masked_loss": round(loss, 5), "heldout_predict_mean": round(predict_mean, 5),
            "heldout_ratio": round(loss / predict_mean, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=DATA_SETS, default="synth")
    parser.add_argument("--per-class", type=int, default=100, help="videos per class, labelled and unlabelled sets each")
    parser.add_argument("--labelled", type=int, default=8, help="labelled training videos per class")
    parser.add_argument("--pretrain-steps", type=int, default=1500)
    parser.add_argument("--pretrain-batch", type=int, default=32)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--decoder-depth", type=int, default=4)
    parser.add_argument("--decoder-dim", type=int, default=48)
    parser.add_argument("--raw-target", action="store_true", help="predict pixels without per-cube normalisation")
    parser.add_argument("--target", choices=["pixels", "motion", "hog"], default="pixels")
    parser.add_argument("--finetune-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--layer-decay", type=float, default=1.0,
                        help="fine-tuning: optim.layer_decay (VideoMAE: 0.75), for both fine-tunes")
    parser.add_argument("--drop-path", type=float, default=0.0,
                        help="fine-tuning: model.drop_path_rate (the last block's), for both fine-tunes")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", default="pretrained,scratch",
                        help="which fine-tunes to run (pretrained, scratch); `none`: pre-train (and save --encoder) only")
    parser.add_argument("--encoder", default="", help="load the pre-trained encoder from this file (skip pre-training), "
                        "or save it there after pre-training when the file does not exist")
    parser.add_argument("--probe-views", type=int, default=4,
                        help="linear probe: augmented training clips per labelled video (0: no probe)")
    parser.add_argument("--out", default="")
    parser.add_argument("options", nargs="*", help="model options key=value (as model.key=value in a run config)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    unlabelled, _, _ = render_set(args.data, 10, args.per_class, seed=321)
    videos, labels, names = render_set(args.data, 10, args.per_class, seed=123)
    rng = np.random.default_rng(args.seed)
    pool_idx, test_idx = held_out_split(len(labels), rng)
    train_idx = np.concatenate([pool_idx[labels[pool_idx] == c][: args.labelled] for c in range(len(names))])
    spec = ClipSpec(num_frames=8, sampling="dense", frame_stride=2, size=64)
    augment = TrainAugment()
    test_clips = eval_clips(videos, test_idx, spec)

    def recipe(lr: float, steps: int, warmup: int, betas=(0.9, 0.999), finetune: bool = False):
        model = {**MODEL, "drop_path_rate": args.drop_path if finetune else 0.0}
        return build_config({"data": {"num_frames": 8, "size": 64}, "model": model,
                             "optim": {"lr": lr, "warmup_steps": warmup, "betas": list(betas),
                                       "layer_decay": args.layer_decay if finetune else 1.0},
                             "train": {"max_steps": steps}}, overrides=[f"model.{pair}" for pair in args.options],
                            check_paths=False)

    def pretrain() -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        pre_cfg = recipe(args.pretrain_lr, args.pretrain_steps, min(100, args.pretrain_steps // 10), (0.9, 0.95))
        torch.manual_seed(args.seed)
        encoder = build_model(MODEL["name"], num_classes=1, **{**model_build_options(pre_cfg), "init": "scratch"})
        masked = MaskedVideoModel(encoder, mask_ratio=args.mask_ratio, decoder_dim=args.decoder_dim,
                                  decoder_depth=args.decoder_depth, norm_target=not args.raw_target,
                                  target=args.target)
        optimizer = build_optimizer(pre_cfg, masked)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(pre_cfg))
        pre_rng = np.random.default_rng([args.seed, 1])
        for step in tqdm(range(args.pretrain_steps), desc="pre-training", leave=False):
            video = train_clips(unlabelled, pre_rng.choice(len(unlabelled), args.pretrain_batch), spec, augment, pre_rng)
            mask = masked.random_mask(len(video), torch.Generator().manual_seed(args.seed * 1_000_003 + step))
            loss = F.mse_loss(masked(video, mask), masked.targets(video, mask))
            pre_losses.append(optimise(masked, loss, optimizer, schedule, pre_cfg.optim.grad_clip))
            if (step + 1) % args.eval_every == 0 or step + 1 == args.pretrain_steps:
                held_out.update(masked_loss_against_the_mean(masked, test_clips, args.seed))
                print(json.dumps({"phase": "pretrain", "step": step + 1, "loss": round(float(np.mean(pre_losses[-args.eval_every:])), 4),
                                  **held_out, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
        return {k: v.clone() for k, v in masked.encoder.state_dict().items()}

    # 1. masked pre-training (or its encoder from an earlier run of the same settings)
    pre_losses: list[float] = []
    held_out: dict[str, float] = {}
    encoder_file = Path(args.encoder) if args.encoder else None
    if "pretrained" not in args.variants and args.variants != "none":
        pretrained_state = {}
    elif encoder_file is not None and encoder_file.is_file():
        pretrained_state = torch.load(encoder_file)
    else:
        pretrained_state = pretrain()
        if encoder_file is not None:
            encoder_file.parent.mkdir(parents=True, exist_ok=True)
            torch.save(pretrained_state, encoder_file)

    if args.variants == "none":
        print(json.dumps({"data": args.data, "seed": args.seed, "target": args.target, "mask_ratio": args.mask_ratio,
                          "pretrain_steps": args.pretrain_steps, **held_out}), flush=True)
        return 0

    # 2. the same fine-tune from the pre-trained encoder and from scratch, each after a linear probe of its
    # frozen starting point (the pre-trained encoder, or the random one the scratch fine-tune starts from)
    results, probes = {}, {}
    probe_rng = np.random.default_rng([args.seed, 3])
    probe_idx = np.repeat(train_idx, args.probe_views)
    probe_train = train_clips(videos, probe_idx, spec, augment, probe_rng) if args.probe_views else None
    for variant in args.variants.split(","):
        cfg = recipe(args.lr, max(args.finetune_steps, 1), min(30, args.finetune_steps // 10), finetune=True)  # 0: probes only
        torch.manual_seed(args.seed)
        model = build_model(MODEL["name"], num_classes=len(names), **{**model_build_options(cfg), "init": "scratch"})
        if variant == "pretrained":
            missing = model.load_state_dict(pretrained_state, strict=False).missing_keys
            assert sorted(missing) == ["head.bias", "head.weight"], missing
        if probe_train is not None:
            probes[variant] = round(linear_probe_top1(model, probe_train, labels[probe_idx], test_clips,
                                                      labels[test_idx]), 3)
            print(json.dumps({"phase": variant, "linear_probe_top1": probes[variant]}), flush=True)
        optimizer = build_optimizer(cfg, model)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg))
        ft_rng = np.random.default_rng([args.seed, 2])
        history, losses = [], []
        start = time.perf_counter()
        for step in tqdm(range(args.finetune_steps), desc=f"fine-tuning ({variant})", leave=False):
            indices = ft_rng.choice(train_idx, args.batch)
            loss = F.cross_entropy(model(train_clips(videos, indices, spec, augment, ft_rng)), labels[indices],
                                   label_smoothing=0.1)
            losses.append(optimise(model, loss, optimizer, schedule, cfg.optim.grad_clip))
            if (step + 1) % args.eval_every == 0 or step + 1 == args.finetune_steps:
                top1 = predictions_correct(model, test_clips, labels[test_idx]).float().mean().item()
                row = {"phase": variant, "step": step + 1, "train_loss": round(float(np.mean(losses[-args.eval_every:])), 3),
                       "test_top1": round(top1, 3), "seconds": round(time.perf_counter() - start, 1)}
                history.append(row)
                print(json.dumps(row), flush=True)
        results[variant] = history
    summary = {"data": args.data, "seed": args.seed, "labelled_per_class": args.labelled,
               "pretrain_steps": args.pretrain_steps, "mask_ratio": args.mask_ratio, "decoder_depth": args.decoder_depth,
               "norm_target": not args.raw_target, "target": args.target, "finetune_steps": args.finetune_steps,
               "options": args.options, "lr": args.lr, "layer_decay": args.layer_decay, "drop_path": args.drop_path,
               "final_pretrain_loss": round(float(np.mean(pre_losses[-args.eval_every:])), 4) if pre_losses else None,
               **held_out,
               **{f"test_top1_{variant}": history[-1]["test_top1"] for variant, history in results.items() if history},
               **{f"probe_top1_{variant}": top1 for variant, top1 in probes.items()},
               "test_videos": len(test_idx)}
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps({**summary, "history": results}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
