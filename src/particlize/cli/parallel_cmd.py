"""``particlize parallel``: launch N local processes, shard the model across them and check it
(`particlize.parallel`).

Thin: `launch` runs `check_rank` on every rank and this prints a table.
"""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from ..errors import ParticlizeError
from ..parallel import check_rank, launch
from ._common import MODEL, TRUST_CODE, console


def parallel_command(
    model: str = MODEL,
    nproc: int = typer.Option(2, "--nproc", min=1, help="local processes (ranks), gloo on CPU"),
    task: Optional[str] = typer.Option(None, "--task", help="take the check batch from this task's data (default: random token ids)"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="examples in the check batch"),
    max_length: int = typer.Option(64, "--max-length", min=1, help="tokens per text"),
    iters: int = typer.Option(5, "--iters", min=1, help="sharded forwards timed per rank"),
    timeout: float = typer.Option(300.0, "--timeout", min=1.0, help="seconds before the ranks are stopped"),
    tol: float = typer.Option(1e-4, "--tol", min=0.0, help="largest accepted |sharded - whole| output difference"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Shard MODEL's heads and neurons over --nproc processes; check outputs against the whole model; report
    throughput and memory per rank. ``torchrun -m particlize.parallel MODEL`` does the same under torchrun."""
    rows = launch(check_rank, nproc, model, task, batch_size, max_length, iters, trust_code, timeout=timeout)
    table = Table("rank", "max |Δ| vs whole", "examples/s", "params (M)", "params (MB)",
                  "peak RSS (MB, incl. the whole model loaded first)")
    for r in rows:
        table.add_row(str(r["rank"]), f"{r['max_abs_diff']:.2e}", f"{r['examples_per_s']:.1f}",
                      f"{r['params'] / 1e6:.2f}", f"{r['param_mb']:.1f}", f"{r['peak_rss_mb']:.0f}")
    console().print(table)
    worst = max(r["max_abs_diff"] for r in rows)
    if worst > tol:
        raise ParticlizeError(f"sharded outputs differ from the whole model's by {worst:.2e} > --tol {tol:g}; "
                              "please report it with the model's class")
    console().print(f"{rows[0]['sharded_groups']} groups split over {nproc} ranks; outputs match the whole model "
                    f"(max |Δ| {worst:.1e})")


__all__ = ["parallel_command"]
