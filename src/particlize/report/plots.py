"""The report's figures: matplotlib drawings returned as `Figure` records (title, caption, an embedded PNG).

Each function takes plain data (particle tables, score frames, a run's history) and returns ``None`` when it
has nothing to draw, so the page can say so instead of showing an empty plot.
"""

from __future__ import annotations

import base64
import io
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .figures import video_grid

KIND_COLORS = {"head": "#3b6fd8", "neuron": "#e8833a", "block": "#3a9d5d", "channel": "#8c5ad6", "unit": "#d64550",
               "other": "#777777"}
BEFORE, AFTER = "#c9d3e6", "#2f5fc4"


@dataclass
class Figure:
    """One embedded figure: a title, a one-line caption saying what to read from it, and a data URI."""

    title: str
    caption: str
    uri: str
    alt: str = ""
    half: bool = False  # drawn half the page wide (side by side with the next one)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({
        "font.family": "DejaVu Sans", "font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold",
        "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25,
        "axes.axisbelow": True, "legend.frameon": False, "figure.dpi": 100,
    })
    return plt


def _embed(fig: Any, title: str, caption: str) -> Figure:
    plt = _plt()
    buf = io.BytesIO()
    if fig.get_layout_engine() is None:  # a figure made with layout="constrained" keeps its own
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110, facecolor="white")
    plt.close(fig)
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return Figure(title, caption, uri, alt=f"{title}: {caption}")


def _no_blocks(df: pd.DataFrame) -> pd.DataFrame:
    """Blocks contain the heads and neurons inside them (key/value heads their query heads): leave them out of
    sums so nothing counts twice."""
    return df[~df["kind"].isin(("block", "kv_head"))]


def _unit(df: pd.DataFrame) -> str:
    return str(df["flops_unit"].iloc[0]) if "flops_unit" in df and len(df) else ""


# ---- model overview ---------------------------------------------------------------------------------------


def overview_kinds(before: pd.DataFrame, after: pd.DataFrame | None) -> Figure | None:
    """Params and FLOPs per particle kind, dense vs compressed."""
    b = _no_blocks(before)
    if b.empty:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    kinds = list(dict.fromkeys(b["kind"]))
    x = np.arange(len(kinds))
    for ax, col, scale, label in ((axes[0], "params", 1e6, "parameters (millions)"),
                                  (axes[1], "flops", 1e6, f"FLOPs (millions, {_unit(before)})")):
        tb = b.groupby("kind")[col].sum().reindex(kinds) / scale
        w = 0.38 if after is not None else 0.6
        ax.bar(x - (w / 2 if after is not None else 0), tb, w, color=BEFORE, label="dense")
        if after is not None:
            ta = _no_blocks(after).groupby("kind")[col].sum().reindex(kinds).fillna(0) / scale
            bars = ax.bar(x + w / 2, ta, w, color=[KIND_COLORS.get(k, "#777") for k in kinds], label="compressed")
            for r, v, v0 in zip(bars, ta, tb):
                ax.annotate(f"{v / v0:.0%}" if v0 else "", (r.get_x() + r.get_width() / 2, r.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        if after is not None:
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(color=BEFORE, label="dense"), Patch(color="#555", label="compressed (colour: kind)")],
                      fontsize=8, loc="upper left")
        ax.set_xticks(x, [k + "s" for k in kinds])
        ax.set_ylabel(label)
        ax.set_xlabel("particle kind")
    axes[0].set_title("Parameters per kind")
    axes[1].set_title("FLOPs per kind")
    if after is None:
        axes[0].legend()
    cap = ("How the prunable cost splits between kinds; the percentage over each compressed bar is what was kept."
           if after is not None else "Where the prunable cost sits: the kinds with the tallest bars have the most to give.")
    return _embed(fig, "Cost by particle kind", cap)


def overview_layers(before: pd.DataFrame, after: pd.DataFrame | None) -> Figure | None:
    """Share of the dense FLOPs per layer, stacked by kind, dense vs compressed."""
    b = _no_blocks(before)
    b = b[b["layer"] >= 0]
    if b.empty:
        return None
    plt = _plt()
    total = b["flops"].sum() or 1.0
    layers = sorted(b["layer"].unique())
    fig, ax = plt.subplots(figsize=(9, 3.2))
    x = np.arange(len(layers))
    w = 0.38 if after is not None else 0.6
    for side, frame, off in (("dense", b, -w / 2 if after is not None else 0.0), ("compressed", after, w / 2)):
        if frame is None:
            continue
        f = _no_blocks(frame)
        per = f.groupby(["layer", "kind"])["flops"].sum().unstack(fill_value=0).reindex(layers, fill_value=0) / total * 100
        bottom = np.zeros(len(layers))
        for kind in per.columns:
            color = KIND_COLORS.get(kind, "#777")
            ax.bar(x + off, per[kind].to_numpy(), w, bottom=bottom, color=color, alpha=0.35 if side == "dense" else 1.0,
                   label=f"{kind}s ({side})", edgecolor="white", linewidth=0.5)
            bottom += per[kind].to_numpy()
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("share of dense prunable FLOPs (%)")
    ax.set_title("FLOPs per layer" + (" — dense (pale) vs compressed (solid)" if after is not None else ""))
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    cap = ("Which layers were thinned: a short solid bar next to a tall pale one is a layer that gave up most of its cost."
           if after is not None else "How the cost is spread over the layers, split by particle kind.")
    return _embed(fig, "Cost per layer", cap)


# ---- particle maps ----------------------------------------------------------------------------------------


def _label(row: Any) -> str:
    return f"L{row.layer}" if row.layer >= 0 else str(row.group)


def head_heatmap(scores: pd.DataFrame, what: str) -> Figure | None:
    """Layer × head heatmap of the scores of the head groups."""
    h = scores[scores["kind"] == "head"]
    if h.empty:
        return None
    plt = _plt()
    groups = h.drop_duplicates("group").sort_values(["layer", "group"])
    grid = np.full((len(groups), int(h["index"].max()) + 1), np.nan)
    for i, g in enumerate(groups["group"]):
        part = h[h["group"] == g]
        grid[i, part["index"].to_numpy()] = part["score"].to_numpy()
    shared = groups["layer"].duplicated(keep=False)  # several head groups per layer (e.g. spatial, temporal)
    labels = [f"{_label(r)} {r.group.split('.')[-2]}" if dup else _label(r) for r, dup in zip(groups.itertuples(), shared)]
    fig, ax = plt.subplots(figsize=(min(2.6 + 0.45 * grid.shape[1], 10), 1.2 + 0.38 * grid.shape[0]))
    lim = np.nanmax(np.abs(grid)) or 1.0
    im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(len(groups)), labels)
    ax.set_xlabel("head index (as numbered in this model)")
    ax.set_ylabel("layer")
    ax.grid(False)
    if grid.size <= 200:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6.5,
                        color="white" if abs(v) > 0.6 * lim else "#222")
    fig.colorbar(im, ax=ax, label=what, shrink=0.9)
    ax.set_title("Head importance")
    return _embed(fig, "Attention heads: layer × head",
                  "Dark red heads matter most (removing them hurts); pale and blue ones are the first to cut.")


def neuron_distributions(scores: pd.DataFrame, what: str) -> Figure | None:
    """Box plots of |score| per group of neurons / channels / units, on a log axis."""
    n = scores[scores["kind"].isin(["neuron", "channel", "unit"])]
    if n.empty:
        return None
    plt = _plt()
    groups = n.drop_duplicates("group").sort_values(["layer", "group"])
    data = [np.abs(n.loc[n["group"] == g, "score"].to_numpy()) + 1e-12 for g in groups["group"]]
    fig, ax = plt.subplots(figsize=(9, 3.2))
    parts = ax.boxplot(data, showfliers=False, patch_artist=True, widths=0.6)
    for patch, kind in zip(parts["boxes"], groups["kind"]):
        patch.set_facecolor(KIND_COLORS.get(kind, "#777"))
        patch.set_alpha(0.75)
    for med in parts["medians"]:
        med.set_color("black")
    ax.set_yscale("log")
    ax.set_xticks(range(1, len(groups) + 1), [f"{_label(r)}\n{r.kind}s" for r in groups.itertuples()], fontsize=8)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"|{what}| (log scale)")
    ax.set_title("Neuron importance per layer")
    return _embed(fig, "Neurons: score distribution per layer",
                  "Boxes span the middle half of each layer's neurons; layers whose boxes sit low hold the most removable neurons.")


def block_influence(scores: pd.DataFrame, what: str, influence: pd.DataFrame | None = None,
                    exact: pd.DataFrame | None = None) -> Figure | None:
    """One bar per residual block: ShortGPT's influence (how much it changes the residual stream) and its
    effect on the loss (exact ablation where it was run, else the cheap score)."""
    b = scores[scores["kind"] == "block"].sort_values(["layer", "index"])
    if b.empty:
        return None
    plt = _plt()
    panels = []
    if influence is not None and not influence.empty:
        panels.append((influence.sort_values("index"), "1 − cos(block input, output)", "Influence on the residual stream"))
    ex = exact[exact["kind"] == "block"].sort_values("index") if exact is not None else None
    if ex is not None and not ex.empty:
        panels.append((ex.rename(columns={"score_exact": "score"}), f"exact {what}", "Effect on the loss (exact)"))
    else:
        panels.append((b, what, "Effect on the loss"))
    fig, axes = plt.subplots(1, len(panels), figsize=(9, 2.9), squeeze=False)
    for ax, (part, label, title) in zip(axes[0], panels):
        ax.bar(range(len(part)), part["score"], color=KIND_COLORS["block"])
        ax.set_xticks(range(len(part)), [f"L{i}" for i in part["index"]])
        ax.set_xlabel("block (layer)")
        ax.set_ylabel(label)
        ax.axhline(0, color="#444", lw=0.8)
        ax.set_title(title)
    return _embed(fig, "Whole blocks",
                  "Tall bars are blocks the model cannot do without; short ones could be dropped whole.")


def class_heatmap(by_class: pd.DataFrame, what: str) -> Figure | None:
    """Heads × classes: which heads matter for which class."""
    h = by_class[by_class["kind"] == "head"]
    if h.empty:
        return None
    plt = _plt()
    h = h.assign(head=[f"L{r.layer}.{r.index}" for r in h.itertuples()])
    order = h.drop_duplicates("head").sort_values(["layer", "index"])["head"]
    grid = h.pivot_table(index="class_label", columns="head", values="score", aggfunc="mean")[order]
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.13 * grid.shape[1], 10), max(2.6, 1.4 + 0.4 * grid.shape[0])))
    lim = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    im = ax.imshow(grid.to_numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_yticks(range(grid.shape[0]), [str(c) for c in grid.index])
    step = max(1, grid.shape[1] // 24)
    ax.set_xticks(range(0, grid.shape[1], step), list(grid.columns[::step]), rotation=90, fontsize=7)
    ax.set_xlabel("head (layer.index)")
    ax.set_ylabel("class")
    ax.grid(False)
    fig.colorbar(im, ax=ax, label=what, shrink=0.9)
    ax.set_title("Per-class head attribution")
    return _embed(fig, "Which heads matter for which class",
                  "A head red in one row and pale in the others serves that class alone; red in every row, all of them.")


def _ffn_label(part: pd.DataFrame) -> str:
    layer = part["layer"].iloc[0]
    return f"L{int(layer)}" if pd.notna(layer) and layer >= 0 else str(part["ffn"].iloc[0])


def expert_usage(usage: pd.DataFrame) -> Figure | None:
    """One heatmap per mixture-of-experts FFN: classes × experts, the share of the class's tokens that ran
    each expert (`particlize.moe.expert_usage`)."""
    if usage is None or usage.empty:
        return None
    plt = _plt()
    ffns = usage.drop_duplicates("ffn").sort_values(["layer", "ffn"], na_position="last")["ffn"].tolist()
    classes = list(dict.fromkeys(usage["class_label"]))
    heights = [0.55 + 0.32 * len(classes)] * len(ffns)
    fig, axes = plt.subplots(len(ffns), 1, figsize=(9, 0.5 + sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    vmax = float(usage["share"].max()) or 1.0
    for ax, ffn in zip(axes[:, 0], ffns):
        part = usage[usage["ffn"] == ffn]
        grid = part.pivot_table(index="class_label", columns="expert", values="share", aggfunc="sum").reindex(classes)
        im = ax.imshow(grid.to_numpy(), cmap="Blues", vmin=0, vmax=vmax, aspect="auto")
        ax.set_yticks(range(len(classes)), [str(c) for c in classes], fontsize=8)
        n = grid.shape[1]
        step = max(1, n // 32)
        ax.set_xticks(range(0, n, step), [str(e) for e in grid.columns[::step]], fontsize=7)
        ax.set_ylabel(f"{_ffn_label(part)}\n{int(part['active'].iloc[0])} of {n}", fontsize=8)
        ax.grid(False)
        if grid.size <= 96:
            for (i, j), v in np.ndenumerate(grid.to_numpy()):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=7, color="white" if v > 0.6 * vmax else "#222")
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.04).ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("expert")
    axes[0, 0].set_title("Share of each class's tokens routed to each expert (colour: share, same scale in every layer)")
    return _embed(fig, "Expert usage per class",
                  "One row per class, one column per expert: a dark cell is an expert most of that class's tokens "
                  "run (a row sums to k); a column dark in one row only is an expert that serves that class.")


# ---- scorer validation ------------------------------------------------------------------------------------


def validation_scatter(v: pd.DataFrame, summary: pd.DataFrame | None, what: str, method: str) -> Figure | None:
    """The cheap score against exact ablation, one colour per kind, Spearman per kind in the legend."""
    if v is None or v.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    rho = {} if summary is None else dict(zip(summary["kind"], summary["spearman"]))
    for kind, part in v.groupby("kind"):
        r = rho.get(kind, float("nan"))
        ax.scatter(part["score_exact"], part["score_cheap"], s=16, alpha=0.75, color=KIND_COLORS.get(kind, "#777"),
                   label=f"{kind}s (n={len(part)}, Spearman {r:.2f})", edgecolor="white", linewidth=0.3)
    lo = float(min(v["score_exact"].min(), v["score_cheap"].min()))
    hi = float(max(v["score_exact"].max(), v["score_cheap"].max()))
    ax.plot([lo, hi], [lo, hi], color="#999", ls=":", lw=1, label="equal")
    ax.set_xlabel(f"exact ablation: {what}")
    ax.set_ylabel(f"{method} estimate: {what}")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(f"{method} vs exact ablation")
    return _embed(fig, "Cheap score vs exact ablation",
                  "Points near a rising line mean the cheap score ranks particles as removing them really does; "
                  "Spearman 1 is a perfect ranking.")


# ---- the loop and the sweep -------------------------------------------------------------------------------


def loop_rounds(history: list[dict[str, Any]], quality_name: str) -> Figure | None:
    """Quality, FLOPs, params and measured latency per round."""
    if not history:
        return None
    plt = _plt()
    h = pd.DataFrame(history)
    r = h["round"].to_numpy()
    below = h.get("below_floor", pd.Series(False, index=h.index)).fillna(False).astype(bool).to_numpy()
    fig, axes = plt.subplots(1, 4, figsize=(11, 2.9))
    panels = (("quality", f"val {quality_name}", 1.0), ("flops_ratio", "FLOPs kept (% of dense)", 100.0),
              ("params", "parameters (millions)", 1e-6), ("latency_ms", "measured latency (ms)", 1.0))
    colors = ("#2f5fc4", "#e8833a", "#3a9d5d", "#d64550")
    for ax, (col, label, scale), c in zip(axes, panels, colors):
        y = h[col].to_numpy(dtype=float) * scale
        ax.plot(r, y, "o-", color=c, ms=4)
        if below.any():
            ax.plot(r[below], y[below], "x", color="black", ms=7, label="below floor")
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_xticks(r if len(r) <= 12 else r[:: max(1, len(r) // 8)])
    axes[0].set_title("Quality")
    axes[1].set_title("FLOPs")
    axes[2].set_title("Parameters")
    axes[3].set_title("Latency (CPU)")
    if below.any():
        axes[0].legend(fontsize=8)
    return _embed(fig, "Round by round",
                  "Each round cuts and recovers: quality should stay flat while FLOPs, parameters and latency fall.")


def _front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both lower cost ``x`` and higher quality ``y``."""
    order = np.argsort(x)
    best, keep = -np.inf, []
    for i in order:
        if y[i] > best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=int)


def sweep_pareto(df: pd.DataFrame) -> Figure | None:
    """Quality against FLOPs kept and against measured latency, one line per granularity, the Pareto front."""
    ok = df.dropna(subset=["flops_ratio"]) if "flops_ratio" in df else df.iloc[:0]
    if ok.empty:
        return None
    plt = _plt()
    col, label, scale = (("test_accuracy", "test accuracy (%)", 100.0) if "test_accuracy" in ok
                         else ("test_quality", "test quality", 1.0))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    palette = ["#3b6fd8", "#e8833a", "#3a9d5d", "#8c5ad6", "#d64550"]
    for (g, part), c in zip(ok.groupby("granularity", sort=False), palette * 4):
        part = part.sort_values("flops_ratio")
        axes[0].plot(part["flops_ratio"] * 100, part[col] * scale, "o-", color=c, label=str(g), ms=5)
        axes[1].plot(part["latency_ms"], part[col] * scale, "o-", color=c, label=str(g), ms=5)
    for ax, xcol, xs in ((axes[0], "flops_ratio", 100.0), (axes[1], "latency_ms", 1.0)):
        x, y = ok[xcol].to_numpy(float) * xs, ok[col].to_numpy(float) * scale
        f = _front(x, y)
        ax.step(x[f], y[f], where="post", color="black", lw=1.2, ls="--", label="Pareto front")
    if "dense_latency_ms" in ok:
        axes[1].axvline(ok["dense_latency_ms"].median(), color="#888", ls=":", label="dense")
    axes[0].set_xlabel("FLOPs kept (% of dense)")
    axes[1].set_xlabel("measured latency (ms)")
    axes[0].set_ylabel(label)
    axes[0].set_title("Quality vs FLOPs")
    axes[1].set_title("Quality vs latency")
    axes[1].legend(title="particles removed", fontsize=8)
    return _embed(fig, "Sweep: quality vs cost per granularity",
                  "Up and to the left is better; the dashed line joins the runs no other run beats on both cost and quality.")


# ---- kept structure ---------------------------------------------------------------------------------------


def kept_widths(before: pd.DataFrame, after: pd.DataFrame) -> Figure | None:
    """Particles kept per layer and kind, as a share of the dense model's, with counts."""
    b = before.groupby(["kind", "layer"]).size()
    a = after.groupby(["kind", "layer"]).size().reindex(b.index, fill_value=0)
    kinds = [k for k in dict.fromkeys(before["kind"]) if k != "block"]
    layers = sorted(before.loc[before["layer"] >= 0, "layer"].unique())
    if not kinds or not layers:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 3.2))
    w = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        x = np.arange(len(layers)) + (i - (len(kinds) - 1) / 2) * w
        kept = np.array([a.get((kind, layer), 0) for layer in layers], dtype=float)
        full = np.array([b.get((kind, layer), 0) for layer in layers], dtype=float)
        share = np.divide(kept, full, out=np.zeros_like(kept), where=full > 0) * 100
        bars = ax.bar(x, share, w, color=KIND_COLORS.get(kind, "#777"), label=f"{kind}s")
        if len(layers) * len(kinds) <= 36:
            for rect, k, n in zip(bars, kept, full):
                if n:
                    text = f"{int(k):,}/{int(n):,}"
                    ax.annotate(text, (rect.get_x() + rect.get_width() / 2, rect.get_height()), ha="center",
                                va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points",
                                rotation=90 if len(text) > 6 else 0)
    ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_ylim(0, 135)
    ax.set_yticks(range(0, 101, 25))
    ax.set_xlabel("layer")
    ax.set_ylabel("particles kept (% of dense)")
    ax.set_title("Kept width per layer")
    ax.legend(ncol=len(kinds), fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _embed(fig, "The kept structure",
                  "Each bar is how much of a layer's heads or neurons survived; uneven bars show where the model had slack.")


def video_frames(videos: Any, title: str, caption: str) -> Figure:
    """A grid of sampled videos (one row per digit, one column per frame)."""
    with tempfile.TemporaryDirectory() as d:
        path = video_grid(videos, Path(d) / "v.png", row_labels=[f"digit {i}" for i in range(len(videos))], title=title)
        uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return Figure(title, caption, uri, alt=title, half=True)
