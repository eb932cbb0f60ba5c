"""The README's measured numbers against the summary table at the top of benchmarks/RESULTS.md.

A measured number in README.md is followed by an HTML comment naming its row, ``0.856<!--n:recover-25-->``
(invisible when rendered). The summary tables before RESULTS.md's first ``##`` (one per capability) have one row per headline
number: ``| key | value | how measured | command | machine | date |``. A README number must equal its row's value, rounded to the
digits the README shows, with the same unit (× or %); a marker without a row, and a speedup (``2.5×``) without a
marker, fail. So the two cannot drift apart again.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

_NUM = r"[−+\-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:e[−+\-]?\d+)?"
_VALUE = re.compile(rf"\[?{_NUM}(?:\s*(?:–|to|,)\s*{_NUM})?\]?\s?[×%]?$")
_MARKER = re.compile(r"<!--n:([\w.-]+)-->")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
HEADER = ["key", "value", "how measured", "command", "machine", "date"]


def _numbers(value: str) -> tuple[list[tuple[float, int]], str]:
    """(each number with its count of decimals, unit) of a value such as ``2.54–2.89×`` or ``−3.1 to +1.2``."""
    unit = value.strip()[-1] if value.strip()[-1:] in ("×", "%") else ""
    out = []
    for tok in re.findall(_NUM, value):
        mant = tok.lower().split("e")[0]
        decimals = len(mant.split(".")[1]) if "." in mant else 0
        out.append((float(tok.replace("−", "-").replace(",", "")), decimals))
    return out, unit


def matches(readme_value: str, results_value: str) -> bool:
    """Whether a README value is its RESULTS value, rounded to the README's decimals (same count, signs, unit)."""
    ours, unit = _numbers(readme_value)
    theirs, their_unit = _numbers(results_value)
    if unit != their_unit or len(ours) != len(theirs) or not ours:
        return False
    for (a, d), (b, _) in zip(ours, theirs):
        tol = abs(b) * 0.05 if "e" in readme_value.lower() else 0.5 * 10.0 ** -d
        if abs(a - b) > tol + 1e-9 or (a < 0) != (b < 0):
            return False
    return True


def summary_rows() -> dict[str, dict[str, str]]:
    """The summary tables before RESULTS.md's first ``##`` section (one per capability), by key.

    Each table starts with the header ``| key | value | how measured | command | machine | date |``."""
    head = RESULTS.read_text(encoding="utf-8").split("\n## ", 1)[0]
    lines = [ln for ln in head.splitlines() if ln.startswith("|")]
    assert lines, "RESULTS.md needs its summary tables before the first ##"
    rows: dict[str, dict[str, str]] = {}
    cols: list[str] = []
    for ln in lines:
        cells = [c.strip() for c in ln.strip().strip("|").split(" | ")]
        if cells[0] == "key":
            cols = cells
            assert cols == HEADER, f"summary table header must be {' | '.join(HEADER)}: {ln}"
            continue
        if set(ln) <= set("|-: "):
            continue
        assert cols, f"summary row before any table header: {ln}"
        assert len(cells) == len(cols), f"summary row needs {len(cols)} cells: {ln}"
        row = dict(zip(cols, cells))
        key = row.pop("key")
        assert key not in rows, f"summary key {key} twice"
        assert re.search(_NUM, row["value"]) and row["how measured"] and row["command"] and row["machine"] \
            and _DATE.match(row["date"]), f"bad summary row: {ln}"
        rows[key] = {"value": row["value"], "how": row["how measured"], "command": row["command"],
                     "machine": row["machine"], "date": row["date"]}
    return rows


def _prose(text: str) -> str:
    """The README without its fenced code blocks (commands and code are not claims)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def readme_numbers() -> list[tuple[str, str]]:
    """(key, value as written) for every marked number in the README's prose."""
    text = _prose(README.read_text(encoding="utf-8"))
    out, start = [], 0
    for m in _MARKER.finditer(text):
        before = text[start:m.start()]
        v = _VALUE.search(before)
        assert v, f"marker {m.group(1)} does not follow a number: …{before[-40:]!r}"
        out.append((m.group(1), v.group(0)))
        start = m.end()
    return out


def test_summary_table_parses():
    rows = summary_rows()
    assert len(rows) >= 20
    assert rows["dense-acc"]["value"] == "0.8551"


def test_readme_numbers_match_results_summary():
    rows = summary_rows()
    found = readme_numbers()
    assert len(found) >= 30
    missing = sorted({k for k, _ in found if k not in rows})
    assert not missing, f"README numbers with no row in RESULTS.md's summary: {missing}"
    wrong = [f"{k}: README {v!r}, RESULTS {rows[k]['value']!r}" for k, v in found if not matches(v, rows[k]["value"])]
    assert not wrong, "README numbers that differ from RESULTS.md's summary: " + "; ".join(wrong)


def test_every_readme_speedup_is_marked():
    unmarked = [m.group(0) for m in re.finditer(r"\d×(?!<!--n:)", _prose(README.read_text(encoding="utf-8")))]
    assert not unmarked, f"speedups in the README without a RESULTS key: {unmarked}"


@pytest.mark.parametrize(("readme", "results", "ok"), [
    ("0.856", "0.8561", True),
    ("0.855", "0.8561", False),            # drifted
    ("2.5–2.9×", "2.54–2.89×", True),
    ("2.5–2.9×", "2.54–2.89", False),       # unit differs
    ("−3.1 to +1.2", "−3.1 to +1.2", True),
    ("+3.1 to +1.2", "−3.1 to +1.2", False),  # sign differs
    ("1,169", "1,169", True),
    ("18", "10.9 min", False),
    ("1.25e-5", "1.25e-5", True),
    ("12.4%", "12.47%", False),
])
def test_matches_rounds_but_catches_drift(readme, results, ok):
    v = _VALUE.search(readme)
    assert v is not None
    assert matches(v.group(0), results) is ok


def test_results_links_point_at_files():
    text = RESULTS.read_text(encoding="utf-8")
    links = re.findall(r"\]\((results/[\w.-]+\.md)\)", text)
    assert len(set(links)) >= 8
    missing = [ln for ln in sorted(set(links)) if not (RESULTS.parent / ln).is_file()]
    assert not missing, f"RESULTS.md links to missing detail files: {missing}"
