"""A checkpoint written by N processes resumes on M: the model and optimizer state after the load equal the saved
ones exactly (DDP, DeepSpeed ZeRO-2 and ZeRO-3, the latter through DeepSpeed's universal checkpoint), the
progress keeps the optimizer step, the random states are seeded per rank, and what cannot be converted is
refused in one line. Real processes (torchrun, gloo) on CPU; tiny TimeSformer. The data order across world
sizes is not checked here (the loader's part)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.train_fixtures import BIN, launch, run_env, tiny_overrides

PROBE = "tests/world_size_probe.py"


def probe(mode: str, nproc: int, out, runs, backend: str) -> dict:
    """Run tests/world_size_probe.py in `nproc` processes; the full state it wrote."""
    overrides = [
        f"name={backend}", f"output_dir={runs}", "model.name=timesformer_tiny", "model.init=vit",
        "data.num_frames=2", "data.size=32", "train.global_batch_size=6", "train.per_device_batch_size=1",
        "train.max_steps=10", "optim.warmup_steps=3",
    ]
    if backend != "ddp":
        overrides.append(f"deepspeed_config=configs/deepspeed/{backend}.json")
    torchrun = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"]
    result = launch(PROBE, [mode, str(out), *overrides], launcher=torchrun, timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-5000:]}"
    return torch.load(out, weights_only=False)


def assert_same_model_and_optimizer(loaded: dict, saved: dict) -> None:
    for key in ("param", "exp_avg", "exp_avg_sq"):
        assert set(loaded[key]) == set(saved[key])
        differ = [name for name in saved[key] if not torch.equal(loaded[key][name], saved[key][name])]
        assert not differ, f"{key} differs after the load for {differ}"
    assert any(v.abs().sum() > 0 for v in saved["exp_avg"].values())  # the moments really were trained
    assert loaded["adam_steps"] == saved["adam_steps"] == [2.0]
    assert loaded["lr"] == saved["lr"]


def assert_resumed_on(loaded: dict, saved: dict, nproc: int) -> None:
    assert saved["world_size"] == 2 and saved["progress"]["world_size"] == 2  # the checkpoint records it
    assert loaded["world_size"] == nproc
    assert loaded["progress"]["step"] == saved["progress"]["step"] == 2
    # every rank's generators seeded from (seed 0, step 2, rank): reproducible, and different per rank
    for rank, draws in enumerate(loaded["random_draws"]):
        seed = int(np.random.SeedSequence([0, 2, rank]).generate_state(1)[0])
        assert draws == torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()
    assert np.isfinite(loaded["loss_after"])  # and the loaded optimizer takes the next step


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("backend,resume_on", [("ddp", (1, 3)), ("zero2", (1, 3)), ("zero3", (1,))])
def test_checkpoint_of_two_processes_loads_exactly_on_another_number(backend, resume_on, runs):
    saved = probe("save", 2, runs / f"{backend}_saved.pt", runs, backend)
    step_dir = runs / backend / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in step_dir.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    for nproc in resume_on:
        loaded = probe("load", nproc, runs / f"{backend}_on{nproc}.pt", runs, backend)
        assert_same_model_and_optimizer(loaded, saved)
        assert_resumed_on(loaded, saved, nproc)
    # ZeRO: converted once, to a DeepSpeed universal checkpoint inside the step dir (reused by the second load)
    assert (step_dir / "universal" / "pytorch_model" / "zero").is_dir() == (backend != "ddp")


@pytest.mark.distributed
@pytest.mark.slow
def test_zero2_run_resumes_on_one_process_and_a_damaged_shard_is_refused_in_one_line(shards, runs):
    """train.py end to end: 2 processes under ZeRO-2 to step 4, then the same command on 1 process finishes
    the run from that checkpoint. A copy whose optimizer shard was cut short cannot be converted: one line
    says so and what to do, and the checkpoint is left as it was (not taken for damaged and set aside)."""
    zero2 = {"deepspeed_config": "configs/deepspeed/zero2.json", "train.max_steps": 4, "train.eval_every": 0,
             "data.val_split": "", "data.test_split": ""}
    args = tiny_overrides(shards, runs, "z2", **zero2)
    first = launch("train.py", args, nproc=2, timeout=300)
    assert first.returncode == 0, first.stderr[-5000:]
    cut = runs / "z2_cut"
    shutil.copytree(runs / "z2", cut)
    shard = cut / "checkpoints" / "step_0000004" / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])

    resumed = launch("train.py", tiny_overrides(shards, runs, "z2", **{**zero2, "train.max_steps": 6}), timeout=300,
                     launcher=[str(BIN / "torchrun"), "--standalone", "--nproc_per_node=1"], env=run_env())
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    log = resumed.stdout + resumed.stderr
    assert "converted step_0000004 (ZeRO, written by 2 processes) to a DeepSpeed universal checkpoint" in log
    assert "resumed from" in log and "(step 4)" in log
    assert (runs / "z2" / "checkpoints" / "latest").read_text().strip() == "step_0000006"

    refused = launch("train.py", tiny_overrides(shards, runs, "z2_cut", **zero2), timeout=300,
                     launcher=[str(BIN / "torchrun"), "--standalone", "--nproc_per_node=1"])
    assert refused.returncode != 0  # (train.py exits 2; torchrun reports it as 1)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, refused.stderr[-3000:]
    assert errors[0].startswith(f"error: checkpoint {cut / 'checkpoints' / 'step_0000004'} was written by 2 "
                                "process(es) and cannot be loaded by 1 (")
    assert "resume it with 2 process(es)" in errors[0]
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["latest", "step_0000004"]
    assert not list((cut / "checkpoints" / "step_0000004").glob("*universal"))  # no half conversion left


def test_progress_of_an_older_checkpoint_loads_and_keeps_the_optimizer_step():
    """Checkpoints written before the world size was recorded hold per-rank micro-batch counts and stream
    positions instead of a data position."""
    from actionrec.engine.checkpoint import TrainProgress

    progress = TrainProgress(world_size=3)
    progress.load_state_dict({"step": 5, "micro_batches": 20, "skipped": 1, "nonfinite_steps": 0,
                              "stream_positions": [{"epoch": 0, "clips": [3]}]})
    assert (progress.step, progress.skipped, progress.data) == (5, 1, {})
    saved = progress.state_dict()
    assert saved["world_size"] == 3 and "micro_batches" not in saved and "stream_positions" not in saved
