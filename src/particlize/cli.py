"""The ``particlize`` command line. Thin: every command calls the public Python API."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table

from .adapters import decompose
from .allocate import AllocationConfig
from .analysis import analyze as run_analysis
from .analysis import check_options, get_scorer, importance, top_particles
from .analysis.registry import help_text as scorer_help
from .analysis.registry import scorers
from .errors import ParticlizeError
from .loop import CompressConfig, Target
from .loop import compress as run_compress
from .moe_cli import moefy_command
from .parallel_cli import parallel_command
from .recover import RecoveryConfig
from .sources import load_model, load_tokenizer
from .sweep import sweep as run_sweep
from .tasks import get_task
from .train import fine_tune
from .train_sora import train_sora

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
    help="Take a trained PyTorch model apart into particles (heads, neurons, channels, units, blocks).",
)
console = Console(width=None if sys.stdout.isatty() else 120)
MODEL_HELP = "'minilm', a particlize or Hugging Face model folder, or path/to/file.py:factory"
# options shared by several commands (one definition, one help text)
BATCH_SIZE = typer.Option(32, "--batch-size", min=1, help="examples per batch")
MAX_LENGTH = typer.Option(64, "--max-length", min=1, help="tokens per text (longer ones are cut)")
SEED = typer.Option(0, "--seed", help="random seed (data order, sampling)")
TEXT_COLUMN = typer.Option("text", "--text-column", help="--task text-csv: column holding the text")
LABEL_COLUMN = typer.Option("label", "--label-column", help="--task text-csv: column holding the label")
TARGET_NOT_MET = 3  # exit status of `compress` when it stopped short of its target (1: errors, 2: usage errors)
# the compress settings' options: defaults read from the config parts (particlize.loop.Target,
# particlize.allocate.AllocationConfig, particlize.recover.RecoveryConfig), shared by compress and sweep
_A, _R, _T = AllocationConfig(), RecoveryConfig(), Target()
SCORER = typer.Option(_A.scorer, "--scorer", help="how particles are ranked; " + ", ".join(scorers()))
MIN_WIDTH = typer.Option(_A.min_width, "--min-width", min=0.0, max=1.0,
                         help="smallest share of each layer's original heads / neurons / channels kept")
RECOVER_EPOCHS = typer.Option(float(_R.epochs), "--recover-epochs", min=0.0,
                              help="recovery passes over the training data per round (fractional: part of a pass)")
FINAL_RECOVER_EPOCHS = typer.Option(float(_R.final_epochs), "--final-recover-epochs", min=0.0,
                                    help="more recovery passes after the last round, in chunks of --recover-epochs (warm restarts, checkpointed)")
RECOVER_LR = typer.Option(_R.lr, "--lr", help="recovery learning rate (default 1.5e-4 text / 1e-3 images / 3e-4 video DiTs)")
HIDDEN_WEIGHT = typer.Option(_R.hidden_weight, "--hidden-weight", min=0.0,
                             help="layer-wise distillation: weight of each block's output MSE to the original's (default 5 for text classifiers, 0 otherwise)")
VAL_EVERY = typer.Option(_R.val_every, "--val-every", min=0.0, max=1.0,
                         help="validate every this fraction of an epoch during recovery (e.g. 0.1), so early stopping (--patience) can act part-way")
PATIENCE = typer.Option(_R.patience, "--patience", min=1, help="recovery stops after this many validations without a better one")
RECOVER_FOCUS = typer.Option(_R.focus, "--recover-focus", metavar="LO HI",
                             help="video diffusion: spend half of each recovery batch at diffusion steps LO..HI (sora-tiny: 490 795)")

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
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    csv: Optional[Path] = typer.Option(None, "--csv", help="write the per-particle table to this CSV file"),
    seq_len: int = typer.Option(128, "--seq-len", min=1, help="sequence length for attention FLOPs"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --csv file"),
    trust_code: bool = typer.Option(False, "--trust-code", help="allow a saved model's own factory code to run"),
) -> None:
    """Show a model's particle groups (count, params share, FLOPs share) and write the particle table."""

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
    at = f" at seq_len {seq_len}" if "token" in pm.flops_unit else ""
    console.print(
        f"{n_params:,} parameters; {total.flops:,.0f} FLOPs {pm.flops_unit}{at}; particles: "
        + ", ".join(f"{v:,} {k}s" for k, v in kinds.items())
        + ". Shares are of all parameters and of the FLOPs particlize counts (a block's share includes the particles inside it)."
    )
    if pm.unplaced:
        shown = ", ".join(pm.unplaced[:6]) + (f", … {len(pm.unplaced) - 6} more" if len(pm.unplaced) > 6 else "")
        console.print(f"left alone (coupled to others, e.g. across a residual add): {shown}")
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        tmp = csv.with_name(f".{csv.name}.tmp")
        df.to_csv(tmp, index=False)
        tmp.replace(csv)
        console.print(f"particle table ({len(df):,} rows) written to [bold]{csv}[/bold]")


@contextlib.contextmanager
def _progress_bar(description: str) -> Iterator[Callable[[int, int, str], None]]:
    """A Rich progress bar driven by the library's ``progress(done, total, what)`` callbacks."""
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, what: str = "") -> None:
            bar.update(task, completed=done, total=total, description=f"{description} {what}".strip())

        yield update


def _task(name: str, data: Optional[Path], text_column: str, label_column: str) -> Any:

    if name == "text-csv":
        if data is None:
            raise ParticlizeError("--task text-csv needs --data FILE.csv (with --text-column/--label-column)")
        return get_task(name, path=data, text_column=text_column, label_column=label_column)
    return get_task(name)


@app.command()
def analyze(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    task: str = typer.Option(..., "--task", help="vader-sentiment, text-csv (with --data), fashion-mnist"),
    method: Optional[str] = typer.Option(None, "--method", help="the scorer (default: taylor; with --top: the screen, taylor-norm). " + scorer_help()),
    top: Optional[int] = typer.Option(None, "--top", min=1, help="only the K particles whose exact ablation matters most: screen all with --method, ablate a shortlist exactly (pz.top_particles)"),
    metric: str = typer.Option("loss", "--metric", help="loss, accuracy, logit_diff, kl"),
    mode: str = typer.Option("zero", "--mode", help="how a particle is ablated: zero, mean, resample"),
    by: Optional[str] = typer.Option(None, "--by", help="per 'example' or per 'class' rows"),
    groups: Optional[list[str]] = typer.Option(None, "--groups", help="group names or kinds (repeatable)"),
    split: str = typer.Option("val", "--split", help="train, val or test"),
    limit: Optional[int] = typer.Option(512, "--limit", help="number of examples (0: the whole split)"),
    batch_size: int = BATCH_SIZE,
    max_length: int = typer.Option(64, "--max-length", min=1, help="token cap for text tasks"),
    data: Optional[Path] = typer.Option(None, "--data", help="CSV file for --task text-csv"),
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    out: Path = typer.Option(..., "--out", help="scores CSV to write"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing --out file"),
    trust_code: bool = typer.Option(False, "--trust-code", help="allow a saved model's own factory code to run"),
) -> None:
    """Score what every particle does to the task's output (one row per particle, or per example/class);
    with --top K, the exact top K by ablation, found fast."""
    import torch


    method = method or ("taylor-norm" if top else "taylor")
    # before anything is loaded or a progress bar is shown
    if top:  # --method names the screen; --metric and --mode are those of the exact ablation
        get_scorer(method)
        check_options("ablation", metric, mode)
    else:
        check_options(method, metric, mode, by)
    if top and by:
        raise ParticlizeError("--top ranks particles by their mean exact effect; drop --by (or drop --top for per-example/class rows)")
    if top and method == "ablation":
        raise ParticlizeError("--top ablates exactly already; --method names its screen (e.g. taylor-norm), not ablation")
    if out.exists() and not force:
        raise ParticlizeError(f"{out} exists; pass --force to overwrite it")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ParticlizeError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    _quiet_transformers()
    t = _task(task, data, text_column, label_column)
    m = load_model(model, trust_code=trust_code).to(device)
    tok = load_tokenizer(model) if t.kind == "text" else None
    if t.kind == "text" and tok is None:
        raise ParticlizeError(f"{model} has no tokenizer files; text tasks need a model saved with its tokenizer")
    batches = t.batches(split, tokenizer=tok, batch_size=batch_size, max_length=max_length, limit=limit or None)
    batches = [(_to(x, device), y.to(device)) for x, y in batches]
    pm = decompose(m)
    with _progress_bar(f"top {top} (screen {method}, then exact)" if top else f"{method}") as progress:
        if top:
            found = top_particles(pm, batches, top, screen=method, metric=metric, mode=mode, groups=groups, progress=progress)
            df = found.merge(pm.table().drop(columns="kind"), on=["group", "index"], how="left")
            df.attrs.update(found.attrs)
        else:
            df = run_analysis(pm, batches, method, metric, mode, by=by, groups=groups, progress=progress)
    if "class" in df.columns:
        df.insert(df.columns.get_loc("class") + 1, "class_name", df["class"].map(dict(enumerate(t.classes))))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    df.to_csv(tmp, index=False)
    tmp.replace(out)
    n = sum(len(y) for _, y in batches)
    best = df.assign(importance=importance(df, metric)).nlargest(10, "importance")
    table = Table(title=f"top particles by {'exact ablation' if top else method} ({metric}, {mode}) on {n} {split} examples")
    extra_cols = [c for c in ("class_name", "example") if c in df.columns]
    for col in ("group", "index", *extra_cols, "score"):
        table.add_column(col.replace("class_name", "class"), justify="left" if col == "group" else "right")
    for _, row in best.iterrows():
        table.add_row(row.group, str(row["index"]), *(str(row[c]) for c in extra_cols), f"{row.score:+.4g}")
    console.print(table)
    if top:
        console.print(f"{df.attrs['verified']:,} of {df.attrs['particles']:,} particles ablated exactly (screened by {method})")
    console.print(f"{len(df):,} rows written to [bold]{out}[/bold]")


@app.command()
def train(
    model: str = typer.Argument(..., metavar="MODEL", help="'minilm' or a Hugging Face encoder folder (text); 'simple-cnn' or 'resnet' (images)"),
    task: str = typer.Option(..., "--task", help="vader-sentiment, text-csv (with --data), fashion-mnist"),
    out: Path = typer.Option(..., "--out", help="folder to save the trained classifier to (a valid MODEL afterwards)"),
    epochs: int = typer.Option(2, "--epochs", min=1, help="passes over the training split"),
    lr: Optional[float] = typer.Option(None, "--lr", help="default 5e-5 (text) / 1e-3 (images)"),
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    seed: int = SEED,
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first N train/val examples"),
    data: Optional[Path] = typer.Option(None, "--data", help="CSV file for --task text-csv"),
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    force: bool = typer.Option(False, "--force", help="replace an existing --out folder"),
) -> None:
    """Fine-tune a classifier on a task and save it (tokenizer included) with particlize's format."""
    import json


    _quiet_transformers()
    kwargs = {"path": data, "text_column": text_column, "label_column": label_column} if task == "text-csv" else None
    if task == "text-csv" and data is None:
        raise ParticlizeError("--task text-csv needs --data FILE.csv (with --text-column/--label-column)")
    with _progress_bar("training") as bar:
        def progress(step: int, total: int, info: dict) -> None:
            what = f"epoch {info.get('epoch')} loss {info.get('loss', float('nan')):.3f}"
            if "val_accuracy" in info:
                what += f" val acc {info['val_accuracy']:.3f}"
            bar(step, total, what)

        folder = fine_tune(task, out, model=model, epochs=epochs, lr=lr, batch_size=batch_size,
                           max_length=max_length, seed=seed, limit=limit, progress=progress, force=force,
                           task_kwargs=kwargs)
    test = json.loads((folder / "particlize.json").read_text())["extra"]["metrics"]["test"]
    console.print(f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}, {test['n']} examples); "
                  f"saved to [bold]{folder}[/bold]")


@app.command()
def compress(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    task: str = typer.Option(..., "--task", help="vader-sentiment, text-csv (with --data), fashion-mnist"),
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help="fraction of the dense FLOPs to keep, e.g. 0.5"),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="fraction of prunable parameters to keep"),
    target_latency_ms: Optional[float] = typer.Option(None, "--target-latency-ms", help="measured latency to reach (CPU, batch 32 × 64)"),
    granularity: str = typer.Option("heads,neurons", "--granularity", help="comma list of heads, neurons, channels, units, blocks, or all"),
    scorer: str = SCORER,
    allocation: str = typer.Option(_A.allocation, "--allocation", help="global (by importance per FLOP) or uniform per layer"),
    cost: str = typer.Option(_A.cost, "--cost", help="price of a particle in global allocation: flops, or latency (measured per kind on this machine)"),
    min_quality: float = typer.Option(_T.min_quality, "--min-quality", help="floor: fraction of the dense model's validation quality (accuracy; 1/eps-MSE for video diffusion)"),
    max_fraction: float = typer.Option(_A.max_fraction, "--max-fraction", help="most of the remaining FLOPs removed per round",
                                       show_default="1/3"),
    recover_epochs: float = RECOVER_EPOCHS,
    final_recover_epochs: float = FINAL_RECOVER_EPOCHS,
    hidden_weight: Optional[float] = HIDDEN_WEIGHT,
    val_every: Optional[float] = VAL_EVERY,
    patience: int = PATIENCE,
    recover_focus: Optional[tuple[int, int]] = RECOVER_FOCUS,
    compensate: str = typer.Option(_A.compensate, "--compensate",
                                   help="how the kept particles' readers absorb each cut, from the calibration data: none; "
                                        "bias (removed particles' mean output folded into the bias); merge (each removed "
                                        "particle folded into its best-matching kept one); refit (least squares on all kept)"),
    min_width: float = MIN_WIDTH,
    round_to: Optional[int] = typer.Option(_A.round_to, "--round-to", min=1, help="keep each layer's width a multiple of this many features (a head is head_dim features wide)"),
    lr: Optional[float] = RECOVER_LR,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first N train/val examples"),
    seed: int = SEED,
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: dynamic int8 Linear layers after the loop"),
    data: Optional[Path] = typer.Option(None, "--data", help="CSV file for --task text-csv"),
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    out: Path = typer.Option(..., "--out", help="run folder: checkpoints, history.json, and the final model"),
    resume: bool = typer.Option(False, "--resume", help="continue a killed run in --out"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    trust_code: bool = typer.Option(False, "--trust-code", help="allow a saved model's own factory code to run"),
) -> None:
    """Prune → recover (distillation) → evaluate → repeat until the target; return the last model that meets the
    quality floor after its recovery. Exit status 3 when the target was not met (the model returned is saved)."""

    _quiet_transformers()
    if target_flops is None and target_params is None and target_latency_ms is None:
        target_flops = 0.5
    cfg = CompressConfig(
        target=Target(flops=target_flops, params=target_params, latency_ms=target_latency_ms, min_quality=min_quality),
        allocation=AllocationConfig(granularity=tuple(g.strip() for g in granularity.split(",") if g.strip()),
                                    scorer=scorer, allocation=allocation, cost=cost, max_fraction=max_fraction,
                                    min_width=min_width, round_to=round_to, compensate=compensate),
        recovery=RecoveryConfig(epochs=recover_epochs, final_epochs=final_recover_epochs, lr=lr, hidden_weight=hidden_weight,
                                val_every=val_every, patience=patience, focus=recover_focus),
        batch_size=batch_size, max_length=max_length, limit=limit, seed=seed, quantize=quantize,
    )
    cfg.check()
    t = _task(task, data, text_column, label_column)
    m = load_model(model, trust_code=trust_code)
    tok = load_tokenizer(model) if t.kind == "text" else None
    table = Table(title=f"compressing {model} on {t.name}")
    for col in ("round", "FLOPs", "params", "latency ms", f"val {t.quality_name}", "removed"):
        table.add_column(col, justify="right")
    with _progress_bar("compress") as bar:
        def progress(event: str, info: dict) -> None:
            if event == "recover":
                bar(info["step"], info["total"], f"round {info['round']}: recovering, loss {info.get('loss', 0):.3f}")
            elif event == "round":
                removed = sum(info["removed"].values())
                note = f" (final recovery {info['final_recovery']})" if info.get("final_recovery") else ""
                below = " (below the floor)" if info.get("below_floor") else ""
                console.print(f"round {info['round']}{note}: "
                              f"FLOPs {info['flops_ratio']:.1%}, val {t.quality_name} {info['quality']:.4f}{below}, "
                              f"latency {info['latency_ms']:.1f} ms, {removed:,} particles removed")
                table.add_row(str(info["round"]) + (" (final recovery)" if info.get("final_recovery") else "") + below,
                              f"{info['flops_ratio']:.1%}", f"{info['params']:,}", f"{info['latency_ms']:.1f}",
                              f"{info['quality']:.4f}", f"{removed:,}")
            elif event == "pruned":
                bar(0, None, f"round {info['round']}: pruned {sum(info['removed'].values()):,} particles")

        result = run_compress(m, t, tokenizer=tok, config=cfg, out=out, resume=resume, force=force, progress=progress)
    console.print(table)
    test = result.extra.get("compress", {}).get("test", {})
    shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "n" and isinstance(v, float))
    console.print(f"{escape(result.reason)}. Test: {shown}. Model (round {result.returned['round']}) and history.json "
                  f"in [bold]{escape(str(out))}[/bold]")
    if "int8" in result.extra.get("compress", {}):
        q = result.extra["compress"]["int8"]
        console.print(f"int8 dynamic: test accuracy {q['test']['accuracy']:.4f}, latency {q['latency_ms']:.1f} ms "
                      f"(fp32 {q['fp32_latency_ms']:.1f} ms)")
    if result.outcome is not None and not result.outcome.target_met:
        raise typer.Exit(TARGET_NOT_MET)


@app.command()
def sweep(
    model: str = typer.Argument(..., metavar="MODEL", help=MODEL_HELP),
    task: str = typer.Option(..., "--task", help="vader-sentiment, text-csv (with --data), fashion-mnist"),
    granularity: list[str] = typer.Option(["heads", "neurons", "blocks", "all"], "--granularity",
                                          help="repeat: heads, neurons, channels, units, blocks, all"),
    flops: list[str] = typer.Option(["0.9,0.7,0.5,0.3"], "--flops",
                                    help="FLOPs targets (repeat or comma list); a target a granularity cannot reach alone "
                                         "runs to the smallest model it allows"),
    recover_epochs: float = RECOVER_EPOCHS,
    scorer: str = SCORER,
    min_quality: float = typer.Option(0.0, "--min-quality", help="floor (default 0: reach every target)"),
    min_width: float = MIN_WIDTH,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    limit: Optional[int] = typer.Option(None, "--limit", help="use only the first N train/val examples"),
    lr: Optional[float] = RECOVER_LR,
    seed: int = SEED,
    data: Optional[Path] = typer.Option(None, "--data", help="CSV file for --task text-csv"),
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    out: Path = typer.Option(..., "--out", help="folder for sweep.csv and pareto.png"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    trust_code: bool = typer.Option(False, "--trust-code", help="allow a saved model's own factory code to run"),
) -> None:
    """Quality vs FLOPs (and latency) per particle granularity: one table and a Pareto plot."""

    try:
        targets = [float(v) for item in flops for v in item.split(",") if v.strip()]
    except ValueError:
        raise ParticlizeError(f"--flops takes numbers in (0, 1), e.g. --flops 0.9,0.5; got {flops}") from None
    _quiet_transformers()
    if out.exists() and any(out.iterdir()) and not force:
        raise ParticlizeError(f"{out} already exists and is not empty; pass --force to replace it")
    t = _task(task, data, text_column, label_column)
    m = load_model(model, trust_code=trust_code)
    tok = load_tokenizer(model) if t.kind == "text" else None
    with _progress_bar("sweep") as bar:
        def progress(event: str, info: dict) -> None:
            if event == "run":
                to = info.get("runs_to", info["target"])
                console.print(f"{info['granularity']} → {info['target']:.0%} of FLOPs"
                              + (f" (the least {info['granularity']} alone allow: {to:.1%})" if to != info["target"] else ""))
            elif event == "recover":
                bar(info["step"], info["total"], f"{info['granularity']} {info['target']:.0%} round {info['round']}")

        df = run_sweep(m, t, tokenizer=tok, granularities=granularity, flops=targets, out=out, force=force,
                       progress=progress, recover_epochs=recover_epochs, scorer=scorer, min_quality=min_quality,
                       batch_size=batch_size, max_length=max_length, limit=limit, lr=lr, seed=seed, min_width=min_width)
    console.print(_sweep_table(df, t.quality_name))
    console.print(f"full table (sweep.csv) and Pareto plot (pareto.png) in [bold]{out}[/bold]")


def _sweep_table(df: Any, quality: str) -> Table:
    """The sweep's rows as a table that fits a terminal: one line per (granularity, target), and why a run
    stopped short of its target in the last column (the whole reason is in sweep.csv)."""
    acc = "test_accuracy" in df
    table = Table(title=f"{quality} vs FLOPs kept, per granularity (the same recovery budget each)")
    for col in ("granularity", "target", "FLOPs", "params", "latency ms", "speedup", "val", "test", "note"):
        table.add_column(col, justify="left" if col in ("granularity", "note") else "right")
    for r in df.to_dict("records"):
        if r.get("flops_ratio") is None or math.isnan(r["flops_ratio"]):  # an error row: the run did not start
            table.add_row(r["granularity"], f"{r['target_flops']:.0%}", *["–"] * 6, str(r.get("error", "")))
            continue
        val, test = (r["val_accuracy"], r["test_accuracy"]) if acc else (r["val_quality"], r["test_quality"])
        note = "" if r["reached"] else f"the least {r['granularity']} alone allow" if r["runs_to"] != r["target_flops"] \
            else r["reason"]
        table.add_row(r["granularity"], f"{r['target_flops']:.0%}", f"{r['flops_ratio']:.1%}", f"{int(r['params']):,}",
                      f"{r['latency_ms']:.1f}", f"{r['dense_latency_ms'] / r['latency_ms']:.2f}×", f"{val:.4f}",
                      f"{test:.4f}", note)
    return table


@app.command("train-sora")
def train_sora_cmd(
    preset: str = typer.Option("tiny", "--preset", help="tiny (CPU) or small (GPU)"),
    steps: int = typer.Option(2000, "--steps", min=1, help="optimizer steps"),
    out: Path = typer.Option(..., "--out", help="folder to save the EMA weights to (a valid MODEL afterwards)"),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="videos per training batch"),
    lr: float = typer.Option(6e-4, "--lr", help="AdamW learning rate"),
    seed: int = SEED,
    min_snr_gamma: float = typer.Option(5.0, "--min-snr-gamma", min=0.0,
                                        help="Min-SNR loss weighting (0 turns it off)"),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="stop early and save after this long"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    init: Optional[Path] = typer.Option(None, "--init", help="continue from this trained model folder (same preset)"),
) -> None:
    """Train the Sora-style spacetime diffusion transformer on moving digits."""

    folder = train_sora(preset, steps, out, batch_size=batch_size, lr=lr, seed=seed, max_seconds=max_seconds,
                        min_snr_gamma=min_snr_gamma or None, device=device, progress=True, force=force, init=init)
    console.print(f"saved to [bold]{folder}[/bold]; sample with pz.load({str(folder)!r}).sample(labels)")


app.command("moefy")(moefy_command)  # MoEfication (particlize.moe); the command's options live with it
app.command("parallel")(parallel_command)  # particle-parallel check (particlize.parallel)


def _to(x: Any, device: str) -> Any:
    return {k: v.to(device) for k, v in x.items()} if isinstance(x, dict) else x.to(device)


def main(argv: list[str] | None = None) -> None:
    """Console entry point. Exit status: 0 done; 1 an error (one line on stderr); 2 a usage error (bad option);
    3 (`TARGET_NOT_MET`) `compress` finished without meeting its target (its model is saved); 130 interrupted."""
    try:
        code = app(args=argv, standalone_mode=False)
    except ParticlizeError as e:
        Console(stderr=True).print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # usage errors from Typer's click layer carry their own message and code
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        raise
    if code:  # a command's typer.Exit(code): standalone_mode=False returns it instead of exiting
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
