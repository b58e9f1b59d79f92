"""train.py whose data side stalls: STALL_AT="STEP" and STALL_FIFO=PATH make every rank, when it fetches the
first micro batch of that optimizer step (1-based), open the FIFO at PATH for reading. Nothing ever writes to
it, so the open never returns: a read from a file system that stopped delivering, on every rank at once.
Everything else is the real trainer on the real loader, handed a data side of our own (the trainer's `data`
argument)."""

import os
import sys

from actionrec.data import RunData
from train import main

STALL_AT = int(os.environ["STALL_AT"])


class StallingData(RunData):
    def train_batches(self):
        for batch in super().train_batches():
            if int(batch["global_batch"]) + 1 == STALL_AT:
                with open(os.environ["STALL_FIFO"], "rb") as never:
                    never.read()
            yield batch


if __name__ == "__main__":
    code = main(data=StallingData.from_config)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
