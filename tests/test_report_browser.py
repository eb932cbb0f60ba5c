"""The report as a person sees it: rendered by headless Chromium, with no JavaScript error and every section
present. Skipped (with the reason) where no Chromium is installed; .ci/run installs Debian's ``chromium``."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_report import TINY, moe_report  # noqa: E402,F401  (moe_report: a fixture)

from particlize.report import write_report  # noqa: E402
from particlize.report.render import SECTIONS  # noqa: E402


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file() else None)
        if found:
            return found
    pytest.skip("no Chromium binary found (chromium, chromium-browser or google-chrome): "
                "install it (Debian: apt-get install -y chromium) to check the report in a browser")


def dump_dom(page: Path) -> str:
    """The DOM after the page's scripts ran, as headless Chromium serialises it."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


@pytest.fixture(scope="module")
def run_report(trained_text, tmp_path_factory):
    from particlize.loop import compress

    work, model, task, tok = trained_text
    out = tmp_path_factory.mktemp("browser")
    compress(model, task, tokenizer=tok, out=out / "run", target_flops=0.6, **TINY)
    return write_report(out / "run", task=task)


def test_report_renders_without_script_errors_and_with_every_section(run_report):
    dom = dump_dom(run_report)
    ready = re.search(r'<div id="report-ready" hidden="" data-errors="(\d+)">', dom)
    assert ready, "the page's script did not run to its end"
    errors = re.search(r'<div id="js-errors"[^>]*>(.*?)</div>', dom, re.S).group(1)
    assert ready.group(1) == "0" and errors.strip() == "", f"JavaScript errors: {errors}"
    for s in SECTIONS:
        assert f'id="{s}"' in dom and f'href="#{s}"' in dom, f"section {s} missing"
        empty = "yes" if s in ("experts", "pairs") else "no"  # nothing routed, no pairs measured: each says why
        assert f'data-section="{s}" data-empty="{empty}"' in dom, f"section {s}: data-empty is not {empty}"
    assert "no mixture-of-experts FFN" in dom
    # the script built the particle table: a sortable head and the first page of rows, highest score first
    head = re.search(r'<table class="particles" id="pt"><thead><tr>(.*?)</tr>', dom, re.S).group(1)
    assert re.findall(r"<th[^>]*>(\w+)</th>", head) == ["group", "kind", "layer", "index", "params", "flops", "score"]
    assert 'class="desc"' in head
    rows = re.findall(r"<tr><td>[^<]+</td>(?:<td>[^<]*</td>){6}</tr>", dom)
    scores = [float(re.findall(r"<td>([^<]*)</td>", r)[-1]) for r in rows]
    assert scores and scores == sorted(scores, reverse=True)
    assert re.search(r'id="pt-count">[\d,]+ of [\d,]+ particles · page 1 of \d+<', dom)


def test_moe_report_renders_its_expert_usage(moe_report):
    """A MoEfied model's report in the browser: no script error, the expert usage drawn and its balance listed."""
    dom = dump_dom(moe_report[1])
    assert re.search(r'<div id="report-ready" hidden="" data-errors="0">', dom)
    assert 'data-section="experts" data-empty="no"' in dom and "Expert usage per class" in dom
    section = dom[dom.index('id="experts"'):]
    section = section[:section.index("</section>")]
    assert re.search(r'<img src="data:image/png;base64,', section) and "<th>entropy</th>" in section


def test_a_script_error_is_caught(run_report, tmp_path):
    """The check can fail: the same page with a throwing script shows the error in the dumped DOM."""
    bad = tmp_path / "bad.html"
    bad.write_text(run_report.read_text().replace("<body>", "<body><script>undefinedFunction();</script>", 1))
    dom = dump_dom(bad)
    assert "undefinedFunction" in re.search(r'<div id="js-errors"[^>]*>(.*?)</div>', dom, re.S).group(1)
    assert '<div id="report-ready" hidden="" data-errors="1">' in dom
