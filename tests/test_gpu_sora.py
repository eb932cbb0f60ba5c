"""benchmarks/gpu_sora.py (issue 33's unattended GPU training + judging) run as a user runs it, on the CPU with
--small: it plans its steps from the probe, trains exactly those, saves a loadable model and judges it beside
sora-digits; a missing GPU and an existing result are refused with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import particlize as pz

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_sora.py"


def _run(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@pytest.mark.slow
def test_smoke_run_trains_the_planned_steps_and_judges_the_model(tmp_path):
    p = _run("--out", str(tmp_path), "--device", "cpu", "--small")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu_sora.json").read_text())
    assert res["probe"]["steps_per_s"] > 0 and res["train"]["steps_done"] == res["planned_steps"]
    assert not res["train"]["stopped_early"] and res["judges"]["returncode"] == 0
    model = pz.load(tmp_path / "sora-tiny")
    assert model.config.rope and model.config.frame_lag == 8  # the recipe the CPU runs settled on
    assert model.sample([3], steps=2).shape == (1, 1, 8, 32, 32)
    judged = json.loads((tmp_path / "judges.json").read_text())
    assert {r["model"] for r in judged["runs"]} >= {str(tmp_path / "sora-tiny"), "sora-digits"}
    again = _run("--out", str(tmp_path), "--device", "cpu", "--small")
    assert again.returncode != 0 and "pass --force" in again.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    p = _run("--out", str(tmp_path), "--device", "cuda", timeout=120)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("gpu_sora: --device cuda but torch sees no GPU")
