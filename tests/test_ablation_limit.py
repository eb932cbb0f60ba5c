"""benchmarks/ablation_limit.py run as a user runs it, on its two smallest models: a table row per model and the
same effects on both sides (it exits non-zero when they differ)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_small_run_prints_a_row_per_model_and_agrees():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "PZ_BENCH_THREADS": "1"}
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ablation_limit.py"), "--models", "sora-tiny",
                        "resnet-small", "--per-group", "1", "--rounds", "1"], capture_output=True, text=True, env=env,
                       timeout=600, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| sora-tiny") or line.startswith("| resnet-small")]
    assert len(rows) == 2 and all("×" in r for r in rows)
