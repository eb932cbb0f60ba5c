"""benchmarks/gpu_check.py (issue 29's unattended GPU check) run as a user runs it, on the CPU with --small:
every row ends with numbers or a recorded error, the numbers that are checks (not timings) hold, and bad
arguments give one line and a non-zero exit."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
ROWS = ["heads", "heads_nosplit", "all", "all_nosplit", "parts", "top50", "limit", "cuts_fp32", "cuts_bf16", "round_to",
        "latency_cost", "llama_unaligned", "llama_aligned", "llama_path", "kv_heads", "dit"]
# rows that must run on any CPU (the others may record a missing API or a missing peer as their error)
MUST_RUN = ["heads", "heads_nosplit", "all", "all_nosplit", "parts", "top50", "limit", "cuts_fp32", "cuts_bf16",
            "round_to", "latency_cost", "llama_unaligned", "llama_aligned", "llama_path", "dit"]


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def _report(tmp: Path, *only: str) -> dict:
    p = _run("--out", str(tmp), "--device", "cpu", "--small", *(["--only", *only] if only else []))
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads((tmp / "gpu_check.json").read_text())


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The whole --small run (about 15-30 s on the shared 2-core CPU)."""
    return _report(tmp_path_factory.mktemp("gpu_check"))


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_rows(report: dict, names: list[str]) -> dict[str, dict]:
    """Every row of ``names`` is there, in order, with numbers or a one-line error; returns the rows' details."""
    rows = {r["row"]: r for r in report["rows"]}
    assert list(rows) == names
    for name, r in rows.items():
        if r["error"]:
            assert isinstance(r["error"], str) and "\n" not in r["error"], name
        else:
            # the ratio is empty only where it is against a peer that is not installed
            assert _number(r["particlize"]) and (_number(r["ratio"]) or r["ratio"] is None), (name, r)
            assert r["passed"] in (True, False, None) and r["target"] and r["what"], name
    failed = {n: rows[n]["error"] for n in MUST_RUN if n in rows and rows[n]["error"]}
    assert not failed
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch"] == torch.__version__
    assert report["settings"]["small"] is True
    return {n: r.get("details") for n, r in rows.items()}


def test_cheap_rows(tmp_path: Path) -> None:
    """The default suite's share: the head ablation (engine = naive loop = Captum), the engine's arithmetic limit
    and the DiT sampler."""
    d = _check_rows(_report(tmp_path, "heads", "limit", "dit"), ["heads", "limit", "dit"])
    for part in d["limit"].values():  # the engine never schedules more work than the naive loop
        assert part["limit"] > 1.0 and 0 < part["engine_flops"] < part["naive_flops"]
    assert d["heads"]["max_abs_diff_vs_naive"] <= 1e-4  # the engine computes the naive loop's numbers
    if d["heads"]["max_abs_diff_vs_captum"] is not None:
        assert d["heads"]["max_abs_diff_vs_captum"] <= 1e-4
    assert d["dit"]["graph_max_abs_diff"] <= 1e-5  # the graph sampler's loop is the sampler's
    assert 0.45 <= d["dit"]["flops_kept"] <= 0.5


@pytest.mark.slow
def test_every_row_has_numbers_or_an_error(full: dict) -> None:
    _check_rows(full, ROWS)


@pytest.mark.slow
def test_checks_inside_the_rows_hold(full: dict) -> None:
    rows = _check_rows(full, ROWS)
    assert rows["heads"]["max_abs_diff_vs_naive"] <= 1e-4
    assert rows["top50"]["overlap_with_sweep_top_k"] >= 0.8  # top_particles finds the sweep's top k
    assert rows["llama_path"]["load_max_abs_diff"] <= 1e-4  # save → load gives the pruned model back
    assert rows["dit"]["graph_max_abs_diff"] <= 1e-5
    for part in rows["limit"].values():  # the engine never schedules more work than the naive loop
        assert part["limit"] >= 1.0 and part["engine_flops"] > 0
    unaligned, aligned = rows["llama_unaligned"]["layer0"]["ffn"], rows["llama_aligned"]["layer0"]["ffn"]
    assert aligned % 64 == 0 and aligned <= unaligned
    assert set(rows["cuts_fp32"]["particlize"]) == set(rows["cuts_fp32"]["torch_pruning"])


def test_a_wrong_device_gives_one_line_and_fails(tmp_path: Path) -> None:
    p = _run("--out", str(tmp_path), "--device", "tpu", timeout=120)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device 'tpu': use cuda or cpu" in lines[0], p.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def _main() -> Any:
    """gpu_check.main, imported in this process (the argument checks run before any model is built)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_and_unknown_rows_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = _main()
    assert main(["--out", str(tmp_path), "--device", "cuda"]) != 0
    assert main(["--out", str(tmp_path), "--device", "cpu", "--only", "heads", "nosuchrow"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no CUDA device" in err[0] and "unknown row(s) nosuchrow" in err[1]
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_the_engine_never_schedules_more_flops_than_the_naive_loop() -> None:
    """The arithmetic limit (naive FLOPs / engine FLOPs, counted while the engine runs) on the small classifier."""
    _main()  # puts benchmarks/ on the path
    import _gpu_ablation as A
    import _gpu_common as G

    import particlize as pz

    ctx = G.Ctx(torch.device("cpu"), G.Settings.make(True))
    pm = pz.decompose(G.build_classifier(True))
    batches = G.vader_like_batches(ctx, pm.model.encoder.config.vocab_size)
    heads = [g.name for g in pm.select("head")]
    last = pm.select("neuron")[-1].name
    lims = [A.engine_limit(pm, batches, groups) for groups in (heads, [last])]
    for lim in lims:
        assert 1.0 < lim["limit"] and 0 < lim["engine_flops"] < lim["naive_flops"]
    # the last layer's neurons only reach the head: far less work than rerunning the model per neuron
    assert lims[1]["limit"] > lims[0]["limit"]


def test_an_existing_report_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "gpu_check.json").write_text("{}")
    assert _main()(["--out", str(tmp_path), "--device", "cpu", "--small", "--only", "heads"]) != 0
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "gpu_check.json").read_text() == "{}"


def test_a_wheels_folder_without_the_peers_is_one_line_before_anything_is_written(tmp_path):
    (tmp_path / "wheels").mkdir()
    p = _run("--out", str(tmp_path / "o"), "--device", "cpu", "--small", "--wheels", str(tmp_path / "wheels"))
    assert p.returncode == 1 and "make gpu-wheels" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
