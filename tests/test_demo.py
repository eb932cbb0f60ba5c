"""`particlize demo`: the whole job (train → decompose → compress → evaluate → report) wired end to end. The default
test runs it on the suite's tiny trained classifier in place of MiniLM on VADER; the real one is `slow`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import particlize as pz
import particlize.demo as demo
from particlize.errors import ParticlizeError


@pytest.fixture
def tiny_demo(trained_text, monkeypatch):
    """run_demo with the tiny classifier and task of `loop_fixture` standing in for MiniLM and VADER."""
    _, model, task, tok = trained_text

    def fake_fine_tune(task_name, out, **_):
        test = task.evaluate(model, "test", tokenizer=tok)
        return pz.save(model, out, tokenizer=tok, force=True, extra={"metrics": {"test": test}})

    monkeypatch.setattr(demo, "fine_tune", fake_fine_tune)
    monkeypatch.setattr(demo, "get_task", lambda name: task)
    return model, task, tok


def test_demo_runs_the_whole_job(tiny_demo, tmp_path):
    stages = []

    def stage(name):
        stages.append(name)
        return lambda done, total, what: None

    cfg = demo.DemoConfig(examples=64, target_flops=0.5, recover_epochs=0.5, analyze_examples=16)
    s = demo.run_demo(tmp_path / "demo", cfg, stage=stage)
    assert stages[0].startswith("training") and "report" in stages[-1]
    assert s["after"]["flops_ratio"] <= 0.5 + 1e-9 < s["before"]["flops_ratio"] == 1.0
    assert s["after"]["params"] < s["before"]["params"]
    assert all(0.0 <= s[k]["test_accuracy"] <= 1.0 for k in ("before", "after"))
    assert s["before"]["latency_ms"] > 0 and s["after"]["latency_ms"] > 0
    assert s["target_met"] and s["rounds"] >= 1
    html = (tmp_path / "demo" / "compressed" / "report.html").read_text()
    assert 'id="particle-maps"' in html or "Particle maps" in html
    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == json.loads(json.dumps(s))
    small = pz.load(tmp_path / "demo" / "compressed")  # the compressed model is an ordinary saved model
    assert sum(p.numel() for p in small.parameters()) == s["after"]["params"]
    table = demo.summary_table(s)
    assert [c.header for c in table.columns] == ["", "dense", "compressed", "ratio"] and table.row_count == 4


def test_demo_refuses_an_earlier_run_without_force(tmp_path):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "summary.json").write_text("{}")
    with pytest.raises(ParticlizeError, match="--force"):
        demo.run_demo(tmp_path / "demo")
    assert (tmp_path / "demo" / "summary.json").read_text() == "{}"


def test_paired_latency_times_each_model_alternately(monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "measure_latency", lambda m, inputs, **_: calls.append(m) or (1.0 if m is a else 3.0))
    a, b = torch.nn.Linear(8, 8), torch.nn.Identity()
    assert demo.paired_latency(a, b, torch.randn(4, 8), rounds=3) == (1.0, 3.0)
    assert calls == [a, b] * 3  # interleaved, so both see the same machine load


@pytest.mark.slow
def test_real_demo_on_minilm(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "particlize", "demo", "--out", str(out), "--examples", "300"],
                       capture_output=True, text=True, timeout=3600)
    assert r.returncode == 0, r.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["after"]["flops_ratio"] <= 0.5 + 1e-9 and (out / "compressed" / "report.html").is_file()
    assert "Report:" in r.stdout and "before → after" in r.stdout
