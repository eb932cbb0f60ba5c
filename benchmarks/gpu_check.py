"""Issue 29's check on one GPU, unattended: every row of its table measured the same way, with its target.

    PYTHONPATH=src python benchmarks/gpu_check.py --out DIR [--device cuda|cpu] [--small] [--only ROW ...]
        [--budget-s 450] [--wheels DIR] [--force]

Needs only torch, transformers and particlize: every model is built from a config with seeded random weights
(the MiniLM classifier from ``minilm_architectures.json``'s encoder config, the 1.1B TinyLlama shape, the shipped
``sora-tiny``); the text is synthetic token ids whose lengths follow the VADER test sentences
(`_gpu_common.VADER_LENGTHS`). Captum and Torch-Pruning columns are filled when they import (``--wheels DIR``
puts their pure-Python wheels on the path), else ``None`` with the reason. Each row runs in its own try/except
and time limit, so one failure leaves the others; ``DIR/gpu_check.json`` is rewritten (atomically) after every
row with the machine, the settings and every row's numbers or error. Timing: CUDA events after a synchronize on
a GPU, ``perf_counter`` on a CPU; warm-up first; the sides of a row interleaved, medians and paired ratios.

``--device cpu --small``: tiny configs and few examples, the whole script in about a minute on a 2-core CPU
(a smoke run: its ratios say nothing about a GPU). Rows: see ``ROWS`` (``--only heads top50 ...``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402  (sets HF_HUB_OFFLINE, puts src on the path)
import torch  # noqa: E402

import _gpu_ablation  # noqa: E402
import _gpu_cuts  # noqa: E402
import _gpu_scale  # noqa: E402
from _gpu_common import Ctx, Settings, add_wheels, peer, version  # noqa: E402

ROWS = {**_gpu_ablation.ROWS, **_gpu_cuts.ROWS, **_gpu_scale.ROWS}  # issue 29's table order, then the new targets
ROW_LIMIT_S = {"all": 300, "parts": 300, "top50": 240, "all_nosplit": 240, "llama_path": 240}  # GPU; others 120
JSON_NAME = "gpu_check.json"


class RowTimeout(Exception):
    pass


def _fail(msg: str) -> int:
    print(f"gpu_check: error: {msg}", file=sys.stderr)
    return 2


def machine(device: torch.device, wheels: list[str]) -> dict[str, Any]:
    import transformers

    captum, why_c = peer("captum")
    tp, why_t = peer("torch_pruning")
    info = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"), "device": str(device),
            "cpu": C.cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "captum": version(captum) or why_c, "torch_pruning": version(tp) or why_t, "wheels": wheels,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update({"gpu": torch.cuda.get_device_name(device), "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                     "tf32_cudnn": torch.backends.cudnn.allow_tf32})
    return info


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _alarm(signum: int, frame: Any) -> None:
    raise RowTimeout()


def run_row(name: str, ctx: Ctx, limit: float) -> dict[str, Any]:
    """One row, its error caught and recorded (with the last frames), under a wall-clock ``limit``."""
    t0 = time.perf_counter()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(limit)))
    try:
        out = {"row": name, **ROWS[name](ctx), "error": None}
    except RowTimeout:
        out = {"row": name, "error": f"timed out after {limit:.0f} s"}
    except Exception as e:  # one row's failure must leave the others: record it and go on
        tb = traceback.extract_tb(e.__traceback__)[-3:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb))
        out = {"row": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} ({where})"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    if out["error"]:  # say what the row was about all the same
        out["what"] = (ROWS[name].__doc__ or name).strip().split("\n")[0].rstrip(".:")
    out["seconds"] = time.perf_counter() - t0
    if ctx.cuda:
        torch.cuda.empty_cache()
    return out


def fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "PASS" if x else "FAIL"
    if isinstance(x, float):
        return f"{x:.3g}"
    if isinstance(x, dict):
        return ", ".join(f"{k} {fmt(v)}" for k, v in x.items()) or "—"
    return str(x)


def _verdict(row: dict[str, Any]) -> str:
    return "report" if row["passed"] is None else fmt(bool(row["passed"]))


def _status(row: dict[str, Any]) -> str:
    return f"ERROR {row['error']}" if row["error"] else f"{fmt(row['ratio'])} ({_verdict(row)})"


def print_rows(rows: list[dict[str, Any]]) -> None:
    table = []
    for r in rows:
        if r.get("error"):
            table.append([r["row"], r.get("what", ""), "—", "—", "—", r.get("target", ""), f"ERROR: {r['error'][:90]}"])
        else:
            table.append([r["row"], r["what"], f"{fmt(r['particlize'])} {r['unit']}", fmt(r["peer"]), fmt(r["ratio"]),
                          r["target"], _verdict(r)])
    C.print_table(["row", "what", "particlize", "peer / naive", "ratio", "target", "pass"], table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_check.json")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    ap.add_argument("--small", action="store_true", help="tiny configs, few examples: a CPU smoke run")
    ap.add_argument("--only", nargs="+", default=None, metavar="ROW", help=f"rows to run: {', '.join(ROWS)}")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget of the rows; rows left when it is spent are recorded as skipped "
                         "(default 450: 8 minutes with start-up; --small 300)")
    ap.add_argument("--wheels", default=None, help="folder of pure-Python wheels to import peers from (captum, torch-pruning)")
    ap.add_argument("--force", action="store_true", help=f"overwrite an existing {JSON_NAME}")
    args = ap.parse_args(argv)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        return _fail(f"--device {device!r}: use cuda or cpu")
    if device == "cuda" and not torch.cuda.is_available():
        return _fail("--device cuda: this torch sees no CUDA device; use --device cpu")
    bad = [r for r in args.only or [] if r not in ROWS]
    if bad:
        return _fail(f"unknown row(s) {', '.join(bad)}: choose from {', '.join(ROWS)}")
    out = args.out / JSON_NAME
    if out.exists() and not args.force:
        return _fail(f"{out} exists: pass --force to overwrite it or choose another --out")
    wheels = add_wheels(args.wheels)  # before anything is written: a missing peer wheel is one line and exit 1
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _fail(f"cannot create --out {args.out}: {e.strerror}")

    if device == "cpu":  # BENCHMARKING.md: 2 threads on the shared CPUs; the --small smoke run takes 1 (tiny
        # matrices on 2 threads of a loaded machine ran ~30x slower than on one: thread hand-offs, not work)
        torch.set_num_threads(1) if args.small else C.setup_threads()
    torch.manual_seed(0)
    ctx = Ctx(torch.device(device), Settings.make(args.small))
    budget = args.budget_s or (300.0 if args.small else 450.0)
    data = {"machine": machine(ctx.device, wheels), "settings": vars(ctx.cfg), "budget_s": budget, "rows": []}
    print("gpu_check:", json.dumps(data["machine"]), flush=True)
    write_json(out, data)  # the machine and settings on disk before the first row, should the process be killed in it
    start = time.perf_counter()
    for name in args.only or list(ROWS):
        left = budget - (time.perf_counter() - start)
        if left < 5:
            row = {"row": name, "error": f"skipped: the time budget of {budget:.0f} s was spent", "seconds": 0.0}
        else:
            limit = min(left, ROW_LIMIT_S.get(name, 120) * (0.5 if args.small else 1.0))
            row = run_row(name, ctx, limit)
        data["rows"].append(row)
        data["total_s"] = time.perf_counter() - start
        write_json(out, data)
        print(f"[{data['total_s']:6.1f} s] {name}: {_status(row)}", flush=True)
    print_rows(data["rows"])
    print(f"wrote {out} ({data['total_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
