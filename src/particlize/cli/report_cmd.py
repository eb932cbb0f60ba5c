"""`particlize report`: the command's options live here; `particlize.cli` registers `report_command`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..report import write_report


def report_command(
    source: str = typer.Argument(..., metavar="RUN_OR_MODEL",
                                 help="a compress run folder, a sweep folder, a saved model (or 'sora-tiny'), or an analyze CSV "
                                 "(--interactions ones too)"),
    task: Optional[str] = typer.Option(None, "--task", help="task to analyse a model on (vader-sentiment, moving-digits, "
                                       "fashion-mnist); a saved classifier names its own"),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file to write (default: report.html inside a run or sweep folder)"),
    limit: int = typer.Option(64, "--limit", min=1, help="examples the analysis of a model runs on"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out file"),
    trust_code: bool = typer.Option(False, "--trust-code", help="allow a saved model's own factory code to run"),
    interactions: bool = typer.Option(False, "--interactions", help="a model: also measure its attention heads' pairwise "
                                      "interactions exactly (up to 96 heads) and draw them"),
) -> None:
    """One self-contained HTML report (figures embedded, opens from disk): model overview, particle maps,
    scorer validation, pairwise interactions, the loop's rounds or the sweep's Pareto front, the kept structure
    and a particle table."""
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)
    with err.status("building the report…") as status:
        path = write_report(source, out, task=task, force=force, limit=limit, trust_code=trust_code,
                            interactions=interactions, note=lambda what: status.update(f"report: {what}…"))
    Console().print(f"report written to [bold]{escape(str(path))}[/bold] (open it in a browser)")
