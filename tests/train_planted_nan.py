"""train.py with planted non-finite batches: PLANT_NAN="RANK:STEP,..." makes the clips that rank trains on at
that optimizer step (1-based) all NaN after normalisation, as a corrupt batch or an overflow would, so its loss
and then every gradient are NaN. Everything else is the real trainer on the real loader."""

import os
import sys

import torch

from actionrec.engine import trainer
from train import main

PLANTED = {tuple(int(x) for x in item.split(":")) for item in os.environ["PLANT_NAN"].split(",")}
real_train_batches, real_to_inputs = trainer.train_batches, trainer.Trainer.to_inputs
poison_next = False


def planted_train_batches(cfg, data, start_micro_batch, rank, world_size, position=None, device=None):
    global poison_next
    accumulation = cfg.train.global_batch_size // (cfg.train.per_device_batch_size * world_size)
    batches = real_train_batches(cfg, data, start_micro_batch, rank, world_size, position, device)
    for micro_batch, batch in enumerate(batches, start=start_micro_batch):
        poison_next = (rank, micro_batch // accumulation + 1) in PLANTED
        yield batch


def planted_to_inputs(self, video_uint8):
    video = real_to_inputs(self, video_uint8)
    return torch.full_like(video, float("nan")) if poison_next else video


if __name__ == "__main__":
    trainer.train_batches = planted_train_batches
    trainer.Trainer.to_inputs = planted_to_inputs
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
