"""benchmarks/bench_checkpoint.py --smoke produces its table (the demo model: step time, checkpoint time, size)."""

import json

from tests.train_fixtures import PYTHON, REPO, run_env
import subprocess


def test_bench_checkpoint_smoke_writes_its_table(tmp_path):
    out = subprocess.run([PYTHON, "benchmarks/bench_checkpoint.py", "--smoke", "--out", str(tmp_path)], cwd=REPO,
                         env=run_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["model"] for r in rows] == ["demo"]
    assert rows[0]["checkpoint_s"] > 0 and rows[0]["bytes"] > 0 and rows[0]["step_s"] > 0
    assert (tmp_path / "table.md").read_text().startswith("| model | params |")
