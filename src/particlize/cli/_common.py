"""What every command shares: the command class (help without Python type labels, Ctrl-C and errors handled
the same way), the consoles, the options with one spelling and one help text, the progress bar, and the small
helpers (task lookup, deprecated aliases, JSON output, safe writes)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from typer.core import TyperArgument, TyperCommand, TyperOption

from ..analysis.registry import help_text as scorer_help
from ..errors import ParticlizeError
from ..sources import MODEL_HELP
from ..tasks import get_task

# ---- the command class -------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C during a command, after its outputs were tidied up (`main` prints it and exits 130)."""


class Command(TyperCommand):
    """A Typer command whose help shows ``MODEL`` (not ``{MODEL}``) and ``--out PATH`` (not ``<path>``), and
    whose Ctrl-C and errors leave no half-written output and speak in flags, not Python keywords."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            if isinstance(p, TyperOption) and p.metavar is None and not p.is_flag:
                p.metavar = _metavar(p)
            elif isinstance(p, TyperArgument):
                p.display_type_rich = lambda ctx: None  # type: ignore[method-assign]  # "MODEL", not "MODEL <str>"

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in super().collect_usage_pieces(ctx)]

    def invoke(self, ctx: Any) -> Any:
        out = ctx.params.get("out")
        guard = _OutputGuard(Path(out)) if isinstance(out, (str, Path)) else None
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            note = guard.tidy() if guard is not None else ""
            raise Interrupted(f"interrupted{note}") from None
        except ParticlizeError as e:
            raise type(e)(cli_spelling(str(e), self.params)) from None


def _metavar(p: TyperOption) -> str:
    if p.type_descriptor.is_path:
        return "PATH"
    return {"int": "N", "float": "X"}.get(p.bare_type(), "TEXT")


class _OutputGuard:
    """Remembers whether an output path existed before a command; after Ctrl-C, removes what the command
    left half-written: temporary siblings, and a new or emptied folder that cannot be resumed."""

    def __init__(self, path: Path):
        self.path = path
        self.existed = path.exists()
        self.before = set(path.parent.glob(f".{path.name}*")) if path.parent.is_dir() else set()

    def tidy(self) -> str:
        for tmp in (set(self.path.parent.glob(f".{self.path.name}*")) if self.path.parent.is_dir() else set()) - self.before:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        if not self.path.is_dir():
            return ""
        if (self.path / "history.json").is_file():  # a compress run: checkpointed, resumable
            return f"; {self.path} holds the finished rounds: add --resume to continue"
        if not self.existed or not any(self.path.iterdir()):
            shutil.rmtree(self.path, ignore_errors=True)
        return ""


def cli_spelling(message: str, params: Sequence[Any]) -> str:
    """``message`` with the Python keyword spellings of the command's options (``force=True``, ``by=None``,
    ``target_flops``) written as the command's flags (``--force``, no ``--by``, ``--target-flops``)."""
    message = re.sub(r"force=True \(CLI: --force\)", "--force", message)
    flags = {p.name: p.opts[0] for p in params if getattr(p, "param_type_name", "") == "option" and p.name and p.opts}
    flags.setdefault("by", "--by")
    flags.setdefault("groups", "--groups")

    def keyword(m: re.Match[str]) -> str:
        name, value = m.group(1), m.group(2).strip("'\"")
        if name not in flags:
            return m.group(0)
        if value == "None":
            return f"no {flags[name]}"
        return flags[name] if value == "True" else f"{flags[name]} {value}"

    message = re.sub(r"\b([a-z_]+)=('[^']*'|\"[^\"]*\"|[\w.\-]+)", keyword, message)
    return re.sub(r"\b([a-z]+(?:_[a-z]+)+)\b", lambda m: flags.get(m.group(1), m.group(1)), message)


# ---- consoles and output -----------------------------------------------------------------------------------


def console(json_out: bool = False) -> Console:
    """Where a command speaks to people: stdout, or stderr when stdout carries ``--json``."""
    return Console(stderr=json_out, width=None if sys.stdout.isatty() else 120)


def print_json(data: Any) -> None:
    """One JSON document on stdout (``--json``): nothing else goes there."""
    sys.stdout.write(json.dumps(data, default=_plain) + "\n")
    sys.stdout.flush()


def _plain(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON data")


def deprecated(old: str, new: str) -> None:
    """Say once on stderr that ``old`` is an old spelling of ``new`` (it still works)."""
    Console(stderr=True).print(f"note: {old} is now {new} (the old spelling still works, for now)", highlight=False)


def pick(new: Any, old: Any, old_name: str, new_name: str) -> Any:
    """The value of an option given by its new or its hidden old name (both: an error)."""
    if old is None:
        return new
    if new is not None:
        raise ParticlizeError(f"{old_name} is the old name of {new_name}; give only {new_name}")
    deprecated(old_name, new_name)
    return old


def write_csv(df: Any, path: Path) -> None:
    """Write a table atomically: a temporary sibling renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(path)


def refuse_existing(path: Path, force: bool) -> None:
    """An error if ``path`` is a file, or a non-empty folder, that ``--force`` was not given to replace."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())) and not force:
        raise ParticlizeError(f"{path} already exists{'' if not path.is_dir() else ' and is not empty'}; "
                              "pass --force to replace it")


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[..., None]]:
    """A Rich progress bar (stderr) driven by ``progress(done, total, what)`` callbacks; it disappears when the
    command fails, so an error is not printed after a stale bar."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    bar = Progress(*columns, console=Console(stderr=True), transient=False)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int | None, what: str = "") -> None:
        bar.update(task, completed=done, total=total, description=f"{description} {what}".strip())

    with bar:
        try:
            yield update
        except BaseException:
            bar.live.transient = True
            raise


def quiet_transformers() -> None:
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except ImportError:
        pass


def check_device(device: str) -> None:
    """``--device``: a CUDA device asked for where there is none is a one-line error saying what to use."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParticlizeError(f"--device {device} was asked for but no CUDA GPU is available; use --device cpu")


def task_for(name: str, data: Optional[Path], text_column: str, label_column: str) -> Any:
    if name == "text-csv":
        if data is None:
            raise ParticlizeError("--task text-csv needs --data FILE.csv (with --text-column/--label-column)")
        return get_task(name, path=data, text_column=text_column, label_column=label_column)
    return get_task(name)


KINDS = ("heads", "kv_heads", "neurons", "channels", "units", "blocks", "all")


def kinds_list(values: Sequence[str]) -> tuple[str, ...]:
    """Granularities given repeated or as comma lists, singular or plural (``head`` = ``heads``)."""
    out = []
    for item in values:
        for v in item.split(","):
            v = v.strip()
            if not v:
                continue
            v = v if v in KINDS else v + "s" if v + "s" in KINDS else v
            if v not in KINDS:
                raise ParticlizeError(f"unknown granularity {v!r}; use {', '.join(KINDS)} (repeat or comma list)")
            out.append(v)
    return tuple(dict.fromkeys(out))


# ---- options shared by several commands (one spelling, one help text) ----------------------------------------

MODEL = typer.Argument(..., metavar="MODEL", help=MODEL_HELP)
TASK = typer.Option(..., "--task", help="vader-sentiment, text-csv (with --data), fashion-mnist, moving-digits, movielens-100k")
DATA = typer.Option(None, "--data", help="CSV file for --task text-csv")
TEXT_COLUMN = typer.Option("text", "--text-column", help="--task text-csv: column holding the text")
LABEL_COLUMN = typer.Option("label", "--label-column", help="--task text-csv: column holding the label")
BATCH_SIZE = typer.Option(32, "--batch-size", min=1, help="examples per batch")
MAX_LENGTH = typer.Option(64, "--max-length", min=1, help="tokens per text (longer ones are cut)")
SEED = typer.Option(0, "--seed", help="random seed (data order, sampling)")
LIMIT = typer.Option(None, "--limit", help="use only the first N train/val examples")
DEVICE = typer.Option("cpu", "--device", help="where the model runs: cpu, cuda or cuda:N")
TRUST_CODE = typer.Option(False, "--trust-code", help="allow a saved model's own factory code to run")
REPORT = typer.Option(True, "--report/--no-report", help="write report.html into --out at the end (particlize report)")
JSON = typer.Option(False, "--json", help="print a machine-readable JSON summary on stdout (and nothing else there)")
SCORER = "how particles are ranked (analyze --scorer and compress --scorer take the same ones): " + scorer_help()
GRANULARITY = ("particle kinds to prune: heads, kv_heads (whole key/value groups of grouped-query attention), neurons, "
               "channels, units, factors, blocks or all (all but kv_heads; repeat or comma list)")
METRIC = typer.Option("loss", "--metric", help="loss, accuracy, logit_diff, kl or mse")
