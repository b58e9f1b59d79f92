"""torch.compile for the trainer (train.compile=true), around an Inductor bug of the PyTorch releases before its fix.

Inductor's memory-coalescing analysis, a tiling heuristic of its GPU code generator, asserts that an index
expression it simplified holds no ModularIndexing / FloorDiv (`tiling_utils._solve_simple_expr`); nested ones
break that (pytorch/pytorch#191603, fixed by #191605, which returns "no tiling suggestion" instead). The
TimeSformer hits it: on an H100 with torch 2.11, compiling the model failed with `InductorError: AssertionError`
(benchmarks/gpu_check.py, 2026-11-28). Where the installed Inductor still has that assertion, the analysis is
switched off: it only chooses among tilings, and the kernels stay correct without it. The pinned torch has the fix.
"""

from __future__ import annotations

import inspect
import logging

import torch

logger = logging.getLogger(__name__)

_BUGGY_ASSERTION = "assert not expr.has(ModularIndexing) and not expr.has(FloorDiv)"


def inductor_has_tiling_assertion_bug() -> bool:
    """Whether this PyTorch's Inductor still asserts where the fixed one gives up gracefully."""
    try:
        from torch._inductor import tiling_utils

        return _BUGGY_ASSERTION in inspect.getsource(tiling_utils)
    except (ImportError, OSError, TypeError):  # no Inductor, or no source to read: nothing to work around
        return False


def avoid_inductor_tiling_assertion() -> bool:
    """Switch Inductor's coalescing analysis off where it has the assertion bug; True if it did."""
    if not inductor_has_tiling_assertion_bug():
        return False
    import torch._inductor.config as inductor_config

    inductor_config.triton.coalesce_tiling_analysis = False
    logger.info("torch %s: Inductor's coalescing analysis switched off (pytorch/pytorch#191603)", torch.__version__)
    return True


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(model), around the Inductor bug above."""
    avoid_inductor_tiling_assertion()
    return torch.compile(model)
