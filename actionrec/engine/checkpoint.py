"""Atomic, self-describing checkpoints with a `latest` pointer, keep-last-K and automatic resume.

Layout of a run dir's `checkpoints/`:
    step_0000500/     accelerator.save_state (model, optimizer, scheduler, RNG of every rank, DeepSpeed
                      shards under ZeRO) + custom_checkpoint_0.pkl (TrainProgress: step, data position,
                      skipped count, world size) + config.yaml + classes.json; under ZeRO, once it has been
                      resumed on another number of processes, also universal/ (DeepSpeed's universal
                      checkpoint of it, see `CheckpointManager._load_resharded`)
    latest            one line, the name of the newest complete step dir (updated last, atomically)

Atomicity: every rank writes into `.tmp-step_XXXXXXX`, all ranks meet at a barrier, then rank 0 renames the
directory into place (one rename, atomic on POSIX) and only then replaces `latest`. A kill at any moment leaves
either the previous checkpoint or the new one, never a half-written directory that looks complete. The run
dir must be on a file system all ranks share (it is on a SLURM cluster's shared storage).

Faults: a write that fails (a full disk) on any rank fails on every rank with one line naming the folder and the
space needed, and leaves the previous checkpoint and `latest` as they were. On resume, a checkpoint that does not
load (a truncated file, a copy cut short) is reported, kept as `step_XXXXXXX.damaged`, and the next older one is
loaded instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from actionrec.atomic import write_atomic
from actionrec.engine.faults import CheckpointWriteError, folder_bytes, human_bytes, is_nearly_full, is_out_of_space

STEP_DIR = re.compile(r"^step_(\d{7,})$")
LATEST = "latest"


@dataclass
class TrainProgress:
    """Loop state saved with every checkpoint (registered with accelerator.register_for_checkpointing).

    Nothing saved depends on the number of processes: the optimizer step is the position of the run, and the
    data side's position (`data`) is global too, so a checkpoint resumes on any world size."""

    step: int = 0  # optimizer steps done (skipped non-finite steps included)
    skipped: int = 0  # corrupt samples skipped so far, summed over ranks
    nonfinite_steps: int = 0  # steps skipped for a non-finite loss or gradient norm so far
    # The data side's position (actionrec.data.RunData.state_dict): global batches consumed and what fixes the
    # order; the same on every rank and valid on any world size. Empty in checkpoints of earlier versions.
    data: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1  # processes of this run; saved, so a checkpoint says how many processes wrote it

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "skipped": self.skipped, "nonfinite_steps": self.nonfinite_steps,
                "data": self.data, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Earlier versions also saved `micro_batches` and `stream_positions` (per rank, of their resampled
        # order) and no `world_size` or `data`: not used.
        self.step = int(state["step"])
        self.skipped = int(state.get("skipped", 0))
        self.nonfinite_steps = int(state.get("nonfinite_steps", 0))
        self.data = dict(state.get("data", {}))


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


class CheckpointManager:
    """The checkpoints of one run dir. Without an accelerator it only reads (`latest`, `step_dirs`)."""

    def __init__(self, run_dir: Path, accelerator: Any = None, keep_last: int = 1, logger: Any = None,
                 seed: int = 0) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last
        self.logger = logger
        self.seed = seed  # the run's seed: the random states of a resume on another world size derive from it
        self.current: Path | None = None  # the checkpoint of the state in memory (loaded or saved by this run)

    def step_dirs(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def candidates(self) -> list[Path]:
        """Complete checkpoints to resume from, best first: the one `latest` names, then the others newest
        first. Every step_* dir is complete (it only appears by rename); the pointer is for people and tools,
        and is recovered from the dirs if a kill came between the two."""
        ordered = self.step_dirs()[::-1]
        pointer = self.dir / LATEST
        if pointer.is_file():
            named = self.dir / pointer.read_text().strip()
            if named in ordered:
                ordered.remove(named)
                ordered.insert(0, named)
        return ordered

    def latest(self) -> Path | None:
        candidates = self.candidates()
        return candidates[0] if candidates else None

    def resume(self) -> Path | None:
        """Collective: load the newest checkpoint every rank can load. One that fails to load on any rank (a
        truncated or damaged file) is reported with the reason, renamed to `<name>.damaged` (kept, never
        deleted; out of the way of resume, rotation and later saves) and the next older one is tried."""
        acc = self.accelerator
        damaged: list[Path] = []
        loaded = None
        for candidate in self.candidates():
            try:
                self.load(candidate)
                _check_rng_state(candidate, acc.process_index)
                failure = ""
            except CheckpointWorldSizeError:  # raised on every rank together; the checkpoint is not damaged
                raise
            except Exception as exc:  # noqa: BLE001 — any failure to load means this checkpoint cannot be used
                failure = f"{type(exc).__name__}: {_first_line(exc)}"
            failures = [(rank, text) for rank, text in enumerate(_from_all_ranks(failure)) if text]
            if not failures:
                loaded = candidate
                break
            rank, text = failures[0]
            self._warn(f"checkpoint {candidate} cannot be loaded (rank {rank}: {text}); "
                       "trying the next older complete checkpoint")
            damaged.append(candidate)
        if acc.is_main_process:
            for path in damaged:
                kept = _free_name(path.with_name(f"{path.name}.damaged"))
                os.rename(path, kept)
                self._warn(f"kept the damaged checkpoint as {kept} (delete it once you no longer need it)")
        acc.wait_for_everyone()
        if damaged and loaded is None:
            raise CheckpointNotFound(f"no checkpoint in {self.dir} can be loaded (damaged ones were kept as "
                                     "*.damaged): move the run dir away to start over, or restore a copy")
        return loaded

    def save(self, step: int, files: dict[str, str]) -> Path:
        """Collective: every rank calls it. `files` (name -> text) are written by rank 0 into the checkpoint.
        A write that fails on any rank (a full disk) fails on every rank with `CheckpointWriteError`; the
        partial temp dir is removed and the previous checkpoint and `latest` are untouched."""
        acc = self.accelerator
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if final == self.current:  # already saved at this step (e.g. the final save right after a periodic one)
            return final
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-step_*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp))
            if acc.is_main_process:
                for name, text in files.items():
                    (tmp / name).write_text(text)
            failure = None
        except Exception as exc:  # noqa: BLE001 — reported below, after every rank knows
            failure = _without_tracebacks(exc)
        if failure is not None:  # a full disk is recognised by its error, or by the disk: torch.save hides the errno
            failure_record = (is_out_of_space(failure) or is_nearly_full(self.dir), _first_line(failure))
        outcomes = _from_all_ranks(None if failure is None else failure_record)
        if any(outcomes):
            error = self._write_failed(final, tmp, outcomes)
            acc.wait_for_everyone()
            raise error from failure
        if acc.is_main_process:
            if final.is_dir():  # a checkpoint of an earlier attempt at this step (`latest` was moved back)
                os.rename(final, _free_name(final.with_name(f"{final.name}.superseded")))
            os.rename(tmp, final)
            write_atomic(self.dir / LATEST, final.name + "\n")
            for old in self.step_dirs()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        self.current = final
        return final

    def load(self, path: Path) -> None:
        """Collective: restore model, optimizer, scheduler, RNG and registered custom state. A checkpoint written
        by another number of processes is loaded as described in `_load_resharded`."""
        path = Path(path)
        written = written_world_size(path)
        if written and written != self.accelerator.num_processes:
            self._load_resharded(path, written)
        else:
            self.accelerator.load_state(str(path))
        self.current = path

    def _load_resharded(self, path: Path, written: int) -> None:
        """Load a checkpoint that `written` processes wrote into this run's (different) number of processes.

        Model, optimizer and scheduler state come back exactly: under DDP they are saved whole (rank 0's copy);
        under DeepSpeed ZeRO, whose optimizer state (and ZeRO-3 parameters) are partitioned per rank, the
        checkpoint is first converted once to DeepSpeed's universal checkpoint (`universal/` inside it, reused
        by later resumes) and loaded with `checkpoint.load_universal`. Random states are per rank and a rank
        of this run has no counterpart in the old one, so every rank seeds its generators from (seed, step,
        rank) instead: the resumed run is reproducible, and no two ranks share a dropout mask.
        Under DeepSpeed, anything that fails fails on every rank with `CheckpointWorldSizeError`: the
        checkpoint is not marked damaged (with its own number of processes it may well load)."""
        acc = self.accelerator
        here = acc.num_processes
        engines = _deepspeed_engines(acc)
        if not engines:  # DDP: every file but the random states is rank-independent; failures are as for any load
            acc.load_state(str(path))
        else:
            self._load_universal(path, written, engines)
        from accelerate.utils import set_seed

        step = int(STEP_DIR.match(path.name).group(1)) if STEP_DIR.match(path.name) else 0
        set_seed(_rank_seed(self.seed, step, acc.process_index))
        self._info(f"{path.name} was written by {written} process(es), resumed on {here}: model, optimizer and "
                   "scheduler state loaded exactly; random states seeded per rank from (seed, step, rank)")

    def _load_universal(self, path: Path, written: int, engines: list[Any]) -> None:
        """Collective: rank 0 converts `path` to a universal checkpoint (once), then every rank loads it."""
        acc = self.accelerator
        failure = ""
        if acc.is_main_process:
            try:
                started = time.perf_counter()
                source, converted = universal_checkpoint(path)
                if converted:
                    self._info(f"converted {path.name} (ZeRO, written by {written} processes) to a DeepSpeed "
                               f"universal checkpoint in {time.perf_counter() - started:.1f} s: {source}")
            except Exception as exc:  # noqa: BLE001 — reported on every rank below
                failure = f"{type(exc).__name__}: {_first_line(exc)}"
        failures = [text for text in _from_all_ranks(failure) if text]
        if failures:
            raise CheckpointWorldSizeError(_reshard_refusal(path, written, acc.num_processes, failures[0]))
        try:
            # What the DeepSpeed config key `checkpoint: {load_universal: true}` sets, for this one load only: the
            # engine reads the flag when it loads, and a same-size checkpoint must load the ordinary way.
            for engine in engines:
                engine._config.load_universal_checkpoint = True
            acc.load_state(str(path / UNIVERSAL_DIR))
            failure = ""
        except Exception as exc:  # noqa: BLE001 — reported on every rank below
            failure = f"{type(exc).__name__}: {_first_line(exc)}"
        finally:
            for engine in engines:
                engine._config.load_universal_checkpoint = False
        failures = [text for text in _from_all_ranks(failure) if text]
        if failures:
            raise CheckpointWorldSizeError(_reshard_refusal(path, written, acc.num_processes, failures[0]))

    def _write_failed(self, final: Path, tmp: Path, outcomes: list) -> CheckpointWriteError:
        """Clean up after a failed write (rank 0) and the one-line error every rank raises."""
        rank, (_, reason) = next((r, o) for r, o in enumerate(outcomes) if o)
        written = 0
        if self.accelerator.is_main_process:
            written = folder_bytes(tmp) if tmp.is_dir() else 0
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self.latest()
        kept = (f"the previous checkpoint {previous.name} and `latest` are untouched" if previous is not None
                else "no earlier checkpoint exists")
        if not any(o and o[0] for o in outcomes):
            return CheckpointWriteError(f"writing checkpoint {final.name} in {self.dir} failed on rank {rank}: "
                                        f"{reason}; {kept}")
        # A new checkpoint is about the size of the previous one, and needs room next to it (the oldest one
        # is deleted only once the new one is complete).
        needed = max(folder_bytes(previous) if previous is not None else 0, written)
        free = shutil.disk_usage(self.dir).free
        return CheckpointWriteError(
            f"no space left to write checkpoint {final.name} in {self.dir}: it needs about {human_bytes(needed)}, "
            f"{human_bytes(free)} is free there; {kept}. Free space (or lower train.keep_last, or move output_dir) "
            "and run the same command again to resume" + (f" from {previous.name}" if previous is not None else "")
            + f" (the write failed with: {reason})"
        )

    def _warn(self, message: str) -> None:
        if self.logger is not None and self.accelerator.is_main_process:
            self.logger.warning(message)

    def _info(self, message: str) -> None:
        if self.logger is not None and self.accelerator.is_main_process:
            self.logger.info(message)


# --- resuming on another number of processes ----------------------------------------------------------------

UNIVERSAL_DIR = "universal"  # inside a ZeRO step dir: the same checkpoint as a DeepSpeed universal checkpoint
DEEPSPEED_TAG = re.compile(r"^pytorch_model(_\d+)?$")  # the DeepSpeed tags Accelerate's save_state writes


def written_world_size(checkpoint: Path) -> int:
    """How many processes wrote `checkpoint` (0 if it does not say). Accelerate's save_state writes one
    `random_states_<rank>.pkl` per process in every backend (DDP, DeepSpeed), older checkpoints included;
    TrainProgress records the number as well."""
    return len(list(Path(checkpoint).glob("random_states_*.pkl")))


def universal_checkpoint(checkpoint: Path) -> tuple[Path, bool]:
    """`checkpoint/universal`: the ZeRO step dir `checkpoint` with every DeepSpeed tag in it converted by
    DeepSpeed's `ds_to_universal` (any ZeRO stage, any number of ranks to any other), next to copies of the
    step dir's own small files (scheduler, progress, random states). Made once (written aside, then renamed
    into place, so a kill leaves no half copy that looks whole); returns (path, whether it was made now)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    checkpoint = Path(checkpoint)
    target = checkpoint / UNIVERSAL_DIR
    if target.is_dir():
        return target, False
    tags = [p for p in checkpoint.iterdir() if p.is_dir() and DEEPSPEED_TAG.match(p.name)]
    if not tags:
        raise CheckpointNotFound(f"{checkpoint} holds no DeepSpeed checkpoint (pytorch_model/): it was not written "
                                 "under DeepSpeed")
    tmp = checkpoint / f".tmp-{UNIVERSAL_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for item in checkpoint.iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        for tag in tags:
            # One worker each: the converter's parallel mode forks this process, which holds the process group.
            # inject_missing_state: a plain nn.Module carries no Megatron-style universal-checkpoint info.
            args = Namespace(input_folder=str(tag), output_folder=str(tmp / tag.name), num_extract_workers=1,
                             num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                ds_to_universal(args)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.rename(tmp, target)
    return target, True


def _deepspeed_engines(accelerator: Any) -> list[Any]:
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return []
    return list(accelerator._models)  # what load_state calls load_checkpoint on: the DeepSpeed engines


def _rank_seed(seed: int, step: int, rank: int) -> int:
    """A seed per (run seed, step, rank): independent streams for the ranks, the same ones on every re-run."""
    import numpy as np

    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


def _reshard_refusal(path: Path, written: int, here: int, reason: str) -> str:
    return (f"checkpoint {path} was written by {written} process(es) and cannot be loaded by {here} ({reason}); "
            f"resume it with {written} process(es) (e.g. accelerate launch --num_processes {written}), or move "
            f"{path.parent.parent} away to start over")


def _without_tracebacks(exc: BaseException) -> BaseException:
    """`exc` and the exceptions it came from, without the tracebacks whose frames would keep a half-written
    file open (and its space taken) until they are collected."""
    seen, current = set(), exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.__traceback__ = None
        current = current.__cause__ or current.__context__
    return exc


def _check_rng_state(checkpoint: Path, rank: int) -> None:
    """Accelerate's load_state only logs a random-state file it cannot read, and the run would then go on with
    other random numbers than the uninterrupted one: a damaged one fails the load here. (A missing one is a
    resume on more ranks than saved it, which Accelerate allows.)"""
    path = checkpoint / f"random_states_{rank}.pkl"
    if path.exists():
        torch.load(path, weights_only=False)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`, ... whichever does not exist yet."""
    candidate, n = path, 0
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}.{n}")
    return candidate


def _from_all_ranks(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order (a collective; just [value] without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


# --- reading checkpoints outside the training loop (eval-only, predict, export) --------------------------


class CheckpointNotFound(FileNotFoundError):
    pass


class CheckpointWorldSizeError(CheckpointNotFound):
    """A complete checkpoint that cannot be resumed on this number of processes (caught where a missing
    checkpoint is: one line, no traceback). It is not damaged: resume() stops instead of trying older ones."""


def resolve_checkpoint(path: str | Path) -> Path:
    """A run dir, its checkpoints/ dir, a `latest` pointer, a step dir or a .safetensors file -> the
    step dir or weights file it means."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint {path} does not exist")
    if path.is_file() and path.suffix == ".safetensors":
        return path
    if path.is_dir() and STEP_DIR.match(path.name):
        return path
    if path.is_dir() and (path / "model.safetensors").is_file() and (path / "classes.json").is_file():
        return path / "model.safetensors"
    # checkpoints/latest, checkpoints/ or the run dir: the newest complete checkpoint, as resume finds it
    if path.is_file() and path.name == LATEST:
        run_dir = path.parent.parent
    else:
        run_dir = path.parent if path.name == "checkpoints" else path
    latest = CheckpointManager(run_dir).latest()
    if latest is not None:
        return latest
    raise CheckpointNotFound(
        f"{path} is not a checkpoint: give a run dir, checkpoints/latest, a step_XXXXXXX dir or a model.safetensors"
    )


def strip_wrapper_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DDP saves `module.`-prefixed keys, torch.compile `_orig_mod.`: the bare model has neither."""
    out = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def fp32_cpu_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bare-model keys, fp32 floating tensors, CPU, contiguous and unshared (what safetensors can save)."""
    return {
        k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous().clone()
        for k, v in strip_wrapper_prefixes(state).items()
    }


def load_fp32_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a resolved checkpoint as an fp32 state dict of the bare model (any backend:
    a plain/DDP step dir, a DeepSpeed ZeRO-2/3 step dir, or an exported model.safetensors)."""
    from safetensors.torch import load_file

    checkpoint = Path(checkpoint)
    if checkpoint.suffix == ".safetensors":
        state = load_file(str(checkpoint))
    elif (checkpoint / "model.safetensors").is_file():
        state = load_file(str(checkpoint / "model.safetensors"))
    elif (checkpoint / "pytorch_model").is_dir():
        # ZeRO shards -> full fp32 master weights (not the 16-bit module copy).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    else:
        raise CheckpointNotFound(f"{checkpoint} holds no model weights (model.safetensors or pytorch_model/)")
    return fp32_cpu_state_dict(state)


def checkpoint_metadata(checkpoint: Path) -> tuple[dict[str, Any], list[str]]:
    """(merged config mapping, class names) saved next to the weights, or inside an exported model.safetensors
    that was copied away from its run dir."""
    import yaml

    folder = Path(checkpoint).parent if Path(checkpoint).is_file() else Path(checkpoint)
    config_path, classes_path = folder / "config.yaml", folder / "classes.json"
    if config_path.is_file() and classes_path.is_file():
        return yaml.safe_load(config_path.read_text()), json.loads(classes_path.read_text())
    if Path(checkpoint).suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(checkpoint), "pt") as weights:
            metadata = weights.metadata() or {}
        if "config" in metadata and "classes" in metadata:
            return yaml.safe_load(metadata["config"]), json.loads(metadata["classes"])
    raise CheckpointNotFound(f"{folder} lacks config.yaml/classes.json: not a checkpoint written by train.py")


def weights_step(checkpoint: Path) -> int | None:
    """The training step of the weights in a resolved checkpoint: a step dir's own step, or the step an
    export records (train.py writes it into model.safetensors' metadata). An export from before that record
    takes the step of the newest checkpoint its run saved before it (the final checkpoint precedes the
    export). None where nothing says (a weights file from elsewhere)."""
    from safetensors import safe_open

    checkpoint = Path(checkpoint)
    if STEP_DIR.match(checkpoint.name):
        return int(STEP_DIR.match(checkpoint.name).group(1))
    with safe_open(str(checkpoint), framework="pt") as weights:
        recorded = (weights.metadata() or {}).get("step")
    if recorded is not None:
        return int(recorded)
    exported = checkpoint.stat().st_mtime
    before = [p for p in CheckpointManager(checkpoint.parent).step_dirs() if p.stat().st_mtime <= exported]
    return int(STEP_DIR.match(before[-1].name).group(1)) if before else None
