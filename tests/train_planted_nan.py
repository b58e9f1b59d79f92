"""train.py with planted non-finite batches: PLANT_NAN="RANK:STEP,..." makes the clips that rank trains on at
that optimizer step (1-based) all NaN after normalisation, as a corrupt batch or an overflow would, so its loss
and then every gradient are NaN. Everything else is the real trainer on the real loader, handed a data side of
our own (the trainer's `data` argument) instead of patching the trainer."""

import os
import sys

import torch

from actionrec.data import RunData
from actionrec.engine import trainer
from train import main

PLANTED = {tuple(int(x) for x in item.split(":")) for item in os.environ["PLANT_NAN"].split(",")}
real_to_inputs = trainer.Trainer.to_inputs
poison_next = False


class PlantedData(RunData):
    def train_batches(self):
        global poison_next
        for batch in super().train_batches():
            poison_next = (self.place.rank, int(batch["global_batch"]) + 1) in PLANTED
            yield batch


def planted_to_inputs(self, video_uint8):
    video = real_to_inputs(self, video_uint8)
    return torch.full_like(video, float("nan")) if poison_next else video


if __name__ == "__main__":
    trainer.Trainer.to_inputs = planted_to_inputs
    code = main(data=PlantedData.from_config)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
