"""Joining the process group so that torchrun's restarts (`accelerate launch --max_restarts N`) work.

torchrun's elastic agent keeps one TCPStore for the whole job, and its workers connect to it without a
per-attempt key prefix: the static rendezvous (Accelerate's default `rdzv_backend`) creates the store once and
hands it to every round, the c10d rendezvous shares its server across rounds too, and
`torch.distributed.rendezvous._create_c10d_store` gives workers a plain client ("we create a new TCPStore for
every retry so no need to add prefix", which does not hold for these). A group restarted after a crash
therefore reads the keys the failed group wrote. Seen on CPU with gloo (2 ranks, rank 1 SIGKILLed, torch
2.14): the new rank 0 read the dead rank 1's listening address, failed to connect 4 times and ended the attempt
(`Gloo connectFullMesh failed ... Connection refused, remote=[127.0.0.1]:3468`, the old rank 1's port), or both
new ranks waited in gloo's `Pair::waitUntilConnected` (py-spy) until the collective timeout; init's store
barrier counts the old arrivals too. The same cause hits NCCL's unique id (pytorch/pytorch#135712).

So under torchrun we join through a rendezvous handler of our own: torch's env:// rendezvous, with every key
behind a prefix naming the attempt (TORCHELASTIC_RESTART_COUNT). That count is per agent
(pytorch/pytorch#108158: an agent restarted for another node's failure keeps its count), so it names the
attempt consistently only when one agent runs every rank (one node); a job over several agents keeps torch's
plain env://, and its restarts go through `launch/slurm.py --max-failures` (a new job step, a new store).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

SCHEME = "actionrec-attempt"


def restart_count() -> int:
    """How many times torchrun has restarted this worker group (0 outside torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0)


def init_method() -> str | None:
    """The `init_method` that joins this attempt's own keys, or None (torch's env://) where no torchrun agent
    serves the store or the job spans several agents."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if os.environ.get("LOCAL_WORLD_SIZE") != os.environ.get("WORLD_SIZE"):
        return None
    import torch.distributed as dist

    try:
        dist.register_rendezvous_handler(SCHEME, _attempt_rendezvous)
    except RuntimeError:  # registered by an earlier Accelerator in this process
        pass
    return f"{SCHEME}://"


def attempt_store(restart: int | None = None) -> Any:
    """The keys of torchrun attempt `restart` (default: this one) in its agent's store; None where this process
    did not join through `init_method()`."""
    if _agent_store is None:
        return None
    import torch.distributed as dist

    return dist.PrefixStore(f"actionrec/attempt_{restart_count() if restart is None else restart}", _agent_store)


def describe_attempt(run_dir: Path, world_size: int) -> tuple[int, str]:
    """(this attempt's number, 1 = the first start; why it started): torchrun restarts (with what the failed
    attempt's watchdogs left in the store) and SLURM requeues (with the failure recorded in failures.jsonl)."""
    from actionrec.engine.watchdog import last_attempt
    from actionrec.slurm_restart import slurm_attempt

    restarts = restart_count()
    slurm_number, slurm_reason = slurm_attempt(run_dir)
    number = slurm_number + restarts
    if not restarts:
        return number, slurm_reason
    limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
    reason = f"torchrun restart {restarts} of at most {limit} (--max_restarts) after a failed attempt"
    previous = attempt_store(restarts - 1)
    if previous is None:
        return number, reason + " (its report above names the rank and exit status)"
    return number, f"{reason}: {last_attempt(previous, restarts - 1, world_size)}"


_agent_store: Any = None  # torchrun's store, once joined through _attempt_rendezvous


def _attempt_rendezvous(url: str, timeout: timedelta, **kwargs: Any) -> Iterator[tuple[Any, int, int]]:
    global _agent_store
    import torch.distributed as dist

    # the same URL as env:// (init_process_group added rank and world_size to its query)
    env_url = urlunparse(urlparse(url)._replace(scheme="env"))
    _agent_store, rank, world_size = next(dist.rendezvous(env_url, timeout=timeout, **kwargs))
    yield attempt_store(), rank, world_size
    raise RuntimeError("Unable to perform re-rendezvous using actionrec-attempt:// (torchrun restarts the process)")
