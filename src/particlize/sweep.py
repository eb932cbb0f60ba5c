"""Choosing particle size: the same FLOPs targets reached by removing heads, neurons, blocks or all of
them, each with the same recovery budget, side by side in one table and a Pareto plot."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from .adapters import decompose
from .errors import ParticlizeError
from .io import write_folder_atomically
from .allocate import GRANULARITIES, smallest_shares
from .loop import CompressConfig, compress
from .tasks import Task

Progress = Callable[[str, dict[str, Any]], None]


def sweep(
    model: nn.Module,
    task: Task,
    *,
    tokenizer: Any = None,
    granularities: Sequence[str] = ("heads", "neurons", "blocks", "all"),
    flops: Sequence[float] = (0.9, 0.7, 0.5, 0.3),
    out: str | os.PathLike[str],
    force: bool = False,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> pd.DataFrame:
    """Compress ``model`` to every FLOPs target at every granularity (an independent run each, the same
    options and recovery budget) and write ``sweep.csv`` and ``pareto.png`` (quality vs FLOPs and vs
    measured latency) to ``out``. Returns the table: one row per (granularity, target); ``runs_to`` is the
    target the run was given (the smallest model the granularity allows, when the target is below it).
    ``device``: where the runs happen (None: where ``model`` is; else it is moved there), as in `compress`."""
    bad = [g for g in granularities if g not in GRANULARITIES and g != "all"]
    if bad:
        raise ParticlizeError(f"unknown granularity {bad}; use {', '.join(GRANULARITIES)} or all")
    if not flops or any(not 0 < f < 1 for f in flops):
        raise ParticlizeError(f"FLOPs targets are fractions in (0, 1); got {list(flops)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise ParticlizeError(f"{out} already exists and is not empty; pass --force to replace it")
    emit = progress or (lambda e, i: None)
    base = CompressConfig.from_options(**{**options, "target_flops": flops[0], "granularity": tuple(granularities)})
    base.check()
    model = model.to(device) if device is not None else model
    pm = decompose(model, seq_len=base.max_length)
    pm_device, pm_dtype = next(model.parameters()).device, next(model.parameters()).dtype
    rows = []
    for g in granularities:
        # run target -> (row, why it stopped): the targets below the smallest model share one run
        done: dict[float, tuple[dict[str, Any], str]] = {}
        for f in sorted(flops, reverse=True):
            cfg = CompressConfig.from_options(**{**options, "target_flops": f, "granularity": (g,)})
            least = smallest_shares(pm, cfg.allocation.for_device(pm_device, pm_dtype))[0]  # as compress will run it
            note = ""
            if f < least < 1:  # below what this granularity can reach: run to the smallest model it allows
                cfg.target.flops = least
                note = f"ran to {least:.3f} of the FLOPs instead, the least removing {g} allows (min_width {cfg.allocation.min_width:g}): "
            emit("run", {"granularity": g, "target": f, "runs_to": cfg.target.flops})
            if cfg.target.flops in done:
                row, why = done[cfg.target.flops]
                rows.append({**row, "target_flops": f, "reached": row["flops_ratio"] <= f + 1e-9, "reason": note + why})
                continue
            try:
                res = compress(model, task, tokenizer=tokenizer, config=cfg,
                               progress=lambda e, i: emit(e, {**i, "granularity": g, "target": f}))
            except ParticlizeError as e:  # e.g. a granularity with nothing to prune in this model
                rows.append({"granularity": g, "target_flops": f, "error": str(e)})
                continue
            last, first = res.returned, res.history[0]  # the returned model (a run below its floor rolls back)
            test = task.quality(res.model, "test", tokenizer=tokenizer, max_length=cfg.max_length)
            rows.append({
                "granularity": g, "target_flops": f, "flops_ratio": last["flops_ratio"], "params": last["params"],
                "latency_ms": last["latency_ms"], "dense_latency_ms": first["latency_ms"],
                "val_quality": last["quality"], "test_quality": test["quality"],
                **({"val_accuracy": last["val_accuracy"], "test_accuracy": test["accuracy"]} if "accuracy" in test else {}),
                "rounds": last["round"], "reached": last["flops_ratio"] <= f + 1e-9, "runs_to": cfg.target.flops,
                "reason": note + res.reason,
            })
            done[cfg.target.flops] = rows[-1], res.reason
    df = pd.DataFrame(rows)

    def fill(tmp: Path) -> None:
        df.to_csv(tmp / "sweep.csv", index=False)
        if "flops_ratio" in df:
            pareto_plot(df.dropna(subset=["flops_ratio"]), tmp / "pareto.png")

    write_folder_atomically(out, fill, force=True)
    return df


def pareto_plot(df: pd.DataFrame, path: Path) -> None:
    """Test accuracy (or the task's quality) against FLOPs kept and against measured latency, one line
    per granularity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col, label, scale = ("test_accuracy", "test accuracy (%)", 100) if "test_accuracy" in df else \
        ("test_quality", "test quality", 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for g, part in df.groupby("granularity", sort=False):
        part = part.sort_values("flops_ratio")
        axes[0].plot(part.flops_ratio * 100, part[col] * scale, "o-", label=g)
        axes[1].plot(part.latency_ms, part[col] * scale, "o-", label=g)
    axes[0].set_xlabel("FLOPs kept (% of dense)")
    axes[1].set_xlabel("measured latency (ms)")
    if "dense_latency_ms" in df and len(df):
        axes[1].axvline(df.dense_latency_ms.median(), color="grey", ls=":", label="dense")
    axes[0].set_ylabel(label)
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(title="particles removed")
    fig.suptitle("Quality vs cost by particle granularity (same recovery budget)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
