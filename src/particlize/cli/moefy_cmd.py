"""``particlize moefy``: the command that makes a model's FFNs mixtures of experts (`particlize.moe.moefy`).

Thin: calibration batches from the task, `moefy`, quality and FLOPs side by
side with the dense model, `particlize.save`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..adapters import decompose
from ..io import save
from ..measure import on_device
from ..moe import moefy
from ..sources import load_model, load_tokenizer
from ._common import BATCH_SIZE, DATA, DEVICE, LABEL_COLUMN, LIMIT, MAX_LENGTH, MODEL, TASK, TEXT_COLUMN, TRUST_CODE, \
    check_device, console, refuse_existing, task_for


def moefy_command(
    model: str = MODEL,
    task: str = TASK,
    out: Path = typer.Option(..., "--out", help="folder to save the mixture-of-experts model to"),
    experts: int = typer.Option(32, "--experts", min=1, help="experts per FFN (must divide its neurons)"),
    active: int = typer.Option(4, "--active", min=1, help="experts each token runs"),
    recover_epochs: float = typer.Option(0.0, "--recover-epochs", min=0.0,
                                         help="distil the experts from the original for this many passes, then refit the routers"),
    router_hidden: int = typer.Option(64, "--router-hidden", min=0, help="hidden units of each router (0: a Linear)"),
    calib_examples: int = typer.Option(256, "--calib-examples", min=1, help="training examples to cluster neurons and train routers on"),
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    seed: int = typer.Option(0, "--seed", help="random seed (calibration sample, clustering, routers)"),
    limit: Optional[int] = LIMIT,
    data: Optional[Path] = DATA,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    device: str = DEVICE,
    trust_code: bool = TRUST_CODE,
    force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
) -> None:
    """Make each FFN a mixture of experts: every token runs only --active of --experts (MoEfication)."""
    refuse_existing(out, force)
    check_device(device)
    t = task_for(task, data, text_column, label_column)
    dense = load_model(model, trust_code=trust_code).to(device)
    tok = load_tokenizer(model)
    calib = on_device(t.calibration(dense, tok, batch_size=batch_size, max_length=max_length, limit=calib_examples,
                                    seed=seed), device)
    with Console(stderr=True).status("clustering neurons, training routers" + (", distilling" if recover_epochs else "")):
        moe = moefy(dense, calib, experts=experts, active=active, router_hidden=router_hidden, seed=seed, task=t,
                    recover_epochs=recover_epochs, tokenizer=tok, batch_size=batch_size, max_length=max_length,
                    limit=limit)
    flops = decompose(moe).cost().flops / decompose(dense).cost().flops
    q0, q1 = (t.quality(m, "val", tok, batch_size=batch_size, limit=limit, max_length=max_length)["quality"]
              for m in (dense, moe))
    folder = save(moe, out, force=force, tokenizer=tok,
                  extra={"moefy": {"experts": experts, "active": active, "flops_ratio": flops, "val_quality": q1,
                                   "dense_val_quality": q0}})
    console().print(f"{experts} experts per FFN, {active} active per token: FLOPs per token {100 * flops:.1f}% of the "
                    f"dense model's (routers included); val quality {q1:.4f} (dense {q0:.4f}); saved to {folder}")


__all__ = ["moefy_command"]
