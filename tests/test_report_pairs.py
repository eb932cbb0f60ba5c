"""The report's *Interactions* section: an ``analyze --interactions`` CSV, or a model reported with
``interactions=True``, drawn as particle × particle matrices with the strongest pairs listed."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import particlize as pz
from particlize.analysis import interactions_table, redundancy_score
from particlize.cli import app
from particlize.report import write_report
from particlize.report.pairs import pair_matrix, particles
from test_report import check_self_contained, sections


def _section(page: str, sid: str) -> str:
    part = page[page.index(f'id="{sid}"'):]
    return part[:part.index("</section>")]


@pytest.fixture(scope="module")
def pairs_csv(trained_text, tmp_path_factory):
    work, model, task, tok = trained_text
    out = tmp_path_factory.mktemp("pairs")
    batches = task.batches("val", tokenizer=tok, batch_size=16, limit=16)
    df = interactions_table(pz.decompose(model), batches, "head", "ablation")
    df.to_csv(out / "pairs.csv", index=False)
    return out, df


def _label(df: pd.DataFrame, row: pd.Series, s: str) -> str:
    return f"L{int(row[f'layer_{s}'])} h{int(row[f'index_{s}'])}"


def test_interactions_csv_report_draws_the_matrices_and_lists_the_strongest_pairs(pairs_csv):
    out, df = pairs_csv
    page = write_report(out / "pairs.csv", out / "pairs.html").read_text()
    s = sections(page)
    assert s["pairs"] == "no" and s["overview"] == s["maps"] == s["loop"] == "yes"
    section = _section(page, "pairs")
    assert "Interactions within each layer" in section and "Interactions across layers" in section
    assert check_self_contained(section) == 2
    r = df.assign(red=redundancy_score(df, "loss"))
    top, low = r.loc[r["red"].idxmax()], r.loc[r["red"].idxmin()]
    for row in (top, low):  # the most redundant and the most synergistic pair are listed, with their values
        assert f"<td>{_label(df, row, 'a')}</td><td>{_label(df, row, 'b')}</td><td>{row['red']:+.4g}</td>" in section
    assert f"<dd>{len(df):,}</dd>" in page or f"{len(df):,}" in page  # the pair count among the facts


def test_model_report_measures_head_pairs_on_request(trained_text, tmp_path):
    work, model, task, tok = trained_text
    plain = write_report(work / "dense", tmp_path / "plain.html", task=task, limit=16).read_text()
    assert sections(plain)["pairs"] == "yes" and "measured on request" in plain
    page = write_report(work / "dense", tmp_path / "pairs.html", task=task, limit=16, interactions=True).read_text()
    assert sections(page)["pairs"] == "no"
    heads = sum(g.size for g in pz.decompose(model).groups if g.kind == "head")
    assert len(re.findall(r"<td>L\d+ h\d+</td><td>L\d+ h\d+</td>", _section(page, "pairs"))) == min(16, heads * (heads - 1) // 2)


def test_cli_reports_an_interactions_csv(pairs_csv):
    out, _ = pairs_csv
    res = CliRunner().invoke(app, ["report", str(out / "pairs.csv"), "--out", str(out / "cli.html")])
    assert res.exit_code == 0, res.output
    assert 'data-section="pairs" data-empty="no"' in (out / "cli.html").read_text()


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_pair_matrix_is_symmetric_ordered_by_layer_and_holds_every_pair(data):
    layers = data.draw(st.lists(st.integers(0, 3), min_size=2, max_size=4))
    sizes = data.draw(st.lists(st.integers(1, 4), min_size=len(layers), max_size=len(layers)))
    parts = [(f"l{k}.heads", i, layer) for k, (layer, n) in enumerate(zip(layers, sizes)) for i in range(n)]
    if len(parts) < 2:
        return
    pairs = [(a, b) for x, a in enumerate(parts) for b in parts[x + 1:]]
    pairs = data.draw(st.lists(st.sampled_from(pairs), min_size=1, unique=True))
    values = data.draw(st.lists(st.floats(-1, 1), min_size=len(pairs), max_size=len(pairs)))
    df = pd.DataFrame({"group_a": [a[0] for a, _ in pairs], "index_a": [a[1] for a, _ in pairs],
                       "group_b": [b[0] for _, b in pairs], "index_b": [b[1] for _, b in pairs], "interaction": values,
                       "layer_a": [a[2] for a, _ in pairs], "layer_b": [b[2] for _, b in pairs],
                       "kind_a": "head", "kind_b": "head"})
    metric = data.draw(st.sampled_from(["loss", "accuracy"]))
    m, p = pair_matrix(df, metric)
    assert list(p["layer"]) == sorted(p["layer"])
    np.testing.assert_array_equal(np.isnan(m), np.isnan(m.T))
    np.testing.assert_allclose(np.nan_to_num(m), np.nan_to_num(m.T))
    assert np.isnan(np.diag(m)).all() and np.isfinite(m).sum() == 2 * len(df)
    at = {(g, i): k for k, (g, i) in enumerate(zip(p["group"], p["index"]))}
    sign = 1 if metric == "loss" else -1  # accuracy: higher is better, so redundancy is -I
    for row in df.itertuples():
        assert m[at[(row.group_a, row.index_a)], at[(row.group_b, row.index_b)]] == pytest.approx(sign * row.interaction)
    assert set(particles(df)["label"]) == {f"L{layer} h{i}" for _, i, layer in
                                           {(a[0], a[1], a[2]) for pr in pairs for a in pr}}
