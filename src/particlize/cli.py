"""The ``particlize`` command line. Thin: every command calls the public Python API."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import ParticlizeError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Take a trained PyTorch model apart into particles (heads, neurons, channels, units, blocks).",
)
console = Console(width=None if sys.stdout.isatty() else 120)
MODEL_HELP = "'minilm', a particlize or Hugging Face model folder, or path/to/file.py:factory"


@app.callback()
def _root() -> None:
    """particlize: decompose, analyse and shrink PyTorch models."""


def _quiet_transformers() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


@app.command()
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    csv: Optional[Path] = typer.Option(None, "--csv", help="write the per-particle table to this CSV file"),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="sequence length for attention FLOPs"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --csv file"),
    trust_code: bool = typer.Option(False, "--trust-code", help="allow a saved model's own factory code to run"),
) -> None:
    """Show a model's particle groups (count, params share, FLOPs share) and write the particle table."""
    from .adapters import decompose
    from .sources import load_model

    if csv is not None and csv.exists() and not force:
        raise ParticlizeError(f"{csv} exists; pass --force to overwrite it")
    _quiet_transformers()
    with console.status(f"loading {model}…"):
        m = load_model(model, trust_code=trust_code)
        pm = decompose(m, seq_len=seq_len)
        df = pm.table()
    total = pm.cost()
    n_params = sum(p.numel() for p in m.parameters())
    table = Table(title=f"{type(m).__name__}: {len(pm.groups)} particle groups ({pm.adapter} adapter)")
    table.add_column("group", no_wrap=True, min_width=max(len(g.name) for g in pm.groups))
    for col, just in ( ("kind", "left"), ("layer", "right"), ("count", "right"),
                      ("params", "right"), ("FLOPs", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    per_group = df.groupby("group", sort=False).agg(kind=("kind", "first"), layer=("layer", "first"),
                                                     count=("index", "size"), params=("params", "sum"),
                                                     flops=("flops", "sum"))
    for name, row in per_group.iterrows():
        table.add_row(str(name), row.kind, "" if row.layer < 0 else str(row.layer), f"{row['count']:,}",
                      _pct(row.params / n_params), _pct(row.flops / total.flops if total.flops else 0.0))
    console.print(table)
    kinds = df.groupby("kind")["index"].size().to_dict()
    console.print(
        f"{n_params:,} parameters; {total.flops:,.0f} FLOPs {pm.flops_unit} at seq_len {seq_len}; particles: "
        + ", ".join(f"{v:,} {k}s" for k, v in kinds.items())
        + ". Shares are of all parameters and of the FLOPs particlize counts (a block's share includes its heads and neurons)."
    )
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        tmp = csv.with_name(f".{csv.name}.tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(csv)
        console.print(f"particle table ({len(df):,} rows) written to [bold]{csv}[/bold]")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: errors become one line on stderr and exit status 1."""
    try:
        app(args=argv, standalone_mode=False)
    except ParticlizeError as e:
        Console(stderr=True).print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # usage errors from Typer's click layer carry their own message and code
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
