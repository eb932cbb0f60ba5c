"""``particlize demo``: the whole job end to end on the embedded default, in a few minutes on a laptop CPU.

    particlize demo --out out/demo                # or: make demo

MiniLM (the real all-MiniLM-L6-v2, shipped as a wheel) is fine-tuned briefly on part of the VADER
movie-review sentences, decomposed into its particles (72 heads, 9,216 FFN neurons), analysed (a per-particle
table with Taylor scores beside the exact ablation of every head and block), compressed to half its FLOPs with
distillation after each round, evaluated on the held-out test sentences, and reported as one HTML page.
Everything is written under ``--out``: ``base/`` (the trained classifier), ``compressed/`` (the run: checkpoints, ``history.json``, the final model, ``report.html``).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from rich.table import Table
from torch import nn

from .adapters import decompose
from .errors import ParticlizeError
from .io import load
from .loop import CompressConfig
from .loop import compress as run_compress
from .measure import measure_latency
from .report import write_report
from .sources import load_tokenizer
from .tasks import get_task
from .train import fine_tune

#: a bar update: ``(done, total or None, what)``
Bar = Callable[[int, Optional[int], str], None]


@dataclass(frozen=True)
class DemoConfig:
    """How big the demo is: examples of the training / validation splits used, passes, target, recovery."""

    examples: int = 1500
    epochs: int = 1
    target_flops: float = 0.5
    recover_epochs: float = 0.3
    analyze_examples: int = 64
    seed: int = 0


def _summary_row(entry: dict[str, Any], test: float, latency_ms: float) -> dict[str, float]:
    return {"params": entry["params"], "flops_ratio": entry["flops_ratio"], "latency_ms": latency_ms,
            "test_accuracy": test}


def paired_latency(a: nn.Module, b: nn.Module, inputs: Any, rounds: int = 5) -> tuple[float, float]:
    """Median forward times (ms) of ``a`` and ``b`` on ``inputs``, measured alternately so that both see the same
    machine load (the loop's per-round latencies were measured minutes apart)."""
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(measure_latency(a, inputs, warmup=1, reps=3))
        tb.append(measure_latency(b, inputs, warmup=1, reps=3))
    return statistics.median(ta), statistics.median(tb)


def run_demo(out: Path, cfg: DemoConfig = DemoConfig(), *, force: bool = False,
             stage: Callable[[str], Bar] | None = None) -> dict[str, Any]:
    """Train → decompose → analyse → compress → evaluate → report under ``out``; the before / after summary.

    ``stage(name)`` returns a progress callback for each long step (the CLI draws Rich bars with it).
    Refuses a non-empty ``out`` unless ``force``. Writes ``out/summary.json`` last."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ParticlizeError(f"{out} already exists and is not empty; pass --force to replace the demo run there")

    def quiet(name: str) -> Bar:
        return lambda done, total, what: None
    stage = stage or quiet
    t0 = time.perf_counter()
    task = get_task("vader-sentiment")

    bar = stage("training MiniLM")
    base = fine_tune(task.name, out / "base", model="minilm", epochs=cfg.epochs, limit=cfg.examples,
                     seed=cfg.seed, force=True,
                     progress=lambda step, total, info: bar(step, total, f"loss {info.get('loss', float('nan')):.3f}"))
    model = load(base)
    tokenizer = load_tokenizer(str(base))
    test_before = json.loads((base / "particlize.json").read_text())["extra"]["metrics"]["test"]["accuracy"]
    bar = stage("decomposing")
    pm = decompose(model)
    bar(1, 1, f"{sum(g.size for g in pm.groups):,} particles in {len(pm.groups)} groups")

    bar = stage(f"compressing to {cfg.target_flops:.0%} of the FLOPs")
    config = CompressConfig.from_options(target_flops=cfg.target_flops, recover_epochs=cfg.recover_epochs,
                                         limit=cfg.examples, seed=cfg.seed)

    def progress(event: str, info: dict[str, Any]) -> None:
        if event == "recover":
            bar(info["step"], info["total"], f"round {info['round']}: recovering, loss {info.get('loss', 0):.3f}")
        elif event == "round":
            bar(0, None, f"round {info['round']}: FLOPs {info['flops_ratio']:.0%}, val accuracy {info['quality']:.3f}")

    result = run_compress(model, task, tokenizer=tokenizer, config=config, out=out / "compressed", force=True,
                          progress=progress)
    test_after = result.extra.get("compress", {}).get("test", {}).get("accuracy", float("nan"))
    bar(0, None, "timing dense and compressed side by side")
    inputs = task.latency_inputs(tokenizer, config.latency_batch, config.latency_seq)
    dense_ms, small_ms = paired_latency(load(base), result.model, inputs)

    bar = stage("analysing particles, writing the report")
    bar(0, 1, "taylor scores of every particle, exact ablation of every head and block")
    report = write_report(out / "compressed", task=task, force=True, limit=cfg.analyze_examples)
    bar(1, 1, str(report))
    summary = {
        "before": _summary_row(result.history[0], test_before, dense_ms),
        "after": _summary_row(result.returned, test_after, small_ms),
        "rounds": len(result.history) - 1, "target_met": bool(result.outcome and result.outcome.target_met),
        "report": str(report), "seconds": round(time.perf_counter() - t0, 1),
        "particles": int(sum(g.size for g in pm.groups)), "groups": len(pm.groups),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def summary_table(summary: dict[str, Any]) -> Table:
    """The before → after table the CLI prints."""
    b, a = summary["before"], summary["after"]
    t = Table(title="MiniLM sentiment classifier: before → after")
    for col in ("", "dense", "compressed", "ratio"):
        t.add_column(col, justify="right")
    t.add_row("parameters", f"{b['params']:,}", f"{a['params']:,}", f"{a['params'] / b['params']:.2f}×")
    t.add_row("FLOPs kept", f"{b['flops_ratio']:.0%}", f"{a['flops_ratio']:.0%}", f"{a['flops_ratio'] / b['flops_ratio']:.2f}×")
    t.add_row("latency (ms, 32 × 64 tokens)", f"{b['latency_ms']:.1f}", f"{a['latency_ms']:.1f}",
              f"{b['latency_ms'] / a['latency_ms']:.2f}× faster")
    t.add_row("test accuracy", f"{b['test_accuracy']:.3f}", f"{a['test_accuracy']:.3f}",
              f"{a['test_accuracy'] - b['test_accuracy']:+.3f}")
    return t


__all__ = ["DemoConfig", "paired_latency", "run_demo", "summary_table"]
