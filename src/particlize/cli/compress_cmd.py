"""``particlize compress`` (the closed loop to a target) and ``particlize sweep`` (quality vs FLOPs per granularity)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..allocate import AllocationConfig
from ..errors import ParticlizeError
from ..loop import HISTORY, CompressConfig, Target
from ..loop import compress as run_compress
from ..recover import RecoveryConfig
from ..report import write_report
from ..sources import load_model, load_tokenizer
from ..sweep import sweep as run_sweep
from ._common import BATCH_SIZE, DATA, DEVICE, GRANULARITY, JSON, LABEL_COLUMN, REPORT, LIMIT, MAX_LENGTH, MODEL, SCORER, SEED, \
    TASK, TEXT_COLUMN, TRUST_CODE, check_device, console, kinds_list, print_json, progress_bar, quiet_transformers, \
    refuse_existing, task_for

TARGET_NOT_MET = 3  # exit status of `compress` when it stopped short of its target (1: errors, 2: usage errors)
DEFAULT_TARGET_FLOPS = 0.5
# defaults read from the config parts (particlize.loop.Target, particlize.allocate.AllocationConfig,
# particlize.recover.RecoveryConfig), shared by compress and sweep
_A, _R, _T = AllocationConfig(), RecoveryConfig(), Target()
MIN_WIDTH = typer.Option(_A.min_width, "--min-width", min=0.0, max=1.0,
                         help="smallest share of each layer's original heads / neurons / channels kept")
RECOVER_EPOCHS = typer.Option(float(_R.epochs), "--recover-epochs", min=0.0,
                              help="recovery passes over the training data per round (fractional: part of a pass)")
RECOVER_LR = typer.Option(_R.lr, "--lr", help="recovery learning rate (default 1.5e-4 text / 1e-3 images / 3e-4 video DiTs)")
# the config's flat names whose CLI flag is not the name with dashes
_FLAGS = {"target.flops": "--target-flops", "target.params": "--target-params", "target.latency_ms": "--target-latency-ms",
          "recovery.epochs": "--recover-epochs", "recovery.final_epochs": "--final-recover-epochs",
          "recovery.focus": "--recover-focus"}


def compress_command(
    model: str = MODEL,
    task: str = TASK,
    target_flops: Optional[float] = typer.Option(None, "--target-flops", help=f"fraction of the dense FLOPs to keep, e.g. 0.5 (the default when no --target-* is given: {DEFAULT_TARGET_FLOPS})"),
    target_params: Optional[float] = typer.Option(None, "--target-params", help="fraction of prunable parameters to keep"),
    target_latency_ms: Optional[float] = typer.Option(None, "--target-latency-ms", help="measured latency to reach (CPU, batch 32 × 64)"),
    granularity: list[str] = typer.Option(["heads,neurons"], "--granularity", help=GRANULARITY),
    scorer: str = typer.Option(_A.scorer, "--scorer", help=SCORER),
    allocation: str = typer.Option(_A.allocation, "--allocation", help="auto (uniform when only conv channels are cut, else global), global (by importance per FLOP) or uniform per layer"),
    cost: str = typer.Option(_A.cost, "--cost", help="price of a particle in global allocation: flops, or latency (measured per kind on this machine)"),
    min_quality: float = typer.Option(_T.min_quality, "--min-quality", help="floor: fraction of the dense model's validation quality (accuracy; 1/eps-MSE for video diffusion)"),
    max_fraction: float = typer.Option(_A.max_fraction, "--max-fraction", show_default=False, help="most of the remaining FLOPs removed per round  [default: one third]"),
    recover_epochs: float = RECOVER_EPOCHS,
    final_recover_epochs: float = typer.Option(float(_R.final_epochs), "--final-recover-epochs", min=0.0, help="more recovery passes after the last round, in chunks of --recover-epochs (warm restarts, checkpointed)"),
    hidden_weight: Optional[float] = typer.Option(_R.hidden_weight, "--hidden-weight", min=0.0, help="layer-wise distillation: weight of each block's output MSE to the original's (default 5 for text classifiers, 0 otherwise)"),
    val_every: Optional[float] = typer.Option(_R.val_every, "--val-every", min=0.0, max=1.0, help="validate every this fraction of an epoch during recovery (e.g. 0.1), so early stopping (--patience) can act part-way"),
    patience: int = typer.Option(_R.patience, "--patience", min=1, help="recovery stops after this many validations without a better one"),
    recover_focus: Optional[tuple[int, int]] = typer.Option(_R.focus, "--recover-focus", metavar="LO HI", help="video diffusion: spend half of each recovery batch at diffusion steps LO..HI (sora-tiny: 490 795)"),
    compensate: str = typer.Option(_A.compensate, "--compensate", help="how the kept particles' readers absorb each cut, from the calibration data: none; bias (removed particles' mean output folded into the bias); merge (each removed particle folded into its best-matching kept one); refit (least squares on all kept)"),
    min_width: float = MIN_WIDTH,
    round_to: Optional[int] = typer.Option(_A.round_to, "--round-to", min=1, help="keep each layer's width a multiple of this many features (a head is head_dim features wide); default: by device and dtype (none on a CPU; 8 fp32, 64 bf16/fp16 on a GPU)"),
    lr: Optional[float] = RECOVER_LR,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    limit: Optional[int] = LIMIT,
    seed: int = SEED,
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: dynamic int8 Linear layers after the loop"),
    data: Optional[Path] = DATA,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    device: str = DEVICE,
    out: Path = typer.Option(..., "--out", help="run folder: checkpoints, history.json, and the final model"),
    json_out: bool = JSON,
    report: bool = REPORT,
    resume: bool = typer.Option(False, "--resume", help="continue a killed run in --out (with the same options)"),
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Prune → recover (distillation) → evaluate → repeat until the target (default: 50% of the FLOPs); return the
    last model that meets the quality floor after its recovery. Exit status 3 when the target was not met (the
    model returned is saved)."""
    if resume and force:
        raise ParticlizeError("--resume continues the run in --out and --force replaces it: pass only one of them")
    say = console(json_out)
    if target_flops is None and target_params is None and target_latency_ms is None:
        target_flops = DEFAULT_TARGET_FLOPS
        say.print(f"no target given: aiming at {DEFAULT_TARGET_FLOPS:.0%} of the dense model's FLOPs "
                  f"(--target-flops {DEFAULT_TARGET_FLOPS}; see --target-params, --target-latency-ms)")
    cfg = CompressConfig(
        target=Target(flops=target_flops, params=target_params, latency_ms=target_latency_ms, min_quality=min_quality),
        allocation=AllocationConfig(granularity=kinds_list(granularity), scorer=scorer, allocation=allocation,
                                    cost=cost, max_fraction=max_fraction, min_width=min_width, round_to=round_to,
                                    compensate=compensate),
        recovery=RecoveryConfig(epochs=recover_epochs, final_epochs=final_recover_epochs, lr=lr, hidden_weight=hidden_weight,
                                val_every=val_every, patience=patience, focus=recover_focus),
        batch_size=batch_size, max_length=max_length, limit=limit, seed=seed, quantize=quantize,
    )
    cfg.check()
    if resume:
        _check_same_settings(out, cfg)
    check_device(device)
    quiet_transformers()
    t = task_for(task, data, text_column, label_column)
    m = load_model(model, trust_code=trust_code).to(device)
    tok = load_tokenizer(model) if t.kind == "text" else None
    with progress_bar("compress") as bar:
        def progress(event: str, info: dict) -> None:
            if event == "recover":
                bar(info["step"], info["total"], f"round {info['round']}: recovering, loss {info.get('loss', 0):.3f}")
            elif event == "round":
                removed = sum(info["removed"].values())
                note = f" (final recovery {info['final_recovery']})" if info.get("final_recovery") else ""
                below = " (below the floor)" if info.get("below_floor") else ""
                say.print(f"round {info['round']}{note}: FLOPs {info['flops_ratio']:.1%}, val {t.quality_name} "
                          f"{info['quality']:.4f}{below}, latency {info['latency_ms']:.1f} ms, {removed:,} particles removed")
            elif event == "pruned":
                bar(0, None, f"round {info['round']}: pruned {sum(info['removed'].values()):,} particles")

        result = run_compress(m, t, tokenizer=tok, config=cfg, out=out, resume=resume, force=force, progress=progress,
                              device=device)
    extra = result.extra.get("compress", {})
    test = {k: v for k, v in extra.get("test", {}).items() if isinstance(v, (int, float))}
    met = result.outcome is None or result.outcome.target_met
    page = _report(out, t, say) if report else None
    if json_out:
        keys = ("round", "flops_ratio", "params", "params_ratio", "latency_ms", "quality", "removed", "final_recovery", "below_floor")
        print_json({"target_met": met, "reason": result.reason, "returned_round": result.returned["round"],
                    "out": str(out), "report": None if page is None else str(page), "test": test, "int8": extra.get("int8"),
                    "rounds": [{k: e[k] for k in keys if k in e} for e in result.history]})
    else:
        say.print(_rounds_table(result.history, f"compressing {model} on {t.name}", t.quality_name))
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k != "n")
        say.print(f"{escape(result.reason)}. Test: {shown}. Model (round {result.returned['round']}) and history.json "
                  f"in [bold]{escape(str(out))}[/bold]")
        if "int8" in extra:
            q = extra["int8"]
            say.print(f"int8 dynamic: test accuracy {q['test']['accuracy']:.4f}, latency {q['latency_ms']:.1f} ms "
                      f"(fp32 {q['fp32_latency_ms']:.1f} ms)")
    if not met:
        raise typer.Exit(TARGET_NOT_MET)


def _report(out: Path, task: Any, say: Any) -> Path:
    """The run's report.html (replaced on a resumed run), analysed on the run's task."""
    with progress_bar("report") as bar:
        bar(0, None, "analysing the particles for the report")
        page = write_report(out, task=task, force=True)
    say.print(f"report: [bold]{escape(str(page))}[/bold]")
    return page


def _rounds_table(history: list[dict[str, Any]], title: str, quality: str) -> Table:
    """Every round of a run (a resumed or finished one too: read from its history, not from live events)."""
    table = Table(title=title)
    for col in ("round", "FLOPs", "params", "latency ms", f"val {quality}", "removed"):
        table.add_column(col, justify="right")
    for e in history:
        label = str(e["round"]) + (" (final recovery)" if e.get("final_recovery") else "") \
            + (" (below the floor)" if e.get("below_floor") else "")
        table.add_row(label, f"{e['flops_ratio']:.1%}", f"{e['params']:,}", f"{e['latency_ms']:.1f}",
                      f"{e['quality']:.4f}", f"{sum(e.get('removed', {}).values()):,}")
    return table


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _check_same_settings(out: Path, cfg: CompressConfig) -> None:
    """``--resume`` with other settings than the run in ``out`` was started with: an error naming each one."""
    state = out / HISTORY
    if not state.is_file():
        return
    try:
        saved = _flat(CompressConfig.from_dict(json.loads(state.read_text()).get("config", {})).to_dict())
    except (ParticlizeError, ValueError):
        return  # the loop says what is wrong with the saved run
    now = _flat(cfg.to_dict())
    diff = [k for k in now if saved.get(k) != now[k]]
    if diff:
        said = "; ".join(f"{_FLAGS.get(k, '--' + k.rpartition('.')[2].replace('_', '-'))} was {_show(saved.get(k))}, "
                         f"now {_show(now[k])}" for k in diff)
        raise ParticlizeError(f"{out} was started with other settings ({said}); resume with the same options, "
                              "or start a new run with --force")


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v))
    return "unset" if v is None else str(v)


def sweep_command(
    model: str = MODEL,
    task: str = TASK,
    granularity: list[str] = typer.Option(["heads", "neurons", "blocks", "all"], "--granularity", help=GRANULARITY + "; one run per value"),
    flops: list[str] = typer.Option(["0.9,0.7,0.5,0.3"], "--flops", help="FLOPs targets (repeat or comma list); a target a granularity cannot reach alone runs to the smallest model it allows"),
    recover_epochs: float = RECOVER_EPOCHS,
    scorer: str = typer.Option(_A.scorer, "--scorer", help=SCORER),
    min_quality: float = typer.Option(0.0, "--min-quality", help="floor (default 0: reach every target)"),
    min_width: float = MIN_WIDTH,
    batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
    limit: Optional[int] = LIMIT,
    lr: Optional[float] = RECOVER_LR,
    seed: int = SEED,
    data: Optional[Path] = DATA,
    text_column: str = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    device: str = DEVICE,
    out: Path = typer.Option(..., "--out", help="folder for sweep.csv, pareto.png and report.html"),
    report: bool = REPORT,
    force: bool = typer.Option(False, "--force", help="replace an existing --out"),
    trust_code: bool = TRUST_CODE,
) -> None:
    """Quality vs FLOPs (and latency) per particle granularity: one table and a Pareto plot."""
    try:
        targets = [float(v) for item in flops for v in item.split(",") if v.strip()]
    except ValueError:
        raise ParticlizeError(f"--flops takes numbers in (0, 1), e.g. --flops 0.9,0.5; got {','.join(flops)}") from None
    kinds = kinds_list(granularity)
    refuse_existing(out, force)
    check_device(device)
    quiet_transformers()
    t = task_for(task, data, text_column, label_column)
    m = load_model(model, trust_code=trust_code).to(device)
    tok = load_tokenizer(model) if t.kind == "text" else None
    say = console()
    with progress_bar("sweep") as bar:
        def progress(event: str, info: dict) -> None:
            if event == "run":
                to = info.get("runs_to", info["target"])
                say.print(f"{info['granularity']} → {info['target']:.0%} of FLOPs"
                          + (f" (the least {info['granularity']} alone allow: {to:.1%})" if to != info["target"] else ""))
            elif event == "recover":
                bar(info["step"], info["total"], f"{info['granularity']} {info['target']:.0%} round {info['round']}")

        df = run_sweep(m, t, tokenizer=tok, granularities=kinds, flops=targets, out=out, force=force, device=device,
                       progress=progress, recover_epochs=recover_epochs, scorer=scorer, min_quality=min_quality,
                       batch_size=batch_size, max_length=max_length, limit=limit, lr=lr, seed=seed, min_width=min_width)
    say.print(_sweep_table(df, t.quality_name))
    say.print(f"full table (sweep.csv) and Pareto plot (pareto.png) in [bold]{escape(str(out))}[/bold]")
    if report:
        say.print(f"report: [bold]{escape(str(write_report(out, force=True)))}[/bold]")


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
