"""Eager vs compiled DiT sampling (issue 29's sampler on a CPU), dense ``sora-tiny`` and its 50%-FLOPs width cut.

    PYTHONPATH=src python benchmarks/sora_sampler.py [--videos 20] [--steps 50] [--rounds 5] [--threads 1]
        [--out benchmarks/results/sora-sampler.json] [--force]

Four sides, each ``videos`` videos x ``steps`` guided DDIM steps (seed 0, labels 0-9 in turn): the dense model and
the cut (half of every block's heads, then FFN neurons by writer L2 until <= 50% of the FLOPs), each sampled
eagerly (``model.sample``) and with one `FastSampler(mode="compile")` built once and reused. A warm-up call per
side first (it compiles), then ``rounds`` interleaved rounds with the order rotated; medians and paired per-round
ratios. The videos of both modes are compared (max abs difference) and the matmul probe runs before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import _common as C
import torch

import particlize as pz
from _gpu_scale import half_flops_plan
from particlize.models.sora_sampler import FastSampler

OUT = C.ROOT / "benchmarks" / "results" / "sora-sampler.json"


def rounds_of(sides: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every side, ``rounds`` rounds, the order rotated each round (a, b, c; b, c, a; ...)."""
    names, out = list(sides), {n: [] for n in sides}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            sides[n]()
            out[n].append(time.perf_counter() - t)
        print(f"round {r + 1}: " + ", ".join(f"{n} {out[n][-1]:.2f} s" for n in names), flush=True)
    return out


def paired(times: dict[str, list[float]], base: str, other: str) -> dict[str, float]:
    """Per-round ``base / other`` (> 1: ``other`` is faster): median, range, and how many rounds were > 1."""
    r = [b / o for b, o in zip(times[base], times[other])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds_faster": sum(x > 1 for x in r),
            "rounds": len(r)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=20)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args()
    if args.out.exists() and not args.force:
        print(f"sora_sampler: error: {args.out} exists: pass --force to overwrite it")
        return 2
    torch.set_num_threads(args.threads)
    print("machine:", C.machine_line(), flush=True)
    probe_before = C.matmul_probe()
    print(f"matmul probe before: {probe_before:.0f} GFLOP/s", flush=True)

    dense = pz.load("sora-tiny").eval()
    pm = pz.decompose(dense)
    cut = pm.prune(half_flops_plan(pm)).eval()
    kept = pz.decompose(cut).cost().flops / pm.cost().flops
    labels = torch.arange(args.videos) % 10
    models = {"dense": dense, "cut": cut}
    sides: dict[str, Callable[[], Any]] = {}
    diffs, compile_s = {}, {}
    for name, m in models.items():
        sampler = FastSampler(m, args.videos, mode="compile")
        t = time.perf_counter()
        fast = sampler(labels, steps=args.steps, seed=0)  # the warm-up call compiles
        compile_s[name] = time.perf_counter() - t
        d = (fast - m.sample(labels, steps=args.steps, seed=0)).abs()
        diffs[name] = {"max": float(d.max()), "mean": float(d.mean()),
                       "share_over_1_255": float((d > 1 / 255).float().mean())}
        sides[f"{name}_eager"] = lambda m=m: m.sample(labels, steps=args.steps, seed=0)
        sides[f"{name}_compile"] = lambda s=sampler: s(labels, steps=args.steps, seed=0)
    print(f"cut keeps {kept:.1%} of the FLOPs; compile warm-up {compile_s}; |compile - eager| {diffs}", flush=True)
    times = rounds_of(sides, args.rounds)
    probe_after = C.matmul_probe()
    print(f"matmul probe after: {probe_after:.0f} GFLOP/s", flush=True)

    ratios = {"dense compile vs eager": paired(times, "dense_eager", "dense_compile"),
              "cut compile vs eager": paired(times, "cut_eager", "cut_compile"),
              "cut vs dense, eager": paired(times, "dense_eager", "cut_eager"),
              "cut vs dense, compile": paired(times, "dense_compile", "cut_compile"),
              "cut compile vs dense eager": paired(times, "dense_eager", "cut_compile")}
    rows = [[k, f"{statistics.median(v):.2f}"] for k, v in times.items()]
    C.print_table(["side", f"{args.videos} videos x {args.steps} steps, s (median of {args.rounds})"], rows)
    C.print_table(["paired ratio", "median", "range", "rounds > 1"],
                  [[k, f"{v['median']:.2f}x", f"{v['min']:.2f}-{v['max']:.2f}", f"{v['rounds_faster']}/{v['rounds']}"]
                   for k, v in ratios.items()])
    data = {"machine": C.machine_line(), "command": "python benchmarks/sora_sampler.py " + " ".join(sys.argv[1:]),
            "threads": args.threads, "videos": args.videos, "steps": args.steps, "rounds": args.rounds,
            "flops_kept": kept, "compile_warmup_s": compile_s, "abs_diff_compile_vs_eager": diffs,
            "matmul_probe_gflops": {"before": probe_before, "after": probe_after}, "seconds": times,
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "paired": ratios}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
