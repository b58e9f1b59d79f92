"""train.compile=true goes through compile_model, which works around an Inductor assertion of the PyTorch releases
before its fix (seen on an H100 with torch 2.11) and changes nothing where Inductor has the fix."""

from __future__ import annotations

import torch._inductor.config as inductor_config

from actionrec.engine import compiling


def test_the_pinned_torch_has_the_fix_and_keeps_its_tiling_analysis():
    with inductor_config.patch({"triton.coalesce_tiling_analysis": True}):
        assert not compiling.inductor_has_tiling_assertion_bug()
        assert not compiling.avoid_inductor_tiling_assertion()
        assert inductor_config.triton.coalesce_tiling_analysis


def test_an_inductor_with_the_assertion_gets_the_analysis_switched_off(monkeypatch):
    buggy = "def _solve_simple_expr(expr):\n    assert not expr.has(ModularIndexing) and not expr.has(FloorDiv)\n"
    monkeypatch.setattr(compiling.inspect, "getsource", lambda module: buggy)
    with inductor_config.patch({"triton.coalesce_tiling_analysis": True}):  # restored on exit
        assert compiling.avoid_inductor_tiling_assertion()
        assert inductor_config.triton.coalesce_tiling_analysis is False
