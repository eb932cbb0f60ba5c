"""benchmarks/taylor_memory.py run as a user runs it, on the small Llama stand-in: one row per side with a positive
peak, and an existing result kept unless --force."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "taylor_memory.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--shape", "small", "--batch", "2", "--seq", "16", "--dtype", "bf16",
                           *args], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)


def test_small_run_measures_each_side_and_keeps_what_exists(tmp_path):
    out = tmp_path / "mem.json"
    p = _run("--out", str(out))
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["side"] for r in rows] == ["particlize", "particlize-live", "torch-pruning"]
    assert all(r["dtype"] == "bf16" and r["peak_gib"] >= r["base_gib"] > 0 for r in rows)
    again = _run("--out", str(out))
    assert again.returncode != 0 and "pass --force" in again.stderr
