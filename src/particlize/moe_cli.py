"""``particlize moefy``: the command that makes a model's FFNs mixtures of experts (`particlize.moe.moefy`).

Registered on the Typer app by `particlize.cli` (``app.command("moefy")(moefy_command)``); it lives here so
that the CLI module stays small. Thin: calibration batches from the task, `moefy`, quality and FLOPs side by
side with the dense model, `particlize.save`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .adapters import decompose
from .errors import ParticlizeError
from .io import save
from .moe import moefy
from .sources import load_model, load_tokenizer
from .tasks import get_task


def moefy_command(
    model: str = typer.Argument(..., metavar="MODEL", help="a particlize or Hugging Face model folder, 'minilm', or file.py:factory"),
    task: str = typer.Option(..., "--task", help="vader-sentiment, text-csv (with --data), fashion-mnist, moving-digits"),
    out: Path = typer.Option(..., "--out", help="folder to save the mixture-of-experts model to"),
    experts: int = typer.Option(32, "--experts", min=1, help="experts per FFN (must divide its neurons)"),
    active: int = typer.Option(4, "--active", min=1, help="experts each token runs"),
    recover_epochs: float = typer.Option(0.0, "--recover-epochs", min=0.0,
                                         help="distil the experts from the original for this many passes, then refit the routers"),
    router_hidden: int = typer.Option(64, "--router-hidden", min=0, help="hidden units of each router (0: a Linear)"),
    calib_examples: int = typer.Option(256, "--calib-examples", min=1, help="training examples to cluster neurons and train routers on"),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="examples per batch"),
    max_length: int = typer.Option(64, "--max-length", min=1, help="tokens per text (longer ones are cut)"),
    seed: int = typer.Option(0, "--seed", help="random seed (calibration sample, clustering, routers)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first N train/val examples"),
    data: Optional[Path] = typer.Option(None, "--data", help="CSV file for --task text-csv"),
    text_column: str = typer.Option("text", "--text-column", help="--task text-csv: column holding the text"),
    label_column: str = typer.Option("label", "--label-column", help="--task text-csv: column holding the label"),
    trust_code: bool = typer.Option(False, "--trust-code", help="allow a model built by code outside particlize"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
) -> None:
    """Make each FFN a mixture of experts: every token runs only --active of --experts (MoEfication)."""
    if task == "text-csv" and data is None:
        raise ParticlizeError("--task text-csv needs --data FILE.csv (with --text-column/--label-column)")
    if out.exists() and any(out.iterdir()) and not force:
        raise ParticlizeError(f"{out} already exists and is not empty; pass --force to replace it")
    t = get_task(task, path=data, text_column=text_column, label_column=label_column) if task == "text-csv" else get_task(task)
    dense = load_model(model, trust_code=trust_code)
    tok = load_tokenizer(model)
    calib = t.calibration(dense, tok, batch_size=batch_size, max_length=max_length, limit=calib_examples, seed=seed)
    console = Console(stderr=True)
    with console.status("clustering neurons, training routers" + (", distilling" if recover_epochs else "")):
        moe = moefy(dense, calib, experts=experts, active=active, router_hidden=router_hidden, seed=seed, task=t,
                    recover_epochs=recover_epochs, tokenizer=tok, batch_size=batch_size, max_length=max_length,
                    limit=limit)
    flops = decompose(moe).cost().flops / decompose(dense).cost().flops
    q0, q1 = (t.quality(m, "val", tok, batch_size=batch_size, limit=limit, max_length=max_length)["quality"]
              for m in (dense, moe))
    folder = save(moe, out, force=force, tokenizer=tok,
                  extra={"moefy": {"experts": experts, "active": active, "flops_ratio": flops, "val_quality": q1,
                                   "dense_val_quality": q0}})
    Console().print(f"{experts} experts per FFN, {active} active per token: FLOPs per token {100 * flops:.1f}% of the "
                    f"dense model's (routers included); val quality {q1:.4f} (dense {q0:.4f}); saved to {folder}")


__all__ = ["moefy_command"]
