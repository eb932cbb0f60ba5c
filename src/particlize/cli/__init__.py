"""The ``particlize`` command line. Thin: every command calls the public Python API.

One module per command (group); `_common` holds what they share (the command class, options spelled once,
the progress bar, safe writes). Adding a command is one entry in `COMMANDS`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from .._version import __version__
from ..errors import ParticlizeError
from ._common import Command, Interrupted
from .analyze_cmd import analyze_command
from .compress_cmd import TARGET_NOT_MET, compress_command, sweep_command
from .demo_cmd import demo_command
from .inspect_cmd import inspect_command
from .moefy_cmd import moefy_command
from .parallel_cmd import parallel_command
from .report_cmd import report_command
from .train_cmd import train_command, train_sora_command

COMMANDS: dict[str, Callable[..., Any]] = {
    "inspect": inspect_command,
    "analyze": analyze_command,
    "train": train_command,
    "compress": compress_command,
    "sweep": sweep_command,
    "train-sora": train_sora_command,
    "moefy": moefy_command,  # MoEfication (particlize.moe)
    "parallel": parallel_command,  # particle-parallel check (particlize.parallel)
    "report": report_command,  # the HTML report (particlize.report)
    "demo": demo_command,  # the whole job on the embedded default (particlize.demo)
}
INTERRUPTED = 130  # exit status after Ctrl-C, as shells report a SIGINT

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Take a trained PyTorch model apart into particles (heads, neurons, channels, units, blocks).",
)
for _name, _fn in COMMANDS.items():
    app.command(_name, cls=Command)(_fn)


def _version(value: bool) -> None:
    if value:
        print(f"particlize {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True,
                                                 help="print particlize's version and exit")) -> None:
    """particlize: decompose, analyse and shrink PyTorch models."""


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Exit status: 0 done; 1 an error (one line on stderr); 2 a usage error (bad option);
    3 (`TARGET_NOT_MET`) `compress` finished without meeting its target (its model is saved); 130 interrupted
    (Ctrl-C: one line on stderr, no half-written output left)."""
    err = Console(stderr=True)
    try:
        code = app(args=argv, prog_name="particlize", standalone_mode=False)
    except ParticlizeError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except (Interrupted, KeyboardInterrupt, typer.Abort) as e:
        err.print(str(e) if isinstance(e, Interrupted) else "interrupted", highlight=False, soft_wrap=True)
        sys.exit(INTERRUPTED)
    except Exception as e:  # usage errors from Typer's click layer carry their own message and code
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
    if code:  # a command's typer.Exit(code): standalone_mode=False returns it instead of exiting
        sys.exit(code)


__all__ = ["COMMANDS", "INTERRUPTED", "TARGET_NOT_MET", "app", "main"]
