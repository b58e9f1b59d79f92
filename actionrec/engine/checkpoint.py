"""Atomic, self-describing checkpoints with a `latest` pointer, keep-last-K and automatic resume.

Layout of a run dir's `checkpoints/`:
    step_0000500/     accelerator.save_state (model, optimizer, scheduler, RNG of every rank, DeepSpeed
                      shards under ZeRO) + custom_checkpoint_0.pkl (TrainProgress: step, data position,
                      skipped count) + config.yaml + classes.json
    latest            one line, the name of the newest complete step dir (updated last, atomically)

Atomicity: every rank writes into `.tmp-step_XXXXXXX`, all ranks meet at a barrier, then rank 0 renames the
directory into place (one rename, atomic on POSIX) and only then replaces `latest`. A kill at any moment leaves
either the previous checkpoint or the new one, never a half-written directory that looks complete. The run
dir must be on a file system all ranks share (it is on a SLURM cluster's shared storage).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from actionrec.atomic import write_atomic

STEP_DIR = re.compile(r"^step_(\d{7,})$")
LATEST = "latest"


@dataclass
class TrainProgress:
    """Loop state saved with every checkpoint (registered with accelerator.register_for_checkpointing)."""

    step: int = 0  # optimizer steps done
    micro_batches: int = 0  # train batches consumed per rank: the data position to resume from
    skipped: int = 0  # corrupt samples skipped so far, summed over ranks

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.micro_batches = int(state["micro_batches"])
        self.skipped = int(state.get("skipped", 0))


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


class CheckpointManager:
    """The checkpoints of one run dir. Without an accelerator it only reads (`latest`, `step_dirs`)."""

    def __init__(self, run_dir: Path, accelerator: Any = None, keep_last: int = 1) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.accelerator = accelerator
        self.keep_last = keep_last

    def step_dirs(self) -> list[Path]:
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))

    def latest(self) -> Path | None:
        """The newest complete checkpoint. Every step_* dir is complete (it only appears by rename); the
        pointer is for people and tools, and is recovered from the dirs if a kill came between the two."""
        pointer = self.dir / LATEST
        if pointer.is_file():
            candidate = self.dir / pointer.read_text().strip()
            if candidate.is_dir():
                return candidate
        dirs = self.step_dirs()
        return dirs[-1] if dirs else None

    def save(self, step: int, files: dict[str, str]) -> Path:
        """Collective: every rank calls it. `files` (name -> text) are written by rank 0 into the checkpoint."""
        acc = self.accelerator
        final = self.dir / step_dir_name(step)
        tmp = self.dir / f".tmp-{step_dir_name(step)}"
        if final.is_dir():  # already saved at this step (e.g. the final save right after a periodic one)
            return final
        if acc.is_main_process:
            self.dir.mkdir(parents=True, exist_ok=True)
            for stale in self.dir.glob(".tmp-step_*"):  # left by a killed run
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        if acc.is_main_process:
            for name, text in files.items():
                (tmp / name).write_text(text)
        acc.wait_for_everyone()
        if acc.is_main_process:
            os.rename(tmp, final)
            write_atomic(self.dir / LATEST, final.name + "\n")
            for old in self.step_dirs()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path) -> None:
        """Collective: restore model, optimizer, scheduler, RNG and registered custom state."""
        self.accelerator.load_state(str(path))


# --- reading checkpoints outside the training loop (eval-only, predict, export) --------------------------


class CheckpointNotFound(FileNotFoundError):
    pass


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
    """(merged config mapping, class names) saved next to the weights."""
    import yaml

    folder = Path(checkpoint).parent if Path(checkpoint).is_file() else Path(checkpoint)
    config_path, classes_path = folder / "config.yaml", folder / "classes.json"
    if not config_path.is_file() or not classes_path.is_file():
        raise CheckpointNotFound(f"{folder} lacks config.yaml/classes.json: not a checkpoint written by train.py")
    return yaml.safe_load(config_path.read_text()), json.loads(classes_path.read_text())
