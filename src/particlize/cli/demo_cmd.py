"""``particlize demo``: the whole job on the embedded default (`particlize.demo.run_demo`), with a bar per stage."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..demo import Bar, DemoConfig, run_demo, summary_table


def demo_command(
    out: Path = typer.Option(Path("out/demo"), "--out", help="folder for the trained model, the run and the report"),
    examples: int = typer.Option(DemoConfig.examples, "--examples", min=64,
                                 help="training (and validation) sentences used; more is slower and more accurate"),
    target_flops: float = typer.Option(DemoConfig.target_flops, "--target-flops", min=0.05, max=1.0,
                                       help="fraction of the dense FLOPs to keep"),
    force: bool = typer.Option(False, "--force", help="replace an earlier demo run in --out"),
) -> None:
    """Run the whole job on the embedded default: train MiniLM briefly on VADER sentences, decompose, analyse,
    compress to a FLOPs target with recovery, evaluate on held-out sentences, and write an HTML report."""
    console = Console(stderr=True)
    cfg = DemoConfig(examples=examples, target_flops=target_flops)
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as bars:
        def stage(name: str) -> Bar:
            tid = bars.add_task("", stage=name, total=None)

            def update(done: int, total: int | None, what: str) -> None:
                bars.update(tid, completed=done, total=total, description=what)
            return update

        summary = run_demo(out, cfg, force=force, stage=stage)
    Console().print(summary_table(summary))
    verdict = "target met" if summary["target_met"] else "target NOT met (the last model above the quality floor is kept)"
    Console().print(f"{summary['rounds']} rounds, {verdict}, {summary['seconds'] / 60:.1f} min. "
                    f"Report: [bold]{summary['report']}[/bold]")


