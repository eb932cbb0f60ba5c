"""The closed loop: score → remove → recover (distillation) → evaluate → repeat, resumable.

Each round scores the particles on calibration data, removes at most ``max_fraction`` of the remaining
FLOPs (globally, by importance per FLOP, with minimum widths per layer and optional ``round_to``),
cuts them out physically, recovers the student by distillation from the original model, evaluates it on
held-out data and writes an atomic checkpoint. It stops at the target or when the next round would break
the quality floor, and returns the best model that met it. A killed run resumes from its last checkpoint
to the same result: every round reseeds from ``(seed, round)`` and checkpoints hold exact fp32 weights.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapters import decompose
from .analysis import analyze
from .errors import ParticlizeError
from .io import load, save, write_folder_atomically
from .particles import ParticleGroup, ParticleMap
from .tasks import Task
from .analysis._common import call

GRANULARITIES = {"heads": "head", "neurons": "neuron", "channels": "channel", "units": "unit", "blocks": "block"}
HISTORY = "history.json"
Progress = Callable[[str, dict[str, Any]], None]  # (event, info)


@dataclass
class CompressConfig:
    """Everything that decides a compression run (saved with it; a resumed run must match)."""

    target_flops: float | None = 0.5
    target_params: float | None = None
    target_latency_ms: float | None = None
    granularity: tuple[str, ...] = ("heads", "neurons")
    scorer: str = "fisher"  # chosen by measurement: benchmarks/scorer_oneshot.py, RESULTS.md
    allocation: str = "global"
    cost: str = "flops"  # what global allocation prices particles by: "flops" or measured "latency"
    min_quality: float = 0.99
    max_fraction: float = 1 / 3
    min_width: float = 0.1
    round_to: int | None = None  # kept widths in features (heads count head_dim each) are multiples of this
    recover_epochs: float = 1  # per round; fractional: part of a pass (iterative rounds within one epoch)
    final_recover_epochs: float = 0  # more recovery after the last round, in chunks of recover_epochs (warm restarts)
    lr: float | None = None
    kd_alpha: float = 0.5
    temperature: float = 2.0
    hidden_weight: float | None = None  # layer-wise distillation weight (blocks' output MSE); None: the task's default
    val_every: float | None = None  # validate every this fraction of an epoch in recovery (early stopping part-way)
    patience: int = 1  # recovery stops after this many validations without a better validation accuracy
    recover_focus: tuple[int, int] | None = None  # video diffusion: half of each recovery batch at diffusion steps lo..hi
    reweight: bool = False  # refit the cut readers by least squares on the calibration data before recovery
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
        targets = [t for t in (self.target_flops, self.target_params) if t is not None]
        if not targets and self.target_latency_ms is None:
            raise ParticlizeError("give a target: target_flops, target_params (fractions) or target_latency_ms")
        for name in ("target_flops", "target_params"):
            v = getattr(self, name)
            if v is not None and not 0.0 < v < 1.0:
                raise ParticlizeError(f"{name} is the fraction of the dense model to keep: it must be in (0, 1), got {v}")
        if self.target_latency_ms is not None and self.target_latency_ms <= 0:
            raise ParticlizeError(f"target_latency_ms must be positive, got {self.target_latency_ms}")
        bad = [g for g in self.granularity if g not in GRANULARITIES and g != "all"]
        if bad:
            raise ParticlizeError(f"unknown granularity {bad}; use {', '.join(GRANULARITIES)} or all")
        if self.recover_epochs < 0:
            raise ParticlizeError(f"recover_epochs must be 0 or more, got {self.recover_epochs}")
        if self.final_recover_epochs < 0:
            raise ParticlizeError(f"final_recover_epochs must be 0 or more, got {self.final_recover_epochs}")
        if self.hidden_weight is not None and self.hidden_weight < 0:
            raise ParticlizeError(f"hidden_weight must be 0 or more, got {self.hidden_weight}")
        if self.val_every is not None and not 0.0 < self.val_every <= 1.0:
            raise ParticlizeError(f"val_every is a fraction of an epoch in (0, 1], got {self.val_every}")
        if self.patience < 1:
            raise ParticlizeError(f"patience counts validations: 1 or more, got {self.patience}")
        if self.recover_focus is not None and not (len(self.recover_focus) == 2 and 0 <= self.recover_focus[0] <= self.recover_focus[1]):
            raise ParticlizeError(f"recover_focus is a window of diffusion steps (lo, hi) with 0 <= lo <= hi, got {self.recover_focus}")
        if not 0.0 <= self.min_width <= 1.0:
            raise ParticlizeError(f"min_width is the share of each layer's original width kept at least: in [0, 1], got {self.min_width}")
        if self.round_to is not None and self.round_to < 1:
            raise ParticlizeError(f"round_to must be a positive number of features, got {self.round_to}")
        if not 0.0 < self.max_fraction <= 1.0:
            raise ParticlizeError(f"max_fraction must be in (0, 1], got {self.max_fraction}")
        if not 0.0 <= self.min_quality <= 1.5:
            raise ParticlizeError(
                f"min_quality is relative to the dense model's quality, e.g. its accuracy (0.99; 0 for no floor), got {self.min_quality}"
            )
        if self.scorer not in SCORERS:
            raise ParticlizeError(f"unknown scorer {self.scorer!r}; use one of {', '.join(SCORERS)}")
        if self.allocation not in ("global", "uniform"):
            raise ParticlizeError(f"allocation must be 'global' or 'uniform', got {self.allocation!r}")
        if self.cost not in ("flops", "latency"):
            raise ParticlizeError(f"cost must be 'flops' or 'latency', got {self.cost!r}")
        if self.quantize not in (None, "int8"):
            raise ParticlizeError(f"quantize must be None or 'int8', got {self.quantize!r}")

    @property
    def kinds(self) -> set[str]:
        if "all" in self.granularity:
            return set(GRANULARITIES.values())
        return {GRANULARITIES[g] for g in self.granularity}


@dataclass
class CompressResult:
    """The best model that met the floor, the round history and why the loop stopped."""

    model: nn.Module
    history: list[dict[str, Any]]
    reason: str
    out: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---- measurement ------------------------------------------------------------------------------------


def latency_inputs(task: Task, tokenizer: Any, batch: int, seq: int) -> Any:
    """A fixed-shape batch to time a forward on (`Task.latency_inputs`)."""
    return task.latency_inputs(tokenizer, batch, seq)


@torch.inference_mode()
def measure_latency(model: nn.Module, inputs: Any, *, warmup: int = 2, reps: int = 5) -> float:
    """Median wall time of a forward on ``inputs`` in milliseconds."""
    was = model.training
    model.eval()
    for _ in range(warmup):
        call(model, inputs)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call(model, inputs)
        times.append((time.perf_counter() - t) * 1e3)
    model.train(was)
    return statistics.median(times)


def _quality(task: Task, model: nn.Module, tokenizer: Any, cfg: CompressConfig, split: str = "val") -> dict[str, float]:
    return task.quality(model, split, tokenizer=tokenizer, batch_size=max(64, cfg.batch_size), limit=cfg.limit,
                        max_length=cfg.max_length)


# ---- allocation -------------------------------------------------------------------------------------


SCORERS = ("taylor", "taylor-example", "fisher", "ablation", "magnitude", "activation")


def _importance(pm: ParticleMap, batches: list, cfg: CompressConfig, kinds: set[str]) -> dict[str, torch.Tensor]:
    """Non-negative importance per particle. ``taylor``: |mean first-order effect| over the calibration
    examples (Molchanov et al.'s aggregated Taylor criterion); ``taylor-example``: mean of the per-example
    |effect|; ``ablation``: |exact mean effect|; the others as `particlize.analyze` computes them."""
    groups = [g.name for g in pm.groups if g.kind in kinds]
    method = {"taylor-example": "taylor"}.get(cfg.scorer, cfg.scorer)
    if cfg.scorer == "taylor-example":
        df = analyze(pm, batches, method, "loss", by="example", groups=groups, table=False)
        per = df.assign(score=df.score.abs()).groupby(["group", "index"]).score.mean()
    else:
        data = None if method == "magnitude" else batches
        df = analyze(pm, data, method, "loss", groups=groups, table=False)
        per = df.set_index(["group", "index"]).score.abs()
    return {name: torch.tensor(per.loc[name].sort_index().to_numpy()) for name in groups}


def _keep_step(g: ParticleGroup, cfg: CompressConfig) -> int:
    """The kept count of ``g`` must be a multiple of this: its grouped-query balance, and ``round_to`` applied
    to the *features* the particles span (a head is ``head_dim`` wide, so 32-dim heads meet any ``round_to``
    dividing 32 at every count; a neuron is one feature wide)."""
    if g.kind == "block":
        return 1
    if not cfg.round_to:
        return g.balanced
    slices = g.readers or g.writers
    w = slices[0].width if slices else 1
    return math.lcm(g.balanced, cfg.round_to // math.gcd(cfg.round_to, w))


def _keep_floor(g: ParticleGroup, cfg: CompressConfig, base: int | None = None) -> int:
    """The fewest particles ``g`` may keep: ``min_width`` of its original width ``base`` (default: its
    width now), rounded up to a legal count (one block: none)."""
    if g.kind == "block":
        return 1
    return _legal_keep(max(1, math.ceil(cfg.min_width * (base or g.size))), g, cfg)


def original_sizes(teacher: nn.Module, current: nn.Module, pm: ParticleMap, teacher_pm: ParticleMap | None = None) -> dict[str, int]:
    """``{group of pm: its width in teacher}`` for a ``current`` model pruned from ``teacher`` (through the
    plans both carry: a layer that moved up when blocks before it were removed is matched to where it
    came from), so minimum widths stay shares of the original model over many rounds, not of the last one."""
    from .surgery import block_correspondence

    tpm = teacher_pm or decompose(teacher)
    moved = sorted(block_correspondence(teacher, current), key=lambda p: -len(p[1]))
    sizes = {}
    for g in pm.groups:
        name = g.name
        for t_path, s_path in moved:
            if name.startswith(s_path + "."):
                name = t_path + name[len(s_path):]
                break
        sizes[g.name] = tpm[name].size if name in tpm else g.size
    return sizes


def _legal_keep(n_keep: int, g: ParticleGroup, cfg: CompressConfig) -> int:
    """Round a kept count up to what the hardware rounding and grouped-query balance allow."""
    if n_keep >= g.size:
        return g.size
    step = _keep_step(g, cfg)
    return min(g.size, math.ceil(n_keep / step) * step)


def allocate(
    pm: ParticleMap,
    importance: dict[str, torch.Tensor],
    flops_to_remove: float,
    cfg: CompressConfig,
    seq_len: int,
    prices: dict[str, float] | None = None,
    base_sizes: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    """Choose particles to remove until ``flops_to_remove`` is saved: ``global`` allocation takes the
    lowest importance per unit of price anywhere (price = the particle's FLOPs, or with ``prices`` the
    measured milliseconds one particle of its kind saves, `latency_prices`); ``uniform`` removes the
    same fraction of every layer's group, each time the least important particles of the group.

    Per group at most ``size - floor`` particles go (``min_width`` of the group's width in ``base_sizes``,
    the original model's, or else of its width now, rounded for
    ``round_to`` and grouped-query balance); kept counts are rounded up to legal widths afterwards,
    and when that rounding leaves the plan short of ``flops_to_remove`` (by `ParticleMap.cost`), the
    shortfall is asked for again, so one round still reaches its goal when the widths allow it.
    A removed block takes everything inside it along; a block that would overshoot the goal by more than
    1% of the prunable FLOPs waits until nothing smaller down the ranking can meet it (asked for 25%, a
    model is not cut to 19% because its cheapest particle was a sixth of it).
    """
    table = pm.table(seq_len=seq_len).set_index(["group", "index"])
    before = pm.cost(seq_len=seq_len).flops
    goal, remove = flops_to_remove, {}
    for _ in range(8):
        remove = _allocate_once(pm, importance, goal, cfg, table, prices, base_sizes)
        short = flops_to_remove - (before - pm.cost(remove, seq_len=seq_len).flops)
        if short <= 1e-9 * before:
            break
        goal += short
    return remove


def _allocate_once(
    pm: ParticleMap, importance: dict[str, torch.Tensor], flops_to_remove: float, cfg: CompressConfig, table: Any,
    prices: dict[str, float] | None = None, base_sizes: dict[str, int] | None = None,
) -> dict[str, list[int]]:
    costs = {name: table.loc[name].sort_index().flops.to_numpy() for name in importance}

    def price(name: str, i: int) -> float:
        return float(costs[name][i]) if prices is None else prices.get(pm[name].kind, 0.0)  # unpriced: last

    floors = {n: _keep_floor(pm[n], cfg, (base_sizes or {}).get(n)) for n in importance}

    def floor_of(g: ParticleGroup) -> int:
        return floors[g.name]

    counts: dict[str, int] = {}
    if cfg.allocation == "uniform":  # the same fraction of every (non-block) group, like per-layer pruning
        layered = [n for n in importance if pm[n].kind != "block"]
        total = sum(float(costs[n].sum()) for n in layered)
        frac = min(1.0, flops_to_remove / total) if total else 0.0
        for n in layered:
            g = pm[n]
            counts[n] = min(g.size - floor_of(g), round(frac * g.size))
    else:  # global: cheapest importance per FLOP first, anywhere in the model
        cand = sorted((float(importance[n][i]) / max(price(n, i), 1e-12), n, i)
                      for n in importance for i in range(pm[n].size))
        owner = _block_owners(pm, importance)
        counted: dict[str, float] = {}  # FLOPs already counted as saved, per group
        dead: set[tuple[str, int]] = set()
        saved = 0.0
        # a block far past the goal waits: smaller particles further down the ranking may meet it closely
        tolerance = 0.01 * sum(float(costs[n].sum()) for n in importance if pm[n].kind != "block")
        waiting: list[tuple[str, int]] = []

        def gain_of(name: str, i: int) -> float | None:
            g = pm[name]
            if owner.get(name) in dead or g.size - counts.get(name, 0) - 1 < floor_of(g):
                return None
            gain = float(costs[name][i])
            if g.kind == "block":  # it takes what is inside along: count only what is not counted yet
                gain -= sum(v for n, v in counted.items() if owner.get(n) == (name, i))
            return gain

        def take(name: str, i: int, gain: float) -> None:
            nonlocal saved
            if pm[name].kind == "block":
                dead.add((name, i))
            counts[name] = counts.get(name, 0) + 1
            counted[name] = counted.get(name, 0.0) + gain
            saved += gain

        for _, name, i in cand:
            if saved >= flops_to_remove:
                break
            gain = gain_of(name, i)
            if gain is None:
                continue
            if pm[name].kind == "block" and saved + gain - flops_to_remove > tolerance:
                waiting.append((name, i))
                continue
            take(name, i, gain)
        for name, i in waiting:  # nothing smaller could meet the goal: the best-ranked blocks after all
            if saved >= flops_to_remove:
                break
            gain = gain_of(name, i)
            if gain is not None:
                take(name, i, gain)
    remove: dict[str, list[int]] = {}
    for name, count in counts.items():
        g = pm[name]
        keep_n = _legal_keep(g.size - count, g, cfg)
        n_remove = g.size - keep_n
        if n_remove <= 0:
            continue
        imp = importance[name]
        if g.balanced > 1 and g.kind != "block":  # the same number from every key/value group
            chunk, per = g.size // g.balanced, n_remove // g.balanced
            sel = []
            for c in range(g.balanced):
                order = torch.argsort(imp[c * chunk : (c + 1) * chunk])[:per]
                sel += [c * chunk + int(j) for j in order]
        else:
            sel = [int(j) for j in torch.argsort(imp)[:n_remove]]
        remove[name] = sorted(sel)
    owner = _block_owners(pm, remove)
    for name in [n for n in remove if n in owner and owner[n][1] in remove.get(owner[n][0], [])]:
        del remove[name]  # inside a removed block: goes with it
    return remove


def _block_owners(pm: ParticleMap, groups: Any) -> dict[str, tuple[str, int]]:
    """``{group: (block group, block index)}`` for the groups that sit inside a block of ``groups``."""
    owners: dict[str, tuple[str, int]] = {}
    for bname in groups:
        b = pm[bname]
        if b.kind != "block":
            continue
        for i, path in enumerate(b.gate.modules):
            for g in pm.groups:
                if g.kind != "block" and (g.scope.startswith(path + ".") or g.name.startswith(path + ".")):
                    owners[g.name] = (bname, i)
    return owners


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
    **overrides: Any,
) -> CompressResult:
    """Compress ``model`` on ``task`` until the target is met or the quality floor would break.

    ``config`` (or keyword overrides of `CompressConfig` fields: ``target_flops=0.5``, ``granularity=
    ("heads", "neurons", "blocks")``, ``min_quality=0.99``, ``recover_epochs=1``, ``round_to=8``, …) sets
    the run. With ``out`` every round is checkpointed there and the final model is saved as a valid
    MODEL folder (``pz.load(out)``, tokenizer included) with ``history.json``; ``resume=True``
    continues a killed run. Quality is the task's `Task.quality` on validation data (accuracy for
    classifiers, 1 / ε-MSE for video diffusion models) relative to the dense model's.

    ``final_recover_epochs`` > 0 recovers the last kept model that many more passes once the rounds are
    over, in chunks of ``recover_epochs`` passes (each a fresh learning-rate schedule, i.e. a warm
    restart, seeded ``seed * 1000 + 100 + k``; checkpointed and resumable like a round, and listed in
    the history with ``"final_recovery": k``). Short recoveries between cuts and a long one at the end
    cost less than long ones every round. The final model is the last chunk's.
    """
    cfg = config or CompressConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ParticlizeError(f"unknown compress option {k!r}")
        setattr(cfg, k, tuple(v) if k == "granularity" else v)
    cfg.check()
    if cfg.recover_focus is not None:  # checked here, not rounds later inside the first recovery
        if task.kind != "video":
            raise ParticlizeError(f"recover_focus is a window of diffusion steps: it applies to video diffusion tasks, not {task.name}")
        steps = getattr(getattr(model, "diffusion", None), "steps", None)
        if steps is not None and cfg.recover_focus[1] >= steps:
            raise ParticlizeError(f"recover_focus {tuple(cfg.recover_focus)} must lie within the model's diffusion steps 0..{steps - 1}")
    emit = progress or (lambda event, info: None)
    out_path = Path(out) if out is not None else None
    teacher = model.eval()
    kinds = cfg.kinds
    pm0 = decompose(teacher, seq_len=cfg.max_length)
    if not any(g.kind in kinds for g in pm0.groups):
        raise ParticlizeError(
            f"nothing to prune at granularity {', '.join(cfg.granularity)}: the model has "
            f"{', '.join(sorted({g.kind for g in pm0.groups})) or 'no'} particle groups"
        )
    dense_cost = pm0.cost()
    lat_inputs = latency_inputs(task, tokenizer, cfg.latency_batch, cfg.latency_seq)
    _check_reachable(cfg, pm0)  # before anything is written: an impossible target costs no round
    _check_latency_target(cfg, teacher, pm0, lat_inputs, kinds)

    history: list[dict[str, Any]] = []
    start_round = 1
    pruned_reason = ""  # set once the pruning rounds are over (a resumed run then only finishes the final recovery)
    current = teacher
    if out_path is not None:
        state_file = out_path / HISTORY
        if resume and state_file.is_file():
            saved = json.loads(state_file.read_text())
            # options added since the run was started count at their defaults
            if {**_jsonable(asdict(CompressConfig())), **saved.get("config", {})} != _jsonable(asdict(cfg)):
                raise ParticlizeError(f"{out_path} was started with other settings; resume with the same options or use --force")
            history = saved["history"]
            last = history[-1]["round"]
            if last > 0:
                current = load(_round_dir(out_path, last), trust_code=True)
            start_round = last + 1
            pruned_reason = saved.get("pruned", "")
            if saved.get("done"):
                return _finish(out_path, history, saved["reason"], cfg, task, tokenizer, emit, teacher)
        elif out_path.exists() and any(out_path.iterdir()) and not (force or resume):
            raise ParticlizeError(f"{out_path} already exists and is not empty; pass --resume to continue it or --force to replace it")
        elif force and out_path.exists():
            import shutil

            shutil.rmtree(out_path)
        if not state_file.is_file():
            out_path.mkdir(parents=True, exist_ok=True)

    if not history:
        q = _quality(task, teacher, tokenizer, cfg)
        history.append(_entry(0, teacher, pm0, dense_cost, q, measure_latency(teacher, lat_inputs), {}, 0.0))
        if cfg.cost == "latency":  # measured once and kept, so a resumed run allocates the same way
            history[0]["latency_prices"] = latency_prices(teacher, pm0, lat_inputs, cfg, kinds)
        emit("round", history[-1])
        _save_state(out_path, cfg, history, done=False)
    dense_q = history[0]["quality"]
    floor = cfg.min_quality * dense_q

    reason = pruned_reason or f"stopped after {cfg.max_rounds} rounds"
    for r in range(start_round, cfg.max_rounds + 1) if not pruned_reason else ():
        if _met(cfg, history[-1], history[0]):
            reason = "target met"
            break
        torch.manual_seed(cfg.seed * 1000 + r)
        t0 = time.perf_counter()
        pm = decompose(current, seq_len=cfg.max_length)
        calib = task.calibration(current, tokenizer, batch_size=cfg.batch_size, max_length=cfg.max_length,
                                 limit=cfg.calib_examples, seed=cfg.seed * 1000 + r)
        importance = _importance(pm, calib, cfg, kinds)
        cur_flops = pm.cost().flops
        goal = _flops_goal(cfg, history, dense_cost.flops, cur_flops)
        remove = allocate(pm, importance, min(goal, cfg.max_fraction * cur_flops), cfg, cfg.max_length,
                          history[0].get("latency_prices"), original_sizes(teacher, current, pm, pm0))
        if not remove:
            reason = "nothing more can be removed within the minimum widths"
            break
        student = pm.prune(remove, reweight=calib if cfg.reweight else None)
        emit("pruned", {"round": r, "removed": {k: len(v) for k, v in remove.items()}})
        try:
            rec = _recover(student, teacher, task, tokenizer, cfg, r, emit, seed=cfg.seed * 1000 + r)
        except ParticlizeError as e:
            reason = f"recovery failed in round {r} ({e}); kept the model of round {r - 1}"
            break
        q = _quality(task, student, tokenizer, cfg)
        spm = decompose(student, seq_len=cfg.max_length)
        entry = _entry(r, student, spm, dense_cost, q, measure_latency(student, lat_inputs),
                       {k: len(v) for k, v in remove.items()}, time.perf_counter() - t0, rec)
        if q["quality"] < floor:
            emit("rejected", entry)
            reason = (f"round {r} fell below the quality floor (val {task.quality_name} {q['quality']:.4f} < "
                      f"{floor:.4f}); kept the model of round {r - 1}")
            break
        _keep_round(out_path, cfg, history, entry, student, emit)
        current = student
    if _met(cfg, history[-1], history[0]):
        reason = "target met"
    if cfg.final_recover_epochs > 0:
        current, reason = _final_recovery(current, teacher, task, tokenizer, cfg, history, dense_cost, lat_inputs,
                                          out_path, reason, emit)
    if out_path is None:
        return CompressResult(current, history, reason)
    _save_state(out_path, cfg, history, done=True, reason=reason)
    return _finish(out_path, history, reason, cfg, task, tokenizer, emit, teacher)


def _final_recovery(current: nn.Module, teacher: nn.Module, task: Task, tokenizer: Any, cfg: CompressConfig,
                    history: list[dict[str, Any]], dense_cost: Any, lat_inputs: Any, out_path: Path | None, reason: str,
                    emit: Progress) -> tuple[nn.Module, str]:
    """`compress`'s recovery after the rounds: chunks of ``recover_epochs`` passes, each checkpointed as a round."""
    chunk = cfg.recover_epochs if cfg.recover_epochs > 0 else cfg.final_recover_epochs
    n_chunks = math.ceil(cfg.final_recover_epochs / chunk - 1e-9)
    done = sum(1 for e in history if e.get("final_recovery"))
    _save_state(out_path, cfg, history, done=False, pruned=reason)
    if current is teacher:  # nothing was cut: recover a copy, never the caller's model
        import copy

        current = copy.deepcopy(teacher)
    for k in range(done, n_chunks):
        epochs = min(chunk, cfg.final_recover_epochs - k * chunk)
        r = history[-1]["round"] + 1
        t0 = time.perf_counter()
        before = {n: t.detach().clone() for n, t in current.state_dict().items()}  # recovery trains in place
        try:
            rec = _recover(current, teacher, task, tokenizer, replace(cfg, recover_epochs=epochs), r, emit,
                           seed=cfg.seed * 1000 + 100 + k)
        except ParticlizeError as e:
            current.load_state_dict(before)
            return current, f"{reason}; final recovery failed in chunk {k + 1} ({e}), kept the model before it"
        del before
        q = _quality(task, current, tokenizer, cfg)
        entry = _entry(r, current, decompose(current, seq_len=cfg.max_length), dense_cost, q,
                       measure_latency(current, lat_inputs), {}, time.perf_counter() - t0, rec)
        entry["final_recovery"] = k + 1
        _keep_round(out_path, cfg, history, entry, current, emit, pruned=reason)
    return current, f"{reason}; then {n_chunks} final recovery chunk{'s' if n_chunks > 1 else ''}"


def _keep_round(out_path: Path | None, cfg: CompressConfig, history: list[dict[str, Any]], entry: dict[str, Any],
                model: nn.Module, emit: Progress, pruned: str = "") -> None:
    """Record a finished round (or final-recovery chunk): history, progress, checkpoint, state file."""
    history.append(entry)
    emit("round", entry)
    if out_path is not None:
        write_folder_atomically(_round_dir(out_path, entry["round"]), lambda d: _save_into(model, d), force=True)
    _save_state(out_path, cfg, history, done=False, pruned=pruned)


def _save_into(model: nn.Module, d: Path) -> None:
    from safetensors.torch import save_model

    from .surgery import provenance

    prov = provenance(model)
    save_model(model, str(d / "model.safetensors"))
    (d / "particlize.json").write_text(json.dumps({"format": 1, "recipe": prov.get("recipe"), "plan": prov.get("plan", []),
                                                   "torch": torch.__version__, "extra": {}}, indent=1))


def _finish(out: Path, history: list, reason: str, cfg: CompressConfig, task: Task, tokenizer: Any,
            emit: Progress, teacher: nn.Module) -> CompressResult:
    last = history[-1]["round"]
    best = teacher if last == 0 else load(_round_dir(out, last), trust_code=True)
    test = _quality(task, best, tokenizer, cfg, split="test")
    extra: dict[str, Any] = {"compress": {"reason": reason, "rounds": last, "test": test, "config": _jsonable(asdict(cfg))}}
    if cfg.quantize == "int8":
        extra["compress"]["int8"] = _int8_report(best, task, tokenizer, cfg)
    def fill(tmp: Path) -> None:
        save(best, tmp / "m", tokenizer=tokenizer, extra=extra)
        for f in (tmp / "m").iterdir():
            f.rename(tmp / f.name)
        (tmp / "m").rmdir()

    # the model files sit beside history.json and rounds/: replace just them, atomically per file
    staging = out / ".final"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    write_folder_atomically(staging, fill, force=True)
    for f in staging.iterdir():
        f.replace(out / f.name)
    staging.rmdir()
    _save_state(out, cfg, history, done=True, reason=reason, test=test)
    emit("done", {"reason": reason, "test": test})
    return CompressResult(best, history, reason, out, extra)


def _save_state(out: Path | None, cfg: CompressConfig, history: list, *, done: bool, reason: str = "",
                test: dict | None = None, pruned: str = "") -> None:
    if out is None:
        return
    data = {"config": _jsonable(asdict(cfg)), "history": history, "done": done, "reason": reason}
    if pruned:
        data["pruned"] = pruned
    if test is not None:
        data["test"] = test
    _write_json(out / HISTORY, data)


def _jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=list))


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


def _met(cfg: CompressConfig, last: dict, dense: dict) -> bool:
    ok = True
    if cfg.target_flops is not None:
        ok &= last["flops_ratio"] <= cfg.target_flops + 1e-9
    if cfg.target_params is not None:
        ok &= last["params_ratio"] <= cfg.target_params + 1e-9
    if cfg.target_latency_ms is not None:
        ok &= last["latency_ms"] <= cfg.target_latency_ms
    return bool(ok)


def _flops_goal(cfg: CompressConfig, history: list, dense_flops: float, cur_flops: float) -> float:
    goals = []
    if cfg.target_flops is not None:
        goals.append(cur_flops - cfg.target_flops * dense_flops)
    if cfg.target_params is not None:  # params and FLOPs shrink together for the particles we remove
        last = history[-1]
        goals.append(cur_flops * (1 - cfg.target_params / max(last["params_ratio"], 1e-12)))
    if cfg.target_latency_ms is not None:
        last = history[-1]
        goals.append(cur_flops * (1 - cfg.target_latency_ms / max(last["latency_ms"], 1e-12)))
    return max(max(goals), 0.0) if goals else 0.0


def _shrink_plan(pm: ParticleMap, cfg: CompressConfig, kinds: set[str], fraction: float = 1.0) -> dict[str, list[int]]:
    """Remove ``fraction`` of what may go (down to the minimum widths) from every group of ``kinds``,
    the same number from every key/value group of a balanced one."""
    remove = {}
    for g in pm.groups:
        if g.kind not in kinds:
            continue
        floor = _keep_floor(g, cfg)
        if g.balanced == 1 or g.kind == "block":
            n = round(fraction * (g.size - floor))
            remove[g.name] = list(range(g.size - n, g.size))
        else:
            chunk = g.size // g.balanced
            n = round(fraction * (chunk - floor // g.balanced))
            remove[g.name] = [i for i in range(g.size) if i % chunk >= chunk - n]
    return {k: v for k, v in remove.items() if v}


def latency_prices(model: nn.Module, pm: ParticleMap, inputs: Any, cfg: CompressConfig, kinds: set[str],
                   rounds: int = 3) -> dict[str, float]:
    """Measured milliseconds saved per removed particle, by kind: the model with half of what may go
    removed from every group of that kind against the intact model, timed in ``rounds`` interleaved
    pairs (median). What `allocate` prices particles by when ``cost="latency"``: on a real device a
    head or a block can save more time per FLOP than a neuron (fixed per-op costs, small matmuls)."""
    plans = {k: _shrink_plan(pm, cfg, {k}, 0.5) for k in sorted(kinds)}
    smaller = {k: (pm.prune(p), sum(len(v) for v in p.values())) for k, p in plans.items() if p}
    saved: dict[str, list[float]] = {k: [] for k in smaller}
    for _ in range(rounds):
        for k, (m, _n) in smaller.items():
            full = measure_latency(model, inputs, warmup=1, reps=3)
            saved[k].append(full - measure_latency(m, inputs, warmup=1, reps=3))
    return {k: max(statistics.median(saved[k]), 1e-9) / smaller[k][1] for k in smaller}


def smallest_shares(pm: ParticleMap, cfg: CompressConfig) -> tuple[float, float]:
    """(FLOPs, params) the smallest model ``cfg`` allows keeps, as shares of ``pm``'s model: every group of
    the configured granularities at its minimum width (``min_width``, ``round_to``)."""
    dense, least = pm.cost(), pm.cost(_shrink_plan(pm, cfg, cfg.kinds))
    return least.flops / max(dense.flops, 1e-12), least.params / max(dense.params, 1e-12)


def _check_reachable(cfg: CompressConfig, pm: ParticleMap) -> None:
    """Refuse a FLOPs or params target below what the smallest model the settings allow keeps, instead of
    finding out rounds of recovery later."""
    for what, target, small in zip(("FLOPs", "params"), (cfg.target_flops, cfg.target_params), smallest_shares(pm, cfg)):
        if target is not None and small > target + 1e-9:
            raise ParticlizeError(
                f"target {what} {target:g} is below {small:.3f}, the share of the {what} the smallest model "
                f"these settings allow keeps (granularity {','.join(cfg.granularity)}; every group at its minimum "
                f"width {cfg.min_width:g}{f', round_to {cfg.round_to}' if cfg.round_to else ''}); raise the target, "
                "lower --min-width or add a granularity"
            )


def _check_latency_target(cfg: CompressConfig, model: nn.Module, pm: ParticleMap, inputs: Any, kinds: set[str]) -> None:
    """Refuse a latency target below what the smallest model the settings allow could reach."""
    if cfg.target_latency_ms is None:
        return
    smallest = pm.prune(_shrink_plan(pm, cfg, kinds))
    best = measure_latency(smallest, inputs)
    if cfg.target_latency_ms < best:
        raise ParticlizeError(
            f"target latency {cfg.target_latency_ms:.2f} ms is below {best:.2f} ms, the latency of the smallest model "
            "these settings allow (every group at its minimum width); raise the target or lower --min-width"
        )


def _recover(student: nn.Module, teacher: nn.Module, task: Task, tokenizer: Any, cfg: CompressConfig, r: int,
             emit: Progress, *, seed: int) -> dict[str, Any]:
    if cfg.recover_epochs == 0:
        return {"epochs": 0}

    def prog(step: int, total: int, info: dict) -> None:
        emit("recover", {"round": r, "step": step, "total": total, **info})

    return task.recover(student, teacher, tokenizer, epochs=cfg.recover_epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                        max_length=cfg.max_length, seed=seed, limit=cfg.limit, kd_alpha=cfg.kd_alpha,
                        temperature=cfg.temperature, hidden_weight=cfg.hidden_weight, val_every=cfg.val_every,
                        patience=cfg.patience, progress=prog,
                        **({"focus": tuple(cfg.recover_focus)} if cfg.recover_focus is not None else {}))


def _int8_report(model: nn.Module, task: Task, tokenizer: Any, cfg: CompressConfig) -> dict[str, Any]:
    """Dynamic int8 quantisation of Linear layers (CPU): accuracy and latency beside fp32."""
    import copy

    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:  # pragma: no cover
        raise ParticlizeError("this torch build has no dynamic quantisation") from None
    q = quantize_dynamic(copy.deepcopy(model).cpu(), {nn.Linear}, dtype=torch.qint8)
    inputs = latency_inputs(task, tokenizer, cfg.latency_batch, cfg.latency_seq)
    fp32_ms, int8_ms = measure_latency(model.cpu(), inputs), measure_latency(q, inputs)
    acc = _quality(task, q, tokenizer, cfg, split="test")
    return {"test": acc, "latency_ms": int8_ms, "fp32_latency_ms": fp32_ms}


__all__ = ["CompressConfig", "CompressResult", "allocate", "compress", "latency_prices", "measure_latency"]
