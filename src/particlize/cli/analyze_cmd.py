"""``particlize analyze``: what every particle does to a task's output, on one process or ``--nproc N``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pandas as pd
import torch.distributed as dist
import typer
from rich.markup import escape
from rich.table import Table

from ..adapters import decompose
from ..analysis import analyze as run_analysis
from ..analysis import check_options, get_scorer, importance, interactions_table, top_particles
from ..analysis._common import select_groups
from ..errors import ParticlizeError
from ..parallel import analyze as analyze_distributed
from ..parallel import launch
from ..sources import load_model, load_tokenizer
from ._common import BATCH_SIZE, DATA, DEVICE, JSON, LABEL_COLUMN, MAX_LENGTH, METRIC, MODEL, SCORER, TASK, TEXT_COLUMN, \
    TRUST_CODE, check_device, console, pick, print_json, progress_bar, quiet_transformers, refuse_existing, task_for, \
    write_csv

BY = ("example", "class")


def analyze_command(
    model: str = MODEL,
    task: str = TASK,
    scorer: Optional[str] = typer.Option(None, "--scorer", help="default: taylor; with --top: the screen, taylor-norm. " + SCORER),
    top: Optional[int] = typer.Option(None, "--top", min=1, help="only the K particles whose exact ablation matters most: screen all with --scorer, ablate a shortlist exactly (pz.top_particles)"),
    metric: str = METRIC,
    mode: str = typer.Option("zero", "--mode", help="how a particle is ablated: zero, mean, resample"),
    by: Optional[str] = typer.Option(None, "--by", help="one row per particle and 'example' or 'class' (default: the mean over examples)"),
    groups: Optional[list[str]] = typer.Option(None, "--groups", help="group names or kinds: heads, kv_heads, neurons, channels, units, blocks (repeat or comma list)"),
    split: str = typer.Option("val", "--split", help="train, val or test"),
    limit: Optional[int] = typer.Option(512, "--limit", help="number of examples (0: the whole split)"),
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    data: Optional[Path] = DATA,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    device: str = DEVICE,
    interactions: bool = typer.Option(False, "--interactions", help="pairwise interactions instead: one row per pair of "
                                      "particles, I = f(-i,-j) - f(-i) - f(-j) + f (--scorer ablation: exact; hessian: estimate)"),
    pairs: Optional[int] = typer.Option(None, "--pairs", min=2, help="--interactions: only the pairs among the K particles "
                                        "with the largest single effects (default: all pairs of --groups)"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="score on N local processes (gloo on CPU), each its share of the particles, balanced by estimated work; the table is the same"),
    out: Path = typer.Option(..., "--out", help="scores CSV to write"),
    json_out: bool = JSON,
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out file"),
    trust_code: bool = TRUST_CODE,
    method: Optional[str] = typer.Option(None, "--method", hidden=True, help="old name of --scorer"),
) -> None:
    """Score what every particle does to the task's output (one row per particle, or per example/class);
    with --top K, the exact top K by ablation, found fast."""
    scorer = pick(scorer, method, "--method", "--scorer") or ("ablation" if interactions else "taylor-norm" if top else "taylor")
    if interactions:
        _check_interactions(scorer, top, by, nproc, pairs)
        refuse_existing(out, force)
        check_device(device)
        quiet_transformers()
        setting = (model, task, data, text_column, label_column, split, limit, batch_size, max_length, trust_code)
        return _interactions(setting, device, scorer, metric, mode, _groups(groups) or "head", pairs, out, json_out)
    if pairs is not None:
        raise ParticlizeError("--pairs goes with --interactions")
    # everything checked before anything is loaded or a progress bar is shown
    if by is not None and by not in BY:
        raise ParticlizeError(f"--by takes example or class, not {by!r} (leave it out for the mean over examples)")
    if top:  # --scorer names the screen; --metric and --mode are those of the exact ablation
        get_scorer(scorer)
        check_options("ablation", metric, mode)
    else:
        check_options(scorer, metric, mode, by)
    if top and by:
        raise ParticlizeError("--top ranks particles by their mean exact effect; drop --by (or drop --top for per-example/class rows)")
    if top and scorer == "ablation":
        raise ParticlizeError("--top ablates exactly already; --scorer names its screen (e.g. taylor-norm), not ablation")
    if nproc > 1 and (top or device != "cpu"):
        raise ParticlizeError("--nproc runs on CPU processes without --top; drop --nproc, or --top / --device")
    refuse_existing(out, force)
    check_device(device)
    quiet_transformers()
    wanted = _groups(groups)
    options = dict(metric=metric, mode=mode, by=by)
    setting = (model, task, data, text_column, label_column, split, limit, batch_size, max_length, trust_code)
    if nproc > 1:
        with progress_bar(f"{scorer} on {nproc} processes"):
            df, classes, n = launch(_analyze_rank, nproc, setting, scorer, wanted, options, timeout=24 * 3600)[0]
    else:
        m, t, batches = _load(*setting, device=device)
        classes = t.classes
        n = sum(len(y) for _, y in batches)
        pm = decompose(m)
        with progress_bar(f"top {top} (screen {scorer}, then exact)" if top else scorer) as progress:
            if top:
                found = top_particles(pm, batches, top, screen=scorer, metric=metric, mode=mode, groups=wanted,
                                      progress=progress)
                df = found.merge(pm.table().drop(columns="kind"), on=["group", "index"], how="left")
                df.attrs.update(found.attrs)
            else:
                df = run_analysis(pm, batches, scorer, groups=wanted, progress=progress, **options)
    if "class" in df.columns:
        df.insert(df.columns.get_loc("class") + 1, "class_name", df["class"].map(dict(enumerate(classes))))
    write_csv(df, out)
    best = df if top else df.assign(importance=importance(df, metric)).nlargest(10, "importance")
    if json_out:
        cols = [c for c in ("rank", "group", "index", "class_name", "example", "score", "params", "flops") if c in best]
        print_json({"scorer": "ablation" if top else scorer, "screen": scorer if top else None, "metric": metric,
                    "mode": mode, "split": split, "examples": n, "rows": len(df), "out": str(out),
                    "top": best[cols].to_dict("records"), **({"verified": df.attrs["verified"]} if top else {})})
        return
    say = console()
    table = Table(title=f"top particles by {'exact ablation' if top else scorer} ({metric}, {mode}) on {n} {split} examples")
    extra_cols = [c for c in ("class_name", "example") if c in df.columns]
    for col in ("group", "index", *extra_cols, "score"):
        table.add_column(col.replace("class_name", "class"), justify="left" if col == "group" else "right")
    for _, row in best.head(10).iterrows():
        table.add_row(row.group, str(row["index"]), *(str(row[c]) for c in extra_cols), f"{row.score:+.4g}")
    say.print(table)
    if top:
        say.print(f"{df.attrs['verified']:,} of {df.attrs['particles']:,} particles ablated exactly (screened by {scorer})")
    say.print(f"{len(df):,} rows written to [bold]{escape(str(out))}[/bold]")


def _check_interactions(scorer: str, top: Optional[int], by: Optional[str], nproc: int, pairs: Optional[int]) -> None:
    if scorer not in ("ablation", "hessian"):
        raise ParticlizeError(f"--interactions takes --scorer ablation (exact) or hessian (estimate), not {scorer!r}")
    for flag, given in (("--top", top), ("--by", by), ("--nproc", nproc > 1)):
        if given:
            raise ParticlizeError(f"--interactions scores pairs on one process over the mean of the examples; drop {flag}")


def _interactions(setting: tuple, device: str, scorer: str, metric: str, mode: str, groups: Any, pairs: Optional[int],
                  out: Path, json_out: bool) -> None:
    """``analyze --interactions``: `interactions_table` of the model's pairs, written as CSV, the strongest shown."""
    m, _, batches = _load(*setting, device=device)
    n = sum(len(y) for _, y in batches)
    with progress_bar(f"pairwise interactions ({scorer})") as progress:
        df = interactions_table(decompose(m), batches, groups, scorer, metric, progress, mode=mode, pairs=pairs)
    write_csv(df, out)
    cols = ["group_a", "index_a", "group_b", "index_b", "interaction"]
    if json_out:
        print_json({"interactions": scorer, "metric": metric, "mode": mode, "examples": n, "rows": len(df),
                    "out": str(out), "top": df[cols].head(10).to_dict("records")})
        return
    table = Table(title=f"strongest pairwise interactions ({scorer}, {metric}, {mode}) on {n} examples")
    for col in cols:
        table.add_column(col, justify="left" if col.startswith("group") else "right")
    for r in df.head(10).itertuples():
        table.add_row(r.group_a, str(r.index_a), r.group_b, str(r.index_b), f"{r.interaction:+.4g}")
    say = console()
    say.print(table)
    say.print(f"{len(df):,} pairs written to [bold]{escape(str(out))}[/bold] (under a loss, I > 0: the two cover for "
              "each other; I < 0: they only work together)")


def _groups(values: Optional[list[str]]) -> Optional[list[str]]:
    """``--groups``: names or kinds, repeated or comma lists, a kind singular or plural (``heads`` = ``head``)."""
    if not values:
        return None
    kinds = {"heads": "head", "neurons": "neuron", "channels": "channel", "units": "unit", "blocks": "block",
             "kv_heads": "kv_head"}
    return [kinds.get(v.strip(), v.strip()) for item in values for v in item.split(",") if v.strip()]


def _load(model: str, task: str, data: Optional[Path], text_column: str, label_column: str, split: str,
          limit: Optional[int], batch_size: int, max_length: int, trust_code: bool, device: str = "cpu") -> tuple:
    """The model on ``device``, the task, and its ``split`` as a list of batches on ``device``."""
    t = task_for(task, data, text_column, label_column)
    m = load_model(model, trust_code=trust_code).to(device)
    tok = load_tokenizer(model) if t.kind == "text" else None
    if t.kind == "text" and tok is None:
        raise ParticlizeError(f"{model} has no tokenizer files; text tasks need a model saved with its tokenizer")
    batches = t.batches(split, tokenizer=tok, batch_size=batch_size, max_length=max_length, limit=limit or None)
    return m, t, [(_to(x, device), y.to(device)) for x, y in batches]


def _analyze_rank(setting: tuple, scorer: str, groups: Optional[list[str]], options: dict) -> Any:
    """One rank of ``--nproc``: the same model and batches as one process would use, its share of the particles
    scored (`particlize.parallel.analyze`); rank 0 returns the gathered table."""
    m, t, batches = _load(*setting)
    pm = decompose(m)
    kinds = get_scorer(scorer).kinds  # as one process does: the groups of the kinds the scorer scores
    names = [n for n in select_groups(pm, groups) if pm[n].kind in kinds] or select_groups(pm, groups)
    df = analyze_distributed(pm, batches, scorer, groups=names, progress=False, **options)
    if dist.get_rank() != 0:
        return None
    return pd.DataFrame(df), list(t.classes), sum(len(y) for _, y in batches)


def _to(x: Any, device: str) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)
