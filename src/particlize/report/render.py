"""Turn a `ReportData` into one self-contained HTML page (Jinja2 template, figures embedded, no network) and
write it atomically: `write_report`."""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .._version import __version__
from ..errors import ParticlizeError
from . import pairs, plots
from ..tasks import Task
from .data import ReportData, gather

TABLE_ROWS = 12_000  # particles listed in the table (the most important first when there are more)
SECTIONS = ("overview", "maps", "experts", "validation", "pairs", "loop", "structure", "table")  # ids, in page order


@dataclass
class Section:
    """One part of the page: its figures, an optional HTML block, and why it is empty or partial."""

    id: str
    title: str
    lead: str
    figures: list[plots.Figure] = field(default_factory=list)
    html: str = ""
    note: str = ""

    @property
    def empty(self) -> bool:
        return not self.figures and not self.html


def _what(d: ReportData) -> str:
    """The unit of the scores, for axis labels."""
    if d.kind == "analysis CSV":
        return f"{d.method} score"
    loss = "ε-MSE" if d.task == "moving-digits" else "loss (nats)"
    return f"Δ {loss} when removed"


def _summary_html(summary: pd.DataFrame | None) -> str:
    if summary is None or summary.empty:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(r.kind))}</td><td>{int(r.particles):,}</td><td>{r.spearman:.3f}</td>"
        f"<td>{r.kendall:.3f}</td><td>{r.top_k_overlap:.0%} of {int(r.k)}</td></tr>" for r in summary.itertuples())
    return ("<table class='mini'><thead><tr><th>kind</th><th>particles</th><th>Spearman</th><th>Kendall</th>"
            f"<th>top-k overlap</th></tr></thead><tbody>{rows}</tbody></table>")


def balance(usage: pd.DataFrame) -> pd.DataFrame:
    """Per mixture-of-experts FFN, how evenly its experts share the tokens (all classes together): the
    normalised entropy of the expert shares (1: every expert equally busy, 0: one expert takes all), the busiest
    and quietest expert's share of the tokens, and how many experts no token ran."""
    rows = []
    for ffn, part in usage.groupby("ffn", sort=False):
        per = part.groupby("expert")["selected"].sum()
        tokens = float(part.drop_duplicates("class_label")["tokens"].sum())
        p = per.to_numpy(dtype=float) / max(float(per.sum()), 1e-12)
        nz = p[p > 0]
        ent = float(-(nz * np.log(nz)).sum() / np.log(len(p))) if len(p) > 1 else 1.0
        share = per.to_numpy(dtype=float) / max(tokens, 1e-12)
        rows.append({"ffn": ffn, "layer": part["layer"].iloc[0], "experts": int(part["experts"].iloc[0]),
                     "active": int(part["active"].iloc[0]), "tokens": int(round(tokens)), "entropy": ent,
                     "busiest": float(share.max()), "quietest": float(share.min()), "unused": int((per == 0).sum())})
    return pd.DataFrame(rows)


def _balance_html(usage: pd.DataFrame) -> str:
    b = balance(usage)
    if b.empty:
        return ""
    rows = "".join(
        f"<tr><td>{html.escape(str(r.ffn))}</td><td>{r.active} of {r.experts}</td><td>{r.tokens:,}</td>"
        f"<td>{r.entropy:.3f}</td><td>{r.busiest:.1%}</td><td>{r.quietest:.1%}</td><td>{r.unused}</td></tr>"
        for r in b.itertuples())
    worst = b.loc[b["entropy"].idxmin()]
    note = (f"<p class='lead'>Balance: entropy 1 means every expert is equally busy (ideal: {worst.active} of "
            f"{worst.experts} per token, each expert on {worst.active / worst.experts:.1%} of the tokens). The least balanced FFN, "
            f"{html.escape(str(worst.ffn))}, has entropy {worst.entropy:.2f}: its busiest expert runs for {worst.busiest:.0%} "
            f"of the tokens, its quietest for {worst.quietest:.1%}.</p>")
    return (note + "<table class='mini'><thead><tr><th>FFN</th><th>active</th><th>tokens</th><th>entropy</th>"
            f"<th>busiest expert</th><th>quietest expert</th><th>unused experts</th></tr></thead><tbody>{rows}</tbody></table>")


def _history_html(history: list[dict[str, Any]] | None, quality: str) -> str:
    if not history:
        return ""
    rows = []
    for e in history:
        tag = " (final recovery)" if e.get("final_recovery") else ""
        tag += " <span class='bad'>below floor</span>" if e.get("below_floor") else ""
        removed = sum((e.get("removed") or {}).values())
        rows.append(f"<tr><td>{e['round']}{tag}</td><td>{e['flops_ratio']:.1%}</td><td>{int(e['params']):,}</td>"
                    f"<td>{e['latency_ms']:.1f}</td><td>{e['quality']:.4f}</td><td>{removed:,}</td></tr>")
    return ("<table class='mini'><thead><tr><th>round</th><th>FLOPs</th><th>params</th><th>latency ms</th>"
            f"<th>val {html.escape(quality)}</th><th>removed</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _sections(d: ReportData) -> list[Section]:
    what = _what(d)
    n = d.notes
    s = {k: Section(k, t, lead) for k, t, lead in (
        ("overview", "Model overview", "What the model is made of and where its cost sits."),
        ("maps", "Particle maps", f"What each particle does to the output ({d.method} scores: {what})."),
        ("experts", "Expert usage", "Mixture-of-experts FFNs: which experts the router picks for the tokens of each class."),
        ("validation", "Scorer validation", "Whether the cheap score ranks particles as exact ablation does."),
        ("pairs", "Interactions", "How particles act together: what removing two costs beyond removing each alone."),
        ("loop", "The loop", "Quality and cost round by round, or across a sweep's runs."),
        ("structure", "Kept structure", "What is left of each layer."),
        ("table", "Particle table", "Every particle: sort by clicking a column head, filter by typing."),
    )}
    if d.before is not None:
        for f in (plots.overview_kinds(d.before, d.after), plots.overview_layers(d.before, d.after)):
            if f:
                s["overview"].figures.append(f)
    s["overview"].note = n.get("overview", "" if d.before is not None else "This source holds no particle table.")
    if d.scores is not None:
        for f in (plots.head_heatmap(d.scores, what), plots.neuron_distributions(d.scores, what),
                  plots.block_influence(d.scores, what, d.influence, d.validation)):
            if f:
                s["maps"].figures.append(f)
    if d.by_class is not None:
        f = plots.class_heatmap(d.by_class, what)
        if f:
            s["maps"].figures.append(f)
    s["maps"].note = " ".join(x for x in (n.get("maps", "" if d.scores is not None else "No scores in this source."),
                                          n.get("classes", "")) if x)
    if d.expert_usage is not None:
        f = plots.expert_usage(d.expert_usage)
        if f:
            s["experts"].figures.append(f)
        s["experts"].html = _balance_html(d.expert_usage)
    s["experts"].note = n.get("experts", "" if d.expert_usage is not None else
                              "No expert usage in this source: report a saved model made by `moefy` with its --task.")
    if d.validation is not None:
        f = plots.validation_scatter(d.validation, d.validation_summary, what, d.method)
        if f:
            s["validation"].figures.append(f)
        s["validation"].html = _summary_html(d.validation_summary)
    s["validation"].note = n.get("validation", "" if d.validation is not None else "No exact ablation in this source.")
    if d.interactions is not None:
        s["pairs"].figures += pairs.figures(d.interactions, d.interactions_metric)
        s["pairs"].html = pairs.tables_html(d.interactions, d.interactions_metric)
    s["pairs"].note = n.get("pairs", "" if d.interactions is not None else
                            "No pairwise interactions in this source: `particlize report MODEL --interactions`, or the "
                            "CSV of `particlize analyze --interactions`.")
    if d.history:
        f = plots.loop_rounds(d.history, d.quality_name)
        if f:
            s["loop"].figures.append(f)
        s["loop"].html = _history_html(d.history, d.quality_name)
    if d.sweep is not None:
        f = plots.sweep_pareto(d.sweep)
        if f:
            s["loop"].figures.append(f)
        s["loop"].html += d.sweep.to_html(index=False, classes="mini", float_format=lambda x: f"{x:.4g}", na_rep="–")
    s["loop"].note = n.get("loop", "" if (d.history or d.sweep is not None) else "No rounds in this source.")
    if d.before is not None and d.after is not None:
        f = plots.kept_widths(d.before, d.after)
        if f:
            s["structure"].figures.append(f)
    if d.frames_before is not None:
        s["structure"].figures.append(plots.video_frames(d.frames_before, "Samples: dense model",
                                                         "One row per digit class, one column per frame; the compressed model starts from the same noise."))
    if d.frames_after is not None:
        title = "Samples: compressed model" if d.frames_before is not None or d.after is not None else "Samples"
        s["structure"].figures.append(plots.video_frames(d.frames_after, title,
                                                         "Digits that stay sharp and move smoothly mean the video model still works."))
    s["structure"].note = n.get("frames", "") if d.frames_after is not None and d.after is None else n.get(
        "structure", "" if d.after is not None else "Nothing was removed from this model: there is no kept structure to show.")
    s["table"].note = "" if d.scores is not None or d.before is not None else "No particles in this source."
    return [s[k] for k in SECTIONS]


def _rows(d: ReportData) -> tuple[list[str], list[list[Any]], str]:
    """The particle table's columns, rows (as JSON-ready lists) and a note when it was cut short."""
    frame = d.scores if d.scores is not None else (d.after if d.after is not None else d.before)
    if frame is None:
        return [], [], ""
    cols = [c for c in ("group", "kind", "layer", "index", "params", "flops", "score") if c in frame.columns]
    df = frame[cols].copy()
    note = ""
    if len(df) > TABLE_ROWS:
        key = df["score"].abs() if "score" in df else df["params"]
        df = df.loc[key.sort_values(ascending=False).index[:TABLE_ROWS]]
        note = f"the {TABLE_ROWS:,} {'highest-scoring' if 'score' in cols else 'largest'} of {len(frame):,} particles"
    rows = json.loads(df.to_json(orient="values", double_precision=6))
    return cols, rows, note


def render(d: ReportData) -> str:
    """The HTML page of ``d`` (a string)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(Path(__file__).parent / "templates")),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), trim_blocks=True, lstrip_blocks=True)
    cols, rows, cut = _rows(d)
    payload = json.dumps({"columns": cols, "rows": rows}).replace("</", "<\\/")
    return env.get_template("report.html.j2").render(
        d=d, sections=_sections(d), table_json=payload, table_note=cut, n_rows=len(rows), version=__version__,
        generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"))


def write_report(source: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *, task: str | Task | None = None,
                 force: bool = False, limit: int = 64, trust_code: bool = False,
                 note: Callable[[str], None] | None = None, interactions: bool = False) -> Path:
    """Write the HTML report of ``source`` (a compress run folder, a sweep folder, a saved model or shipped
    model name, or an ``analyze`` CSV) to ``out`` (default ``source/report.html`` for a folder) and return its path.

    ``task`` (a name or a `Task`) is the task to analyse a model on (a saved classifier names its own; the shipped video DiT
    defaults to moving-digits); ``limit`` examples are used. The page is self-contained (figures embedded, no
    network) and written atomically; an existing ``out`` is replaced only with ``force=True``. ``trust_code``
    allows a saved model's own factory code (outside particlize and transformers) to run. ``interactions`` also
    measures the exact pairwise interactions of a model's attention heads (its *Interactions* section; an
    ``analyze --interactions`` CSV as ``source`` shows them without it).
    """
    src = Path(source)
    if out is None:
        if not src.is_dir():
            raise ParticlizeError(f"give an output file for the report of {source} (CLI: --out report.html)")
        out = src / "report.html"
    out = Path(out)
    if out.exists() and not force:
        raise ParticlizeError(f"{out} already exists; pass --force (force=True) to replace it")
    if out.suffix.lower() not in (".html", ".htm"):
        raise ParticlizeError(f"the report is an HTML page: name it *.html, got {out.name}")
    page = render(gather(source, task=task, limit=limit, trust_code=trust_code, note=note, interactions=interactions))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
