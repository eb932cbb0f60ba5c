"""What a report is drawn from: one `ReportData` gathered from a compress run folder, a sweep folder, a saved
model (with a task, for the analysis) or an ``analyze`` / ``inspect`` CSV. Every field is optional: the page
shows the sections its source has data for and says which it has not.

The analysis of a model is computed here on a few batches (cheap scores for every particle, per class too,
and exact ablation of the kinds small enough to ablate one by one), so a report of a saved model costs
seconds to a minute on a CPU, not the hours of a full exact sweep.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from ..adapters import decompose
from ..analysis import analyze, interactions_table, validate_scores
from ..errors import ParticlizeError
from ..io import META, build, read_meta, shipped
from ..moe import expert_usage
from ..particles import ParticleMap
from ..surgery import ExpertFFN
from ..sources import load_model, load_tokenizer
from ..tasks import Task, get_task
from .pairs import is_pair_frame, particles

HISTORY = "history.json"  # written by particlize.loop.compress
SWEEP = "sweep.csv"  # written by particlize.sweep.sweep
EXACT_BUDGET = 160  # particles ablated exactly (one by one) for the scorer validation, smallest kinds first
INTERACTION_BUDGET = 96  # heads whose pairs (n(n-1)/2 of them) a report measures exactly, on request
SAMPLE_LABELS = list(range(10))  # one video per digit class

Note = Callable[[str], None]


@dataclass
class ReportData:
    """Everything a report can show; ``None`` where the source has no such data (its section says so)."""

    title: str
    kind: str  # "compress run", "sweep", "model", "analysis CSV"
    source: str
    task: str | None = None
    quality_name: str = "quality"
    facts: list[tuple[str, str]] = field(default_factory=list)  # (label, value) shown at the top
    before: pd.DataFrame | None = None  # particle table (pm.table()) of the dense model
    after: pd.DataFrame | None = None  # ... of the compressed one
    scores: pd.DataFrame | None = None  # one row per particle: group, kind, layer, index, score, method
    by_class: pd.DataFrame | None = None  # group, kind, layer, index, class_name, score
    validation: pd.DataFrame | None = None  # group, kind, index, score_cheap, score_exact
    validation_summary: pd.DataFrame | None = None
    influence: pd.DataFrame | None = None  # blocks: group, index, layer, score = 1 - cos(block input, output)
    method: str = "taylor"
    metric: str = "loss"
    history: list[dict[str, Any]] | None = None
    sweep: pd.DataFrame | None = None
    expert_usage: pd.DataFrame | None = None  # mixture-of-experts FFNs: particlize.moe.expert_usage
    interactions: pd.DataFrame | None = None  # pairwise interactions: particlize.analysis.interactions_table
    interactions_metric: str = "loss"
    frames_before: torch.Tensor | None = None  # [B, C, T, H, W] in [0, 1]
    frames_after: torch.Tensor | None = None
    notes: dict[str, str] = field(default_factory=dict)  # section id -> why it has no (or partial) data


def gather(source: str | Path, *, task: str | Task | None = None, limit: int = 64, trust_code: bool = False,
           note: Note | None = None, interactions: bool = False) -> ReportData:
    """Read (and, for a model, analyse) ``source``: a compress run folder, a sweep folder, a saved model (a
    folder, a shipped name such as ``sora-tiny``, or ``minilm``) or a CSV written by ``analyze`` / ``inspect``
    (``analyze --interactions`` too). ``task`` (a task name or a `Task`) is needed to analyse a model (a saved
    classifier names its own task); ``limit`` examples are used; ``trust_code`` allows a saved model's own
    factory code to run; ``interactions`` also measures a model's head pairs exactly (`INTERACTION_BUDGET`)."""
    say = note or (lambda s: None)
    p = Path(source)
    if p.is_file():
        if p.suffix.lower() != ".csv":
            raise ParticlizeError(f"{p} is not a CSV, compress run or sweep folder, or model; "
                                  "give a particlize run/sweep folder, a model folder, or an analyze --csv file")
        return tidy(_from_csv(p))
    if p.is_dir() and (p / HISTORY).is_file():
        return tidy(_from_run(p, task, limit, say, trust_code))
    if p.is_dir() and (p / SWEEP).is_file():
        return _from_sweep(p)
    if not p.exists() and str(source) not in shipped() and str(source) != "minilm":
        raise ParticlizeError(f"{source} not found: give a compress run or sweep folder, a saved model, or an analyze CSV")
    if p.is_dir() and not (p / META).is_file() and not (p / "config.json").is_file():
        raise ParticlizeError(f"{p} is neither a compress run ({HISTORY}), a sweep ({SWEEP}) nor a model folder ({META})")
    return tidy(_from_model(str(source), task, limit, say, trust_code, interactions))


# ---- the four sources ---------------------------------------------------------------------------------


def _from_csv(path: Path) -> ReportData:
    try:
        df = pd.read_csv(path)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ParticlizeError(f"cannot read {path} as a CSV ({str(e).splitlines()[0]})") from None
    if is_pair_frame(df):
        return _from_pairs(path, df)
    if not {"group", "index"} <= set(df.columns):
        raise ParticlizeError(f"{path} has no group and index columns; give a CSV written by "
                              "`particlize analyze --out` or `particlize inspect --csv`")
    d = ReportData(title=path.name, kind="analysis CSV", source=str(path))
    if {"kind", "params", "flops"} <= set(df.columns):
        d.before = df.drop_duplicates(["group", "index"])[[c for c in df.columns if c not in ("class", "class_name", "example", "score", "method")]]
    if "score" in df.columns:
        d.method = str(df["method"].iloc[0]) if "method" in df.columns else "score"
        keys = ["group", "index"]
        if "class" in df.columns:
            name = "class_name" if "class_name" in df.columns else "class"
            d.by_class = df.rename(columns={name: "class_label"})[[*keys, "kind", "layer", "class_label", "score"]] \
                if {"kind", "layer"} <= set(df.columns) else None
        per = df.groupby(keys, sort=False, as_index=False).agg(score=("score", "mean"))
        meta = df.drop_duplicates(keys)[[c for c in ("group", "index", "kind", "layer", "params", "flops") if c in df]]
        d.scores = per.merge(meta, on=keys, how="left")
        if "kind" not in d.scores:
            d.scores["kind"] = d.scores["group"].map(_kind_of_name)
        if "layer" not in d.scores:
            d.scores["layer"] = -1
    d.facts = [("rows", f"{len(df):,}"), ("particles", f"{df.drop_duplicates(['group', 'index']).shape[0]:,}")]
    if "method" in df.columns:
        d.facts.append(("scorer", str(df["method"].iloc[0])))
    if d.scores is None:
        d.notes["maps"] = "This CSV holds no scores (it was written by `inspect`); write one with `particlize analyze --out`."
    d.notes.setdefault("validation", "A CSV holds one scorer's scores; the report of a saved model with --task "
                                     "compares them with exact ablation.")
    return d


def _from_pairs(path: Path, df: pd.DataFrame) -> ReportData:
    """An ``analyze --interactions`` CSV: the interactions section only."""
    d = ReportData(title=path.name, kind="interactions CSV", source=str(path))
    d.interactions = df
    d.interactions_metric = str(df["metric"].iloc[0]) if "metric" in df and len(df) else "loss"
    d.method = str(df["method"].iloc[0]) if "method" in df and len(df) else "ablation"
    n = len(particles(df)) if len(df) else 0
    d.facts = [("pairs", f"{len(df):,}"), ("particles", f"{n:,}"), ("method", d.method), ("metric", d.interactions_metric)]
    for k in ("overview", "maps", "validation", "structure"):
        d.notes[k] = "An interactions CSV holds pairs only; report the model with --task for this section."
    return d


def _from_sweep(path: Path) -> ReportData:
    df = pd.read_csv(path / SWEEP)
    d = ReportData(title=f"sweep {path.name}", kind="sweep", source=str(path), sweep=df)
    ok = df.dropna(subset=["flops_ratio"]) if "flops_ratio" in df else df.iloc[:0]
    d.quality_name = "accuracy" if "test_accuracy" in df else "quality"
    d.facts = [("runs", f"{len(df):,}"), ("granularities", ", ".join(map(str, df["granularity"].unique()))),
               ("FLOPs targets", ", ".join(f"{t:.0%}" for t in sorted(df["target_flops"].unique(), reverse=True)))]
    if len(ok) and "dense_latency_ms" in ok:
        d.facts.append(("dense latency", f"{ok['dense_latency_ms'].median():.1f} ms"))
    why = "A sweep keeps only each run's summary row; report a single compress run (or its model with --task) for this."
    for s in ("overview", "maps", "validation", "structure"):
        d.notes[s] = why
    return d


def _from_run(path: Path, task: str | Task | None, limit: int, say: Note, trust_code: bool) -> ReportData:
    try:
        state = json.loads((path / HISTORY).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ParticlizeError(f"{path / HISTORY} is unreadable ({e}); is the run folder complete?") from None
    d = ReportData(title=f"compress run {path.name}", kind="compress run", source=str(path), history=state.get("history"))
    cfg = state.get("config", {})
    target = cfg.get("target", {})
    d.facts = [("granularity", ", ".join(cfg.get("allocation", {}).get("granularity", []))),
               ("scorer", str(cfg.get("allocation", {}).get("scorer", ""))),
               ("target", ", ".join(f"{k} {v:g}" for k, v in target.items() if v is not None and k != "min_quality")),
               ("quality floor", f"{target.get('min_quality', 0):g} × dense")]
    if state.get("reason"):
        d.facts.append(("outcome", state["reason"]))
    if not state.get("done"):
        d.facts.append(("state", "unfinished (resume it with compress --resume)"))
    if state.get("test"):
        d.facts.append(("test", ", ".join(f"{k} {v:.4f}" for k, v in state["test"].items() if isinstance(v, float))))
    model = None
    if (path / META).is_file():
        say("reading the compressed model")
        meta = read_meta(path)
        model = load_model(str(path), trust_code=trust_code)
        d.after = decompose(model).table()
        d.before = _base_table(meta, trust_code)
        if d.before is None:
            d.notes["overview"] = "The dense model's architecture could not be rebuilt from the saved recipe."
    else:
        d.notes["overview"] = d.notes["structure"] = "The run has not saved its final model yet."
    if task and model is not None:
        _analyse(d, model, load_tokenizer(str(path)), task, limit, say)
        if hasattr(model, "sample"):
            dense = _shipped_dense(read_meta(path))
            d.frames_after = _frames(model, say, "the compressed model")
            d.frames_before = _frames(dense, say, "the dense model") if dense is not None else None
    elif model is not None:
        d.notes["maps"] = d.notes["validation"] = (
            "No analysis in a run folder: add --task TASK to score the compressed model's particles.")
    return d


def _from_model(spec: str, task: str | Task | None, limit: int, say: Note, trust_code: bool,
                interactions: bool = False) -> ReportData:
    say(f"loading {spec}")
    model = load_model(spec, trust_code=trust_code)
    meta = read_meta(spec) if Path(spec).is_dir() and (Path(spec) / META).is_file() or spec in shipped() else {}
    task = task or meta.get("extra", {}).get("task") or ("moving-digits" if hasattr(model, "sample") else None)
    if task is None:
        raise ParticlizeError(f"{spec} does not name its task; pass --task (e.g. vader-sentiment, moving-digits)")
    d = ReportData(title=f"{Path(spec).name}", kind="model", source=spec)
    pm = decompose(model)
    d.before = pm.table()
    n = sum(p.numel() for p in model.parameters())
    d.facts = [("model", type(model).__name__), ("parameters", f"{n:,}"), ("particle groups", str(len(pm.groups))),
               ("FLOPs", f"{pm.cost().flops:,.0f} {pm.flops_unit}")]
    plan = meta.get("plan") or []
    if plan:
        base = _base_table(meta, trust_code)
        if base is not None:
            d.before, d.after = base, d.before
    d.notes["loop"] = "A single model has no rounds; report a compress run folder or a sweep folder for this."
    _analyse(d, model, load_tokenizer(spec), task, limit, say, pm, interactions)
    if hasattr(model, "sample"):
        d.frames_after = _frames(model, say, "the model")
        if not plan:
            d.notes["frames"] = "Samples of this (unpruned) model; a compress run of it shows them before and after."
    return d


# ---- helpers --------------------------------------------------------------------------------------------


def _layers(df: pd.DataFrame | None) -> pd.DataFrame | None:
    """Blocks form one group whose particle ``index`` is the layer: give them that layer (the table says -1)."""
    if df is None or "kind" not in df or "layer" not in df:
        return df
    blocks = (df["kind"] == "block") & (df["layer"] < 0)
    if blocks.any():
        df = df.copy()
        df.loc[blocks, "layer"] = df.loc[blocks, "index"]
    return df


def tidy(d: ReportData) -> ReportData:
    """``d`` with block rows placed at their layers in every particle frame."""
    for name in ("before", "after", "scores", "by_class", "validation", "influence"):
        setattr(d, name, _layers(getattr(d, name)))
    return d


def _kind_of_name(name: str) -> str:
    for k in ("heads", "neurons", "channels", "units", "blocks"):
        if name.endswith("." + k) or name == k:
            return k[:-1]
    return "other"


def _base_table(meta: dict[str, Any], trust_code: bool) -> pd.DataFrame | None:
    """The particle table of the dense architecture a saved model started from (random weights: only the
    structure and costs are read)."""
    if not meta.get("recipe"):
        return None
    try:
        base = build(meta["recipe"], trust_code=trust_code)
    except ParticlizeError:
        return None
    return decompose(base).table()[["group", "kind", "layer", "index", "params", "flops", "flops_unit"]]


def _shipped_dense(meta: dict[str, Any]) -> nn.Module | None:
    """The shipped model a compressed one was cut from (same recipe, no plan), if any: its 'before'."""
    for name, folder in shipped().items():
        m = read_meta(folder)
        if m.get("recipe") == meta.get("recipe") and not m.get("plan"):
            return load_model(name)
    return None


@torch.no_grad()
def _frames(model: nn.Module, say: Note, what: str) -> torch.Tensor:
    say(f"sampling videos from {what}")
    return model.sample(SAMPLE_LABELS, steps=25, seed=0).cpu()


def _exact_groups(pm: ParticleMap, budget: int = EXACT_BUDGET) -> tuple[list[str], list[str]]:
    """Groups to ablate exactly, whole kinds at a time, fewest particles first, within ``budget`` particles;
    and the kinds left out."""
    per_kind: dict[str, list[str]] = {}
    for g in pm.groups:
        per_kind.setdefault(g.kind, []).append(g.name)
    size = {k: sum(pm[n].size for n in names) for k, names in per_kind.items()}
    chosen, left, used = [], [], 0
    for k in sorted(per_kind, key=lambda k: size[k]):
        if used + size[k] <= budget:
            chosen += per_kind[k]
            used += size[k]
        else:
            left.append(f"{k}s ({size[k]:,})")
    return chosen, left


def _task(task: str | Task) -> Task:
    if isinstance(task, Task):
        return task
    if task == "text-csv":
        raise ParticlizeError("task text-csv needs its CSV file: call particlize.report.write_report(..., "
                              "task=particlize.tasks.get_task('text-csv', path=FILE))")
    return get_task(task)


def _analyse(d: ReportData, model: nn.Module, tokenizer: Any, task: str | Task, limit: int, say: Note,
             pm: ParticleMap | None = None, pairs: bool = False) -> None:
    """Cheap scores (taylor) of every particle, per class for classifiers, their agreement with exact
    ablation for the kinds that fit `EXACT_BUDGET`, and with ``pairs`` the exact interactions of the heads."""
    t = _task(task)
    d.task, d.quality_name = t.name, getattr(t, "quality_name", "accuracy")
    pm = pm or decompose(model)
    if t.kind == "video":  # a denoiser: noised videos with their noise as targets, loss = eps-MSE
        batches = t.calibration(model, batch_size=16, limit=min(limit, 32), seed=0)
    else:
        if t.kind == "text" and tokenizer is None:
            raise ParticlizeError("text tasks need the model's tokenizer; this model folder was saved without one")
        batches = t.batches("val", tokenizer=tokenizer, batch_size=32, max_length=64, limit=limit)
    n = sum(len(b[1]) for b in batches)
    d.facts.append(("analysed on", f"{n} {'noised training videos' if t.kind == 'video' else 'validation examples'} of {t.name}"))
    say(f"scoring {sum(g.size for g in pm.groups):,} particles (taylor)")
    d.scores = analyze(pm, batches, "taylor")
    if t.kind != "video":
        say("scoring per class")
        by = analyze(pm, batches, "taylor", by="class")
        by["class_label"] = by["class"].map(dict(enumerate(t.classes)))
        d.by_class = by
    else:
        d.notes["classes"] = "A video denoiser has no class labels to attribute its loss to (its targets are noise)."
    if any(isinstance(m, ExpertFFN) for m in model.modules()):
        say("counting the experts each class's tokens run")
        d.expert_usage = expert_usage(model, batches, classes=None if t.kind == "video" else t.classes)
        if t.kind == "video":
            d.notes["experts"] = "The video denoiser's tokens have no class label here: one row, all tokens."
    else:
        d.notes["experts"] = ("This model has no mixture-of-experts FFN: every token runs every neuron, so there "
                              "is no routing to show. `particlize moefy` makes one.")
    if any(g.kind == "block" for g in pm.groups):
        say("block influence")
        d.influence = analyze(pm, batches, "influence", groups="block")
    groups, left = _exact_groups(pm)
    if groups:
        say(f"exact ablation of {sum(pm[g].size for g in groups):,} particles")
        v = validate_scores(pm, batches, "taylor", groups=groups)
        d.validation, d.validation_summary = v.scores, v.summary
    _pairs(d, pm, batches, say, pairs)
    if left:
        d.notes["validation"] = (f"Not ablated exactly here (too many to ablate one by one in a report): {', '.join(left)}. "
                                 "`particlize analyze --top K` finds their exact top K fast.")



def _pairs(d: ReportData, pm: ParticleMap, batches: list[Any], say: Note, wanted: bool) -> None:
    """Exact pairwise interactions of the model's attention heads (all pairs, when they fit `INTERACTION_BUDGET`)."""
    heads = [g.name for g in pm.groups if g.kind == "head"]
    n = sum(pm[g].size for g in heads)
    how = ("`particlize analyze MODEL --task TASK --interactions --groups heads --out pairs.csv`, then "
           "`particlize report pairs.csv`")
    if not wanted:
        d.notes["pairs"] = f"Pairs are measured on request: `particlize report MODEL --interactions`, or {how}."
    elif not heads:
        d.notes["pairs"] = f"This model has no attention heads; measure the pairs of other particles with {how} (--groups)."
    elif n > INTERACTION_BUDGET:
        d.notes["pairs"] = f"{n} heads are {n * (n - 1) // 2:,} pairs, more than a report measures; use {how}."
    else:
        say(f"pairwise interactions of {n} heads ({n * (n - 1) // 2:,} pairs, exact)")
        d.interactions = interactions_table(pm, batches, heads, "ablation", "loss")
        d.interactions_metric = str(d.interactions["metric"].iloc[0])
