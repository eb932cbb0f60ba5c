"""Figures: sample grids of videos (PNG) and animations (GIF)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import particlize as pz
from particlize.report import video_gif, video_grid


def _videos(B: int = 3, T: int = 4, H: int = 8, W: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand((B, 1, T, H, W), generator=g)


def test_gif_tiles_every_video_frame_by_frame(tmp_path):
    v = _videos()
    path = video_gif(v, tmp_path / "a.gif", ncols=2, scale=2)
    im = Image.open(path)
    assert im.n_frames == 4
    # 2 columns x 2 rows of 6x8 videos with 1-pixel gaps, enlarged twice
    assert im.size == ((2 * (6 + 1) + 1) * 2, (2 * (8 + 1) + 1) * 2)
    im.seek(2)
    frame = np.asarray(im.convert("L"), dtype=np.float32) / 255
    want = v[1, 0, 2].numpy().repeat(2, 0).repeat(2, 1)  # video 1 sits in row 0, column 1
    got = frame[2:2 + 16, (1 + 6 + 1) * 2:(1 + 6 + 1) * 2 + 12]
    assert np.abs(got - want).max() < 2 / 255 + 1e-6


def test_png_grid_and_refusals(tmp_path):
    path = video_grid(_videos(), tmp_path / "g.png", row_labels=["a", "b", "c"], title="t")
    assert Image.open(path).format == "PNG" and not list(tmp_path.glob(".*tmp*"))
    with pytest.raises(pz.ParticlizeError, match="already exists"):
        video_grid(_videos(), path)
    video_grid(_videos(), path, force=True)
    with pytest.raises(pz.ParticlizeError, match=r"\[B, C, T, H, W\]"):
        video_gif(torch.rand(2, 8, 8), tmp_path / "x.gif")


# ---- the HTML report (particlize.report.write_report, `particlize report`) ----------------------------------

import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import typer  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from particlize.report import write_report  # noqa: E402
from particlize.cli.report_cmd import report_command  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
TINY = dict(recover_epochs=0, min_quality=0, batch_size=16, calib_examples=32, latency_batch=4, latency_seq=8)


def sections(page: str) -> dict[str, str]:
    """``{section id: "yes" | "no"}``: whether each section of the page says it has no data."""
    return dict(re.findall(r'data-section="(\w+)" data-empty="(\w+)"', page))


def check_self_contained(page: str) -> int:
    """The page loads nothing from elsewhere; returns the number of embedded figures."""
    assert not re.search(r'<(script|img|link|iframe)[^>]+(src|href)="(?!data:|#)', page), "an external resource"
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    return len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page))


def table_rows(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="pt-data">(.*?)</script>', page, re.S).group(1))


@pytest.fixture(scope="module")
def reports(trained_text, tmp_path_factory):
    """The four kinds of source, each reported once: {kind: (source, page)}."""
    from particlize.loop import compress
    from particlize.sweep import sweep

    work, model, task, tok = trained_text
    out = tmp_path_factory.mktemp("reports")
    compress(model, task, tokenizer=tok, out=out / "run", target_flops=0.6, **TINY)
    sweep(model, task, tokenizer=tok, granularities=("heads", "neurons"), flops=(0.8, 0.6), out=out / "sweep",
          recover_epochs=0, batch_size=16, min_quality=0)
    df = pz.analyze(pz.decompose(model), task.batches("val", tokenizer=tok, batch_size=16), "taylor", by="class")
    df.insert(df.columns.get_loc("class") + 1, "class_name", df["class"].map(dict(enumerate(task.classes))))
    df.to_csv(out / "scores.csv", index=False)
    got = {
        "run": write_report(out / "run", task=task),
        "sweep": write_report(out / "sweep"),
        "model": write_report(work / "dense", out / "model.html", task=task),
        "csv": write_report(out / "scores.csv", out / "csv.html"),
    }
    return {k: (p, p.read_text()) for k, p in got.items()}


def test_run_report_has_every_section_and_the_rounds(reports):
    path, page = reports["run"]
    assert path.name == "report.html" and path.parent.name == "run"  # default: inside the run folder
    assert sections(page) == {"overview": "no", "maps": "no", "experts": "yes", "validation": "no", "pairs": "yes",
                              "loop": "no", "structure": "no", "table": "no"}
    assert "no mixture-of-experts FFN" in page
    assert check_self_contained(page) >= 7  # kinds, layers, heads, neurons, classes, validation, rounds, widths
    history = json.loads((path.parent / "history.json").read_text())["history"]
    for e in history:  # the rounds' table lists each round's FLOPs share as the run recorded it
        assert f"<td>{e['round']}</td><td>{e['flops_ratio']:.1%}</td>" in page
    small = pz.decompose(pz.load(path.parent))
    rows = table_rows(page)
    assert len(rows["rows"]) == sum(g.size for g in small.groups)  # the compressed model's particles, scored
    assert "Spearman" in page and not list(path.parent.glob(".*tmp"))


def test_sweep_report_shows_the_pareto_front_and_says_what_it_lacks(reports):
    _, page = reports["sweep"]
    assert sections(page) == {"overview": "yes", "maps": "yes", "experts": "yes", "validation": "yes", "pairs": "yes",
                              "loop": "no", "structure": "yes", "table": "no"}
    assert "Sweep: quality vs cost per granularity" in page and check_self_contained(page) == 1
    assert page.count("<td>heads</td>") == page.count("<td>neurons</td>") == 2  # the sweep's rows, listed
    assert page.count("No data for this source.") == 6  # overview, maps, experts, validation, pairs, structure


def test_model_report_analyses_with_exact_ablation(reports, trained_text):
    _, page = reports["model"]
    s = sections(page)
    assert s["overview"] == s["maps"] == s["validation"] == "no" and s["loop"] == s["structure"] == "yes"
    assert "A single model has no rounds" in page and "Nothing was removed" in page
    pm = pz.decompose(trained_text[1])
    assert len(table_rows(page)["rows"]) == sum(g.size for g in pm.groups)
    assert "Which heads matter for which class" in page and "Cheap score vs exact ablation" in page


def test_csv_report_reads_per_class_scores(reports):
    _, page = reports["csv"]
    s = sections(page)
    assert s["maps"] == s["overview"] == "no" and s["validation"] == s["loop"] == "yes"
    rows = table_rows(page)
    assert rows["columns"] == ["group", "kind", "layer", "index", "params", "flops", "score"]
    assert "Which heads matter for which class" in page
    assert check_self_contained(page) >= 4


def test_inspect_csv_has_an_overview_and_no_maps(tmp_path, trained_text):
    pz.decompose(trained_text[1]).table().to_csv(tmp_path / "p.csv", index=False)
    page = write_report(tmp_path / "p.csv", tmp_path / "p.html").read_text()
    s = sections(page)
    assert s["overview"] == "no" and s["maps"] == "yes" and "written by `inspect`" in page


def test_refuses_to_overwrite_without_force(reports, tmp_path):
    path, _ = reports["csv"]
    src = path.with_name("scores.csv")
    before = path.read_bytes()
    with pytest.raises(pz.ParticlizeError, match="already exists; pass --force"):
        write_report(src, path)
    assert path.read_bytes() == before
    app = typer.Typer()
    app.command()(report_command)
    res = CliRunner().invoke(app, [str(src), "--out", str(path)])
    assert res.exit_code != 0 and isinstance(res.exception, pz.ParticlizeError)
    res = CliRunner().invoke(app, [str(src), "--out", str(path), "--force"])
    assert res.exit_code == 0 and "report written to" in res.output and path.read_text() != ""


@pytest.mark.parametrize("make, match", [
    (lambda d: d / "missing", "not found"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "neither a compress run"),
    (lambda d: (d / "x.txt").write_text("hi") and d / "x.txt", "is not a CSV"),
    (lambda d: (d / "x.csv").write_text("a,b\n1,2\n") and d / "x.csv", "no group and index columns"),
])
def test_bad_sources_give_one_line_errors(tmp_path, make, match):
    src = make(tmp_path)
    with pytest.raises(pz.ParticlizeError, match=match) as e:
        write_report(src, tmp_path / "r.html")
    assert "\n" not in str(e.value) and not (tmp_path / "r.html").exists()
    app = typer.Typer()
    app.command()(report_command)
    res = CliRunner().invoke(app, [str(src), "--out", str(tmp_path / "r.html")])
    assert res.exit_code != 0 and match in str(res.exception)


def test_out_must_be_html_and_a_file_source_needs_out(tmp_path, reports):
    src = reports["csv"][0].with_name("scores.csv")
    with pytest.raises(pz.ParticlizeError, match="name it"):
        write_report(src, tmp_path / "r.txt")
    with pytest.raises(pz.ParticlizeError, match="give an output file"):
        write_report(src)


@pytest.mark.slow
def test_sora_tiny_report_samples_videos(tmp_path):
    """The shipped video DiT on moving digits: sample frames in the kept-structure section, no per-class maps."""
    page = write_report("sora-tiny", tmp_path / "s.html", limit=16).read_text()
    s = sections(page)
    assert s["structure"] == s["maps"] == s["validation"] == s["overview"] == "no" and s["loop"] == "yes"
    assert "<h3>Samples</h3>" in page and "has no class labels" in page and "ε-MSE" in page
    assert check_self_contained(page) >= 6


# ---- expert usage per class (mixture-of-experts models made by moefy) ---------------------------------------


def _moe_classifier(model):
    """The tiny classifier with every FFN cut into 4 strided experts, 2 active, routers spread wide."""
    from particlize.surgery import ExpertFFN, moefy_model

    pm = pz.decompose(model)
    moe = moefy_model(pm, {g.name: [list(range(e, g.size, 4)) for e in range(4)] for g in pm.select("neuron")},
                      active=2).model
    torch.manual_seed(0)
    with torch.no_grad():
        for f in moe.modules():
            if isinstance(f, ExpertFFN):
                f.router.out.weight.normal_(0, 1.0)
    return moe.eval()


def _direct_counts(moe, batches, ffn_path):
    """{(class, expert): tokens} by routing each non-padding token by hand: the router's top-2 logits."""
    got, seen = {}, []
    ffn = moe.get_submodule(ffn_path)
    h = ffn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            for inputs, labels in batches:
                seen.clear()
                moe(**inputs)
                logits = ffn.router(seen[0])
                for b in range(logits.shape[0]):
                    for t in range(logits.shape[1]):
                        if inputs["attention_mask"][b, t]:
                            for e in sorted(range(logits.shape[2]), key=lambda e: -float(logits[b, t, e]))[:2]:
                                key = (int(labels[b]), e)
                                got[key] = got.get(key, 0) + 1
    finally:
        h.remove()
    return got


@pytest.fixture(scope="module")
def moe_report(trained_text, tmp_path_factory):
    work, model, task, tok = trained_text
    out = tmp_path_factory.mktemp("moe")
    pz.save(_moe_classifier(model), out / "moe", tokenizer=tok)
    return out / "moe", write_report(out / "moe", out / "moe.html", task=task, limit=32)


def test_expert_usage_per_class_equals_a_direct_count_of_router_choices(moe_report, trained_text):
    from particlize.report import gather

    _, _, task, tok = trained_text
    folder, path = moe_report
    d = gather(folder, task=task, limit=32)
    u = d.expert_usage
    moe = pz.load(folder).eval()
    batches = task.batches("val", tokenizer=tok, batch_size=32, max_length=64, limit=32)
    paths = sorted(u["ffn"].unique())
    assert len(paths) == 2 and set(u["class_label"]) == set(task.classes)
    for ffn_path in paths:
        want = _direct_counts(moe, batches, ffn_path)
        part = u[u["ffn"] == ffn_path]
        for r in part.itertuples():
            c = task.classes.index(r.class_label)
            assert r.selected == want.get((c, r.expert), 0)
            tokens = sum(int(m[labels == c].sum()) for (inputs, labels) in batches for m in [inputs["attention_mask"]])
            assert r.tokens == tokens and r.share == pytest.approx(r.selected / tokens)
        assert part.groupby("class_label")["share"].sum().tolist() == pytest.approx([2.0] * len(task.classes))
    page = path.read_text()
    s = sections(page)
    assert s["experts"] == "no" and "Expert usage per class" in page and "unused experts" in page
    assert s["maps"] == s["validation"] == "no"  # experts are particles: scored and ablated like the rest
    from particlize.report.render import balance

    b = balance(u)
    assert ((0 <= b["entropy"]) & (b["entropy"] <= 1)).all() and (b["busiest"] >= b["quietest"]).all()


def test_expert_usage_refuses_a_dense_model(trained_text):
    from particlize.moe import expert_usage

    with pytest.raises(pz.ParticlizeError, match="no mixture-of-experts FFN"):
        expert_usage(trained_text[1], [])
