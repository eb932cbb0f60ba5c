"""The report's *Interactions* section: pairwise interactions (`particlize.analysis.interactions`) drawn as
particle × particle matrices, within each layer and across layers, with the strongest pairs listed.

Values are shown on the redundancy scale (`redundancy_score`): positive = the two cover for each other (removing
both costs more than the two removals one at a time say), negative = they only work together.
"""

from __future__ import annotations

import html
import math

import numpy as np
import pandas as pd

from ..analysis import redundancy_score, redundant_clusters
from .plots import Figure, _embed, _plt

PAIR_COLUMNS = ("group_a", "index_a", "group_b", "index_b", "interaction")
SHORT = {"head": "h", "neuron": "n", "channel": "c", "unit": "u", "block": "b", "kv_head": "kv", "factor": "f"}


def is_pair_frame(df: pd.DataFrame) -> bool:
    """Whether ``df`` holds pairwise interactions (the columns `interactions` writes)."""
    return set(PAIR_COLUMNS) <= set(df.columns)


def particles(df: pd.DataFrame) -> pd.DataFrame:
    """The particles that appear in ``df``'s pairs, ordered by layer, group and index, with a short label
    (``L2 h3``: layer 2, head 3). Layers and kinds come from the ``layer_*`` / ``kind_*`` columns when present."""
    parts = []
    for s in "ab":
        cols = {f"group_{s}": "group", f"index_{s}": "index"}
        for extra in ("layer", "kind"):
            if f"{extra}_{s}" in df:
                cols[f"{extra}_{s}"] = extra
        parts.append(df[list(cols)].rename(columns=cols))
    p = pd.concat(parts).drop_duplicates(["group", "index"])
    if "layer" not in p:
        p["layer"] = -1
    if "kind" not in p:
        p["kind"] = p["group"].str.rsplit(".", n=1).str[-1].str.rstrip("s")
    p = p.sort_values(["layer", "group", "index"]).reset_index(drop=True)
    p["label"] = [(f"L{int(r.layer)} " if r.layer >= 0 else "") + f"{SHORT.get(r.kind, r.kind)}{int(r.index)}"
                  for r in p.itertuples()]
    return p


def pair_matrix(df: pd.DataFrame, metric: str = "loss") -> tuple[np.ndarray, pd.DataFrame]:
    """The symmetric matrix of redundancy scores over `particles` (NaN on the diagonal and for pairs not
    measured) and that particle frame (its row order)."""
    p = particles(df)
    at = {(g, int(i)): k for k, (g, i) in enumerate(zip(p["group"], p["index"]))}
    m = np.full((len(p), len(p)), np.nan)
    r = redundancy_score(df, metric).to_numpy(dtype=float)
    a = np.array([at[(g, int(i))] for g, i in zip(df["group_a"], df["index_a"])], dtype=int)
    b = np.array([at[(g, int(i))] for g, i in zip(df["group_b"], df["index_b"])], dtype=int)
    m[a, b] = r
    m[b, a] = r
    return m, p


def _limit(m: np.ndarray) -> float:
    """The colour scale's end: the 99th percentile of |value| (a few extreme pairs do not wash out the rest)."""
    v = np.abs(m[np.isfinite(m)])
    q = float(np.quantile(v, 0.99)) if v.size else 0.0
    return q if q > 0 else 1.0


def figures(df: pd.DataFrame, metric: str = "loss", max_particles: int = 400) -> list[Figure]:
    """Within-layer matrices (one panel per layer) and the whole matrix across layers; none when ``df`` is empty
    or has more than ``max_particles`` particles (the tables still list its strongest pairs)."""
    if df.empty:
        return []
    m, p = pair_matrix(df, metric)
    if len(p) > max_particles:
        return []
    lim = _limit(m)
    plt = _plt()
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="#e2e2e2")  # grey: the diagonal and pairs not measured
    out = []
    layers = list(dict.fromkeys(p["layer"]))
    within = [(layer, np.flatnonzero(p["layer"].to_numpy() == layer)) for layer in layers]
    within = [(layer, idx) for layer, idx in within if len(idx) > 1 and np.isfinite(m[np.ix_(idx, idx)]).any()]
    if within and len(within) <= 24:
        n = len(within)
        cols = n if n <= 3 else 3 if n <= 9 else 4 if n <= 16 else 6
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.7 * cols + 0.9, 2.7 * rows + 0.3), squeeze=False,
                                 layout="constrained")
        im = None
        for ax, (layer, idx) in zip(axes.flat, within):
            im = ax.imshow(m[np.ix_(idx, idx)], cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_title(f"layer {layer}" if layer >= 0 else "pairs", fontsize=9)
            ax.set_xticks(range(len(idx)), [str(int(i)) for i in p["index"].to_numpy()[idx]], fontsize=6)
            ax.set_yticks(range(len(idx)), [str(int(i)) for i in p["index"].to_numpy()[idx]], fontsize=6)
            ax.grid(False)
        for ax in list(axes.flat)[len(within):]:
            ax.axis("off")
        fig.colorbar(im, ax=axes, shrink=0.8, label="redundancy (+) / synergy (−)")
        out.append(_embed(fig, "Interactions within each layer",
                                "Red: the two particles cover for each other (removing both costs more than the sum of "
                                "removing each); blue: they only work together; grey: not measured. Index = particle number in its layer."))
    if len(layers) > 1:
        fig, ax = plt.subplots(figsize=(7.2, 6.2))
        im = ax.imshow(m, cmap=cmap, vmin=-lim, vmax=lim, interpolation="nearest")
        edges = np.flatnonzero(np.diff(p["layer"].to_numpy())) + 0.5
        for e in edges:
            ax.axhline(e, color="#444", lw=0.6)
            ax.axvline(e, color="#444", lw=0.6)
        starts = np.concatenate([[0], np.ceil(edges).astype(int)])
        ends = np.concatenate([np.ceil(edges).astype(int), [len(p)]])
        ticks = (starts + ends - 1) / 2
        names = [f"L{layer}" if layer >= 0 else "" for layer in p["layer"].to_numpy()[starts]]
        ax.set_xticks(ticks, names)
        ax.set_yticks(ticks, names)
        ax.grid(False)
        fig.colorbar(im, ax=ax, shrink=0.8, label="redundancy (+) / synergy (−)")
        out.append(_embed(fig, "Interactions across layers",
                          "Every measured pair, particles ordered by layer (lines between layers); blocks off the "
                          "diagonal are pairs from different layers. Grey: not measured."))
    return out


def tables_html(df: pd.DataFrame, metric: str = "loss", k: int = 8) -> str:
    """The ``k`` most redundant and most synergistic pairs, and the largest cluster of mutually redundant particles."""
    if df.empty:
        return ""
    p = particles(df).set_index(["group", "index"])["label"]
    r = df.assign(redundancy=redundancy_score(df, metric))

    def rows(part: pd.DataFrame) -> str:
        return "".join(
            f"<tr><td>{html.escape(p[(x.group_a, x.index_a)])}</td><td>{html.escape(p[(x.group_b, x.index_b)])}</td>"
            f"<td>{x.redundancy:+.4g}</td></tr>" for x in part.itertuples())

    head = "<thead><tr><th>particle</th><th>particle</th><th>redundancy</th></tr></thead>"
    out = (f"<p class='lead'>Most redundant pairs (removing both costs more than the two single removals add up to):</p>"
           f"<table class='mini'>{head}<tbody>{rows(r.nlargest(k, 'redundancy'))}</tbody></table>"
           f"<p class='lead'>Most synergistic pairs (they only work together):</p>"
           f"<table class='mini'>{head}<tbody>{rows(r.nsmallest(k, 'redundancy'))}</tbody></table>")
    clusters = redundant_clusters(df, metric)
    if not clusters.empty:
        top = clusters[clusters["cluster"] == 0]
        names = ", ".join(html.escape(p[(g, i)]) for g, i in zip(top["group"], top["index"]))
        out += (f"<p class='lead'>Largest cluster of particles that cover for each other ({len(top)} particles, pairs "
                f"above the 95th percentile of |redundancy|): {names}.</p>")
    return out
