"""The closed loop: score → remove → recover (distillation) → evaluate → repeat, resumable.

Each round scores the particles on calibration data (a `Scorer`), removes at most ``max_fraction`` of the
remaining FLOPs (an `Allocator`: by default globally, by importance per FLOP, with minimum widths per layer
and optional ``round_to``; `particlize.allocate`), cuts them out physically, recovers the student by
distillation from the original model (`particlize.recover`), evaluates it on held-out data and writes an
atomic checkpoint until the target is met; a round below the quality floor does not stop it. The floor is
judged on what the user gets (`particlize.outcome`): the last model if it meets it after all its recovery, else
the last round that did. A killed run resumes from its last checkpoint to the same result: every round reseeds
from ``(seed, round)`` and checkpoints hold exact fp32 weights.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import decompose
from .allocate import (AllocationConfig, Allocator, Scorer, _shrink_plan, allocate, latency_prices, named_scorer,
                       original_sizes, smallest_shares)
from .errors import ParticlizeError
from .io import load, save, write_folder_atomically, write_model
from .measure import device_of, int8_report, latency_inputs, measure_latency, on_device
from .outcome import Outcome, Target, decide, target_met
from .particles import ParticleMap
from .recover import RecoveryConfig, check_applicable, recover
from .tasks import Task

HISTORY = "history.json"
Progress = Callable[[str, dict[str, Any]], None]  # (event, info)


# the flat option names (compress keywords, CLI options, runs saved before the split) → (part, field)
_RENAMED = {"target_flops": ("target", "flops"), "target_params": ("target", "params"),
            "target_latency_ms": ("target", "latency_ms"), "recover_epochs": ("recovery", "epochs"),
            "final_recover_epochs": ("recovery", "final_epochs"), "recover_focus": ("recovery", "focus")}
_PARTS = {"target": Target, "allocation": AllocationConfig, "recovery": RecoveryConfig}
_TUPLES = {"granularity", "focus"}


@dataclass
class CompressConfig:
    """Everything that decides a compression run (saved with it; a resumed run must match): the `Target`,
    the `AllocationConfig` (what is removed and how it is chosen), the `RecoveryConfig`, and the data and
    measurement settings every part shares. `from_options` builds one from the flat option names."""

    target: Target = field(default_factory=Target)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    recovery: RecoveryConfig = field(default_factory=RecoveryConfig)
    calib_examples: int = 256
    batch_size: int = 32
    max_length: int = 64
    limit: int | None = None
    seed: int = 0
    max_rounds: int = 20
    latency_batch: int = 32
    latency_seq: int = 64
    quantize: str | None = None

    def check(self) -> None:
        """Check every part; raise `ParticlizeError` naming the bad setting."""
        self.target.check()
        self.allocation.check()
        self.recovery.check()
        if self.quantize not in (None, "int8"):
            raise ParticlizeError(f"quantize must be None or 'int8', got {self.quantize!r}")

    @classmethod
    def from_options(cls, **options: Any) -> CompressConfig:
        """A config from flat option names (``target_flops=0.5, min_width=0.25, recover_epochs=1, lr=...``)."""
        cfg = cls()
        cfg.set(**options)
        return cfg

    def set(self, **options: Any) -> None:
        """Change settings by their flat option names; an unknown name raises `ParticlizeError`."""
        top = {f.name for f in fields(self)} - set(_PARTS)
        for k, v in options.items():
            if k == "reweight":  # before compensation verbs: reweight=True was the least-squares refit
                k, v = "compensate", ("refit" if v else "none")
            part, name = _RENAMED.get(k, (None, k))
            if part is None:
                part = next((p for p, c in _PARTS.items() if name in {f.name for f in fields(c)}), None)
            if part is None and k not in top:
                raise ParticlizeError(f"unknown compress option {k!r}")
            if name in _TUPLES and v is not None:
                v = tuple(v)
            setattr(getattr(self, part) if part else self, name, v)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressConfig:
        """The config a run saved (`to_dict`), or a run saved before the split (flat names); settings added
        since count at their defaults."""
        cfg = cls()
        for k, v in data.items():
            if k in _PARTS and isinstance(v, dict):
                part = getattr(cfg, k)
                known = {f.name for f in fields(part)}
                for n, x in v.items():
                    if n == "reweight":  # saved before compensation verbs
                        n, x = "compensate", ("refit" if x else "none")
                    if n not in known:
                        raise ParticlizeError(f"unknown compress option {k}.{n} (saved by another particlize version?)")
                    setattr(part, n, tuple(x) if n in _TUPLES and x is not None else x)
            else:
                cfg.set(**{k: v})
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The config as JSON data (tuples as lists), as saved in ``history.json``."""
        return json.loads(json.dumps(asdict(self), default=list))


@dataclass
class CompressResult:
    """The returned model, every round's history entry (``"below_floor": True`` on those below the floor), why
    the run ended (``reason``) and its `Outcome` (target met or not, which round was returned)."""

    model: nn.Module
    history: list[dict[str, Any]]
    reason: str
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    outcome: Outcome | None = None

    @property
    def returned(self) -> dict[str, Any]:
        """The history entry of the returned model (FLOPs, params, quality …)."""
        r = self.outcome.returned_round if self.outcome else self.history[-1]["round"]
        return next(e for e in self.history if e["round"] == r)


def _quality(task: Task, model: nn.Module, tokenizer: Any, cfg: CompressConfig, split: str = "val") -> dict[str, float]:
    return task.quality(model, split, tokenizer=tokenizer, batch_size=max(64, cfg.batch_size), limit=cfg.limit,
                        max_length=cfg.max_length)


# ---- checkpoints ------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _round_dir(out: Path, r: int) -> Path:
    return out / "rounds" / f"round-{r:03d}"


# ---- the loop ---------------------------------------------------------------------------------------


def compress(
    model: nn.Module,
    task: Task,
    *,
    tokenizer: Any = None,
    config: CompressConfig | None = None,
    out: str | os.PathLike[str] | None = None,
    resume: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    scorer: str | Scorer | None = None,
    allocator: Allocator | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> CompressResult:
    """Compress ``model`` on ``task`` until the target is met; return the last model that meets the quality floor.

    ``config`` (or keyword overrides by flat option name, as `CompressConfig.from_options` takes them:
    ``target_flops=0.5``, ``granularity=("heads", "neurons", "blocks")``, ``min_quality=0.99``,
    ``recover_epochs=1``, ``round_to=8``, …) sets the run. With ``out`` every round is checkpointed there and the final model is saved as a valid
    MODEL folder (``pz.load(out)``, tokenizer included) with ``history.json``; ``resume=True``
    continues a killed run. Quality is the task's `Task.quality` on validation data (accuracy for
    classifiers, 1 / ε-MSE for video diffusion models) relative to the dense model's.

    The floor (``min_quality``) is judged on what the user gets: a round below it after its own recovery is
    marked and the rounds go on; the last model is returned if it meets the floor after all its recovery, else
    the last round that did (round 0: the dense model). The `Outcome` (``CompressResult.outcome``, ``"outcome"``
    in ``history.json``) says if the target was met, which round was returned and why.

    ``final_recover_epochs`` > 0 recovers the last kept model that many more passes once the rounds are
    over, in chunks of ``recover_epochs`` passes (each a fresh learning-rate schedule, i.e. a warm
    restart, seeded ``seed * 1000 + 100 + k``; checkpointed and resumable like a round, and listed in
    the history with ``"final_recovery": k``). Short recoveries between cuts and a long one at the end
    cost less than long ones every round. The final model is the last chunk's if it meets the floor.

    ``scorer`` is a scorer registered in `particlize.analysis` (the config's ``scorer``) or a `Scorer` callable
    ``(pm, calibration batches, kinds) -> {group: importance}``; ``allocator`` an `Allocator` (default
    `particlize.allocate.allocate`) that turns importances and a FLOPs goal into the particles to remove. A
    callable is not saved with the run: resume a run with the same one.

    ``device`` is where the model runs (None: where its parameters are; else the model is moved there): the
    calibration batches and timed inputs are moved to it, models read back from checkpoints are placed on it,
    and importances come back to the CPU, where the allocation and the tables are made.
    """
    cfg = config or CompressConfig()
    cfg.set(**overrides)
    if isinstance(scorer, str):
        cfg.allocation.scorer = scorer
    cfg.check()
    check_applicable(cfg.recovery, task, model)  # here, not rounds later inside the first recovery
    score = scorer if callable(scorer) else named_scorer(cfg.allocation.scorer)
    allocator = allocator or allocate
    emit = progress or (lambda event, info: None)
    out_path = Path(out) if out is not None else None
    teacher = (model.to(device) if device is not None else model).eval()
    dev = device_of(teacher)
    kinds = cfg.allocation.kinds
    pm0 = decompose(teacher, seq_len=cfg.max_length)
    if not any(g.kind in kinds for g in pm0.groups):
        raise ParticlizeError(
            f"nothing to prune at granularity {', '.join(cfg.allocation.granularity)}: the model has "
            f"{', '.join(sorted({g.kind for g in pm0.groups})) or 'no'} particle groups"
        )
    dense_cost = pm0.cost()
    lat_inputs = latency_inputs(task, tokenizer, cfg.latency_batch, cfg.latency_seq)
    alloc = cfg.allocation.for_device(dev, next(teacher.parameters()).dtype)  # round_to: what the device likes
    _check_reachable(replace(cfg, allocation=alloc), pm0)  # before anything is written: an impossible target costs no round
    _check_latency_target(replace(cfg, allocation=alloc), teacher, pm0, lat_inputs, kinds)

    history: list[dict[str, Any]] = []
    start_round = 1
    pruned_reason = ""  # set once the pruning rounds are over (a resumed run then only finishes the final recovery)
    current = teacher
    if out_path is not None:
        state_file = out_path / HISTORY
        if resume and state_file.is_file():
            saved = json.loads(state_file.read_text())
            if _saved_config(saved) != cfg.to_dict():
                raise ParticlizeError(f"{out_path} was started with other settings; resume with the same options or use --force")
            history = saved["history"]
            last = history[-1]["round"]
            if last > 0:
                current = load(_round_dir(out_path, last), trust_code=True).to(dev)
            start_round = last + 1
            pruned_reason = saved.get("pruned", "")
            if saved.get("done"):
                done = (Outcome.from_dict(saved["outcome"]) if "outcome" in saved  # saved before outcomes: the last round
                        else decide(cfg.target, history, saved["reason"], task.quality_name))
                return _finish(out_path, history, done, cfg, task, tokenizer, emit, teacher)
        elif out_path.exists() and any(out_path.iterdir()) and not (force or resume):
            raise ParticlizeError(f"{out_path} already exists and is not empty; pass --resume to continue it or --force to replace it")
        elif force and out_path.exists():
            shutil.rmtree(out_path)
        if not state_file.is_file():
            out_path.mkdir(parents=True, exist_ok=True)

    if not history:
        q = _quality(task, teacher, tokenizer, cfg)
        history.append(_entry(0, teacher, pm0, dense_cost, q, measure_latency(teacher, lat_inputs), {}, 0.0))
        if cfg.allocation.cost == "latency":  # measured once and kept, so a resumed run allocates the same way
            history[0]["latency_prices"] = latency_prices(teacher, pm0, lat_inputs, alloc, kinds)
        emit("round", history[-1])
        _save_state(out_path, cfg, history, done=False)
    held: dict[int, nn.Module] | None = None if out_path is not None else {}  # no checkpoints: the rollback model
    reason = pruned_reason or f"stopped after {cfg.max_rounds} rounds"
    carried: ParticleMap | None = None  # the map of `current`, carried through surgery instead of decomposed again
    for r in range(start_round, cfg.max_rounds + 1) if not pruned_reason else ():
        if target_met(cfg.target, history[-1]):
            reason = "target met"
            break
        torch.manual_seed(cfg.seed * 1000 + r)
        t0 = time.perf_counter()
        pm = carried if carried is not None else decompose(current, seq_len=cfg.max_length)
        calib = on_device(task.calibration(current, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                           limit=cfg.calib_examples, seed=cfg.seed * 1000 + r), dev)
        importance = score(pm, calib, kinds)
        for k in importance:  # in place: a scorer's dict subclass (pairs) stays what it is
            importance[k] = torch.as_tensor(importance[k]).detach().cpu()
        cur_flops = pm.cost().flops
        goal = _flops_goal(cfg, history, dense_cost.flops, cur_flops)
        remove = allocator(pm, importance, min(goal, cfg.allocation.max_fraction * cur_flops), alloc, cfg.max_length,
                             history[0].get("latency_prices"), original_sizes(teacher, current, pm, pm0))
        if not remove:
            reason = "nothing more can be removed within the minimum widths"
            break
        spm = pm.pruned(remove, compensate=cfg.allocation.compensate, data=calib)
        student = spm.model
        emit("pruned", {"round": r, "removed": {k: len(v) for k, v in remove.items()}})
        try:
            rec = _recover(student, teacher, task, tokenizer, cfg, r, emit, seed=cfg.seed * 1000 + r)
        except ParticlizeError as e:
            reason = f"recovery failed in round {r} ({e})"
            break
        q = _quality(task, student, tokenizer, cfg)
        entry = _entry(r, student, spm, dense_cost, q, measure_latency(student, lat_inputs),
                       {k: len(v) for k, v in remove.items()}, time.perf_counter() - t0, rec)
        _keep_round(out_path, cfg, history, entry, student, emit, held=held)  # below the floor too: judged at the end
        current, carried = student, spm  # recovery trains weights in place: the map still describes the model
    if target_met(cfg.target, history[-1]):
        reason = "target met"
    if cfg.recovery.final_epochs > 0:
        current, reason = _final_recovery(current, teacher, task, tokenizer, cfg, history, dense_cost, lat_inputs,
                                          out_path, reason, emit, held)
    outcome = decide(cfg.target, history, reason, task.quality_name)
    if out_path is None:
        r = outcome.returned_round
        best = current if r == history[-1]["round"] else teacher if r == 0 else (held or {})[r]
        return CompressResult(best, history, outcome.reason, outcome=outcome)
    _save_state(out_path, cfg, history, done=True, reason=outcome.reason, outcome=outcome)
    return _finish(out_path, history, outcome, cfg, task, tokenizer, emit, teacher)


def _final_recovery(current: nn.Module, teacher: nn.Module, task: Task, tokenizer: Any, cfg: CompressConfig,
                    history: list[dict[str, Any]], dense_cost: Any, lat_inputs: Any, out_path: Path | None, reason: str,
                    emit: Progress, held: dict[int, nn.Module] | None = None) -> tuple[nn.Module, str]:
    """`compress`'s recovery after the rounds: chunks of ``recover_epochs`` passes, each checkpointed as a round."""
    chunk = cfg.recovery.epochs if cfg.recovery.epochs > 0 else cfg.recovery.final_epochs
    n_chunks = math.ceil(cfg.recovery.final_epochs / chunk - 1e-9)
    done = sum(1 for e in history if e.get("final_recovery"))
    _save_state(out_path, cfg, history, done=False, pruned=reason)
    if current is teacher:  # nothing was cut: recover a copy, never the caller's model
        current = copy.deepcopy(teacher)
    for k in range(done, n_chunks):
        epochs = min(chunk, cfg.recovery.final_epochs - k * chunk)
        r = history[-1]["round"] + 1
        t0 = time.perf_counter()
        before = {n: t.detach().clone() for n, t in current.state_dict().items()}  # recovery trains in place
        try:
            rec = _recover(current, teacher, task, tokenizer, replace(cfg, recovery=replace(cfg.recovery, epochs=epochs)), r, emit,
                           seed=cfg.seed * 1000 + 100 + k)
        except ParticlizeError as e:
            current.load_state_dict(before)
            return current, f"{reason}; final recovery failed in chunk {k + 1} ({e}), kept the model before it"
        del before
        q = _quality(task, current, tokenizer, cfg)
        entry = _entry(r, current, decompose(current, seq_len=cfg.max_length), dense_cost, q,
                       measure_latency(current, lat_inputs), {}, time.perf_counter() - t0, rec)
        entry["final_recovery"] = k + 1
        _keep_round(out_path, cfg, history, entry, current, emit, pruned=reason, held=held)
    return current, f"{reason}; then {n_chunks} final recovery chunk{'s' if n_chunks > 1 else ''}"


def _keep_round(out_path: Path | None, cfg: CompressConfig, history: list[dict[str, Any]], entry: dict[str, Any],
                model: nn.Module, emit: Progress, pruned: str = "", held: dict[int, nn.Module] | None = None) -> None:
    """Record a finished round (or final-recovery chunk): history, progress, checkpoint, state file. A round
    below the floor is marked; without checkpoints (``held``), a copy of the last one that meets it is kept."""
    if entry["quality"] < cfg.target.min_quality * history[0]["quality"]:
        entry["below_floor"] = True
    elif held is not None:  # recovery trains in place (final chunks): a copy, not the model itself
        held.clear()
        held[entry["round"]] = copy.deepcopy(model)
    history.append(entry)
    emit("round", entry)
    if out_path is not None:
        write_folder_atomically(_round_dir(out_path, entry["round"]), lambda d: write_model(model, d), force=True)
    _save_state(out_path, cfg, history, done=False, pruned=pruned)


def _finish(out: Path, history: list, outcome: Outcome, cfg: CompressConfig, task: Task, tokenizer: Any,
            emit: Progress, teacher: nn.Module) -> CompressResult:
    r, reason = outcome.returned_round, outcome.reason
    best = teacher if r == 0 else load(_round_dir(out, r), trust_code=True).to(device_of(teacher))
    test = _quality(task, best, tokenizer, cfg, split="test")
    extra: dict[str, Any] = {"compress": {"reason": reason, "rounds": r, "test": test, "config": cfg.to_dict(),
                                          "outcome": outcome.to_dict()}}
    if cfg.quantize == "int8":
        inputs = latency_inputs(task, tokenizer, cfg.latency_batch, cfg.latency_seq)
        extra["compress"]["int8"] = int8_report(best, task, tokenizer, inputs, batch_size=max(64, cfg.batch_size),
                                                limit=cfg.limit, max_length=cfg.max_length)
    def fill(tmp: Path) -> None:
        save(best, tmp / "m", tokenizer=tokenizer, extra=extra)
        for f in (tmp / "m").iterdir():
            f.rename(tmp / f.name)
        (tmp / "m").rmdir()

    # the model files sit beside history.json and rounds/: replace just them, atomically per file
    staging = out / ".final"
    if staging.exists():
        shutil.rmtree(staging)
    write_folder_atomically(staging, fill, force=True)
    for f in staging.iterdir():
        f.replace(out / f.name)
    staging.rmdir()
    _save_state(out, cfg, history, done=True, reason=reason, test=test, outcome=outcome)
    emit("done", {"reason": reason, "test": test, "outcome": outcome.to_dict()})
    return CompressResult(best, history, reason, out, extra, outcome)


def _save_state(out: Path | None, cfg: CompressConfig, history: list, *, done: bool, reason: str = "",
                test: dict | None = None, pruned: str = "", outcome: Outcome | None = None) -> None:
    if out is None:
        return
    data: dict[str, Any] = {"config": cfg.to_dict(), "history": history, "done": done, "reason": reason}
    if outcome is not None:
        data["outcome"] = outcome.to_dict()
    if pruned:
        data["pruned"] = pruned
    if test is not None:
        data["test"] = test
    _write_json(out / HISTORY, data)


def _saved_config(saved: dict[str, Any]) -> dict[str, Any] | None:
    """The config a saved run asked for, as `CompressConfig.to_dict` gives it (None: not one this version reads)."""
    try:
        return CompressConfig.from_dict(saved.get("config", {})).to_dict()
    except ParticlizeError:
        return None


def _entry(r: int, model: nn.Module, pm: ParticleMap, dense, q: dict, latency: float, removed: dict,
           seconds: float, recovery: dict | None = None) -> dict[str, Any]:
    c = pm.cost()
    counts: dict[str, int] = {}
    for g in pm.groups:
        counts[g.kind] = counts.get(g.kind, 0) + g.size
    return {
        "round": r, "params": sum(p.numel() for p in model.parameters()), "prunable_params": c.params,
        "flops": c.flops, "flops_ratio": c.flops / dense.flops, "params_ratio": c.params / dense.params,
        "latency_ms": latency, "quality": q["quality"], "val": {k: v for k, v in q.items() if k != "quality"},
        "particles": counts, "removed": removed, "seconds": seconds, "recovery": recovery or {},
        **({"val_accuracy": q["accuracy"]} if "accuracy" in q else {}),
    }


def _flops_goal(cfg: CompressConfig, history: list, dense_flops: float, cur_flops: float) -> float:
    goals = []
    if cfg.target.flops is not None:
        goals.append(cur_flops - cfg.target.flops * dense_flops)
    if cfg.target.params is not None:  # params and FLOPs shrink together for the particles we remove
        last = history[-1]
        goals.append(cur_flops * (1 - cfg.target.params / max(last["params_ratio"], 1e-12)))
    if cfg.target.latency_ms is not None:
        last = history[-1]
        goals.append(cur_flops * (1 - cfg.target.latency_ms / max(last["latency_ms"], 1e-12)))
    return max(max(goals), 0.0) if goals else 0.0


def _check_reachable(cfg: CompressConfig, pm: ParticleMap) -> None:
    """Refuse a FLOPs or params target below what the smallest model the settings allow keeps, instead of
    finding out rounds of recovery later."""
    for what, target, small in zip(("FLOPs", "params"), (cfg.target.flops, cfg.target.params), smallest_shares(pm, cfg.allocation)):
        if target is not None and small > target + 1e-9:
            raise ParticlizeError(
                f"target {what} {target:g} is below {small:.3f}, the share of the {what} the smallest model "
                f"these settings allow keeps (granularity {','.join(cfg.allocation.granularity)}; every group at its minimum "
                f"width {cfg.allocation.min_width:g}{f', round_to {cfg.allocation.round_to}' if cfg.allocation.round_to else ''}); raise the target, "
                "lower --min-width or add a granularity"
            )


def _check_latency_target(cfg: CompressConfig, model: nn.Module, pm: ParticleMap, inputs: Any, kinds: set[str]) -> None:
    """Refuse a latency target below what the smallest model the settings allow could reach."""
    if cfg.target.latency_ms is None:
        return
    smallest = pm.prune(_shrink_plan(pm, cfg.allocation, kinds))
    best = measure_latency(smallest, inputs)
    if cfg.target.latency_ms < best:
        raise ParticlizeError(
            f"target latency {cfg.target.latency_ms:.2f} ms is below {best:.2f} ms, the latency of the smallest model "
            "these settings allow (every group at its minimum width); raise the target or lower --min-width"
        )


def _recover(student: nn.Module, teacher: nn.Module, task: Task, tokenizer: Any, cfg: CompressConfig, r: int,
             emit: Progress, *, seed: int) -> dict[str, Any]:
    if cfg.recovery.epochs == 0:
        return {"epochs": 0}

    def prog(step: int, total: int, info: dict) -> None:
        emit("recover", {"round": r, "step": step, "total": total, **info})

    return recover(student, teacher, task, cfg.recovery, tokenizer=tokenizer, batch_size=cfg.batch_size,
                   max_length=cfg.max_length, limit=cfg.limit, seed=seed, progress=prog)


__all__ = ["CompressConfig", "CompressResult", "Outcome", "Target", "compress"]
