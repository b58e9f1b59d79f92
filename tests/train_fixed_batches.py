"""train.py with a fixed data order that does not depend on the world size (for the test that world size 1
and 2 follow the same loss trajectory at the same global batch).

The real loader gives each rank its own seeded stream, so world sizes 1 and 2 see different clips. Here all
train clips are decoded once, in key order, by the real eval loader; global batch s is clips
[s*G, (s+1)*G) and rank r trains on its slice of it, in per-device micro batches.
"""

import os
import sys

import torch

from actionrec.config import parse_config
from actionrec.engine import trainer


def fixed_train_batches(cfg, data, start_micro_batch, rank, world_size, position=None, device=None):
    from actionrec.data import build_eval_loader

    loader = build_eval_loader(data.shardset, split=cfg.data.train_split, clip=data.clip, batch_size=16,
                               num_workers=0, rank=0, world_size=1)
    clips = sorted((key, video, label) for batch in loader
                   for key, video, label in zip(batch["key"], batch["video"], batch["label"].tolist()))
    global_batch, per_device = cfg.train.global_batch_size, cfg.train.per_device_batch_size
    per_rank = global_batch // world_size
    micro = start_micro_batch
    accumulation = per_rank // per_device
    while True:
        step, part = divmod(micro, accumulation)
        first = step * global_batch + rank * per_rank + part * per_device
        chosen = [clips[(first + i) % len(clips)] for i in range(per_device)]
        yield {
            "video": torch.stack([c[1] for c in chosen]),
            "label": torch.tensor([c[2] for c in chosen]),
            "key": [c[0] for c in chosen],
        }
        micro += 1


if __name__ == "__main__":
    cfg, _ = parse_config(sys.argv[1:])
    trainer.train_batches = fixed_train_batches
    trainer.train(cfg)
    sys.stdout.flush()
    os._exit(0)
