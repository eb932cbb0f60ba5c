"""``particlize inspect``: a model's particle groups and their share of the parameters and FLOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..adapters import decompose
from ..sources import load_model
from ._common import JSON, MODEL, TRUST_CODE, console, pick, print_json, quiet_transformers, \
    refuse_existing, write_csv


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def inspect_command(
    model: str = MODEL,
    out: Optional[Path] = typer.Option(None, "--out", help="write the per-particle table to this CSV file"),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="sequence length for attention FLOPs"),
    json_out: bool = JSON,
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out file"),
    trust_code: bool = TRUST_CODE,
    csv: Optional[Path] = typer.Option(None, "--csv", hidden=True, help="old name of --out"),
) -> None:
    """Show a model's particle groups (count, params share, FLOPs share) and write the particle table."""
    out = pick(out, csv, "--csv", "--out")
    if out is not None:
        refuse_existing(out, force)
    quiet_transformers()
    say = console(json_out)
    with say.status(f"loading {model}…"):
        m = load_model(model, trust_code=trust_code)
        pm = decompose(m, seq_len=seq_len)
        df = pm.table()
    total = pm.cost()
    n_params = sum(p.numel() for p in m.parameters())
    per_group = df.groupby("group", sort=False).agg(kind=("kind", "first"), layer=("layer", "first"),
                                                     count=("index", "size"), params=("params", "sum"),
                                                     flops=("flops", "sum"))
    if out is not None:
        write_csv(df, out)
    if json_out:
        print_json(_summary(m, pm, per_group, n_params, total.flops, seq_len, out))
        return
    table = Table(title=f"{type(m).__name__}: {len(pm.groups)} particle groups ({pm.adapter} adapter)")
    table.add_column("group", no_wrap=True, min_width=max(len(g.name) for g in pm.groups))
    for col, just in (("kind", "left"), ("layer", "right"), ("count", "right"), ("params", "right"), ("FLOPs", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for name, row in per_group.iterrows():
        table.add_row(str(name), row.kind, "" if row.layer < 0 else str(row.layer), f"{row['count']:,}",
                      _pct(row.params / n_params), _pct(row.flops / total.flops if total.flops else 0.0))
    say.print(table)
    kinds = df.groupby("kind")["index"].size().to_dict()
    at = f" at seq_len {seq_len}" if "token" in pm.flops_unit else ""
    say.print(
        f"{n_params:,} parameters; {total.flops:,.0f} FLOPs {pm.flops_unit}{at}; particles: "
        + ", ".join(f"{v:,} {k}s" for k, v in kinds.items())
        + ". Shares are of all parameters and of the FLOPs particlize counts (a block's share includes the particles inside it)."
    )
    if pm.unplaced:
        shown = ", ".join(pm.unplaced[:6]) + (f", … {len(pm.unplaced) - 6} more" if len(pm.unplaced) > 6 else "")
        say.print(f"left alone (coupled to others, e.g. across a residual add): {shown}")
    if out is not None:
        say.print(f"particle table ({len(df):,} rows) written to [bold]{escape(str(out))}[/bold]")


def _summary(m: Any, pm: Any, per_group: Any, n_params: int, flops: float, seq_len: int, out: Optional[Path]) -> dict:
    return {
        "model": type(m).__name__, "adapter": pm.adapter, "params": n_params, "flops": flops,
        "flops_unit": pm.flops_unit, "seq_len": seq_len, "out": None if out is None else str(out),
        "groups": [{"group": str(name), "kind": row.kind, "layer": int(row.layer), "count": int(row["count"]),
                    "params": int(row.params), "flops": float(row.flops)} for name, row in per_group.iterrows()],
        "unplaced": list(pm.unplaced),
    }
