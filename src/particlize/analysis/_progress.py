"""Progress for the library's long steps: a bar when someone is watching, silence otherwise.

``progress`` arguments take None (a bar on stderr when it is a terminal, else silent), True (a bar), False
(silent) or a callable ``(done, total, description)``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Union

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

from ._common import Progress

ProgressArg = Union[Progress, bool, None]


@contextlib.contextmanager
def progress_for(progress: ProgressArg, description: str) -> Iterator[Progress | None]:
    """The callable to hand to a scorer for ``progress`` (see the module docstring), and the bar's lifetime."""
    if callable(progress):
        yield progress
        return
    if progress is False or (progress is None and not sys.stderr.isatty()):
        yield None
        return
    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
             console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, what: str = "") -> None:
            bar.update(task, completed=done, total=total, description=f"{description} {what}".strip())

        yield update


__all__ = ["ProgressArg", "progress_for"]
