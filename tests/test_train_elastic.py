"""A run stopped with Ctrl-C on 2 processes mid-epoch resumes on 1 and on 3: the sample log continues exactly as
the uninterrupted run's (the same clips in every global batch) and the losses stay within 1e-4 of it (only the
reduction order differs). With DDP and with DeepSpeed ZeRO-2 (whose partitioned checkpoint is converted on load)."""

from __future__ import annotations

import collections
import json
import shutil
import signal

import pytest

from tests.test_train_faults import signal_after_steps
from tests.train_fixtures import BIN, launch, tiny_overrides, train_losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ACCELERATE = [str(BIN / "accelerate"), "launch"]
STEPS = 24
# 12 training videos x 2 clips in global batches of 6 (1 clip per process per micro batch): 4 steps an epoch,
# on 1, 2 or 3 processes (accumulation 6, 3, 2). No evaluation, no periodic checkpoint.
RUN = {"train.max_steps": STEPS, "train.global_batch_size": 6, "train.per_device_batch_size": 1,
       "data.clips_per_video": 2, "train.eval_every": 0, "train.checkpoint_every": 1000, "data.val_split": "",
       "data.test_split": "", "log.log_every": 1}
BACKENDS = {
    "ddp": ["--config_file", "configs/accelerate/cpu_2proc.yaml"],
    "zero2": ["--config_file", "configs/accelerate/zero2.yaml"],
}


def launcher(backend: str, processes: int) -> list[str]:
    return ACCELERATE + BACKENDS[backend] + ["--num_processes", str(processes)]


def global_batches(run_dir) -> dict[int, collections.Counter]:
    """Step -> the (key, clip) of every clip trained on in that step, over every rank's sample log."""
    steps: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for path in (run_dir / "samples").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]].update(zip(record["keys"], record["views"]))
    return steps


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_ctrl_c_on_two_processes_resumes_on_one_and_three_with_the_same_batches_and_losses(shards, runs, backend):
    reference = runs / f"{backend}_reference"
    ok(launch("train.py", tiny_overrides(shards, runs, reference.name, **RUN), launcher=launcher(backend, 2),
              timeout=600))
    stopped = runs / f"{backend}_stopped"
    code, stdout, stderr = signal_after_steps(
        [*launcher(backend, 2), "train.py", *tiny_overrides(shards, runs, stopped.name, **RUN)], stopped, 3,
        signal.SIGINT, whole_group=True, wait_s=480)
    assert code != 0 and "stopped by SIGINT after step" in stdout, stderr[-3000:]
    step = max(train_losses(stopped))  # usually mid-epoch: 4 steps an epoch
    expected_losses, expected_batches = train_losses(reference), global_batches(reference)
    for processes in (1, 3):
        resumed = runs / f"{backend}_resumed_on_{processes}"
        shutil.copytree(stopped, resumed)
        out = ok(launch("train.py", tiny_overrides(shards, runs, resumed.name, **RUN),
                        launcher=launcher(backend, processes), timeout=600))
        assert f"resumed from {resumed}/checkpoints/step_{step:07d} (step {step})" in out
        assert f"{processes} process(es)" in out
        batches = global_batches(resumed)
        assert sorted(batches) == list(range(1, STEPS + 1))  # cut back to the checkpoint, then continued
        assert all(batches[s] == expected_batches[s] for s in batches), processes  # the same clips, step by step
        losses = train_losses(resumed)
        for s in range(step + 1, STEPS + 1):
            assert losses[s] == pytest.approx(expected_losses[s], rel=1e-4), (processes, s)
        assert "train data: 12 of 12 videos per epoch (6 complete epoch(s)), 0 missing, 0 repeated" in out

