"""Distributed exact ablation: the former split (whole groups by particle count) against the split by estimated
work (`particlize.parallel.work_shares`), on 2 gloo processes x 1 thread, in the same run.

    .venv/bin/python benchmarks/parallel_analysis.py [--model out/minilm-vader] [--limit 8] [--rounds 1] [--out PATH] [--force]

The data are those of ``particlize analyze MODEL --task vader-sentiment --scorer ablation --limit N`` (the CLI's
own loading). Every rank scores its share of all particles with ``pz.analyze(..., only=share)`` and is timed
alone (its busy time); a barrier then closes the side (its wall time). Idle = wall - busy, summed over ranks.
Sides alternate per round (former, balanced; then balanced, former). The two gathered tables are compared
with each other (the tests compare the distributed table with the single-process one). Also printed: the
estimated work of each rank's share under both splits, to set beside the measured busy times.

Writes ``benchmarks/results/parallel-analysis.json`` (``--out``; kept unless ``--force``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common as C
import pandas as pd
import torch.distributed as dist

import particlize as pz
from particlize.analysis.work import ablation_costs, share_costs
from particlize.cli.analyze_cmd import _load  # the CLI's loading: the same model and batches as `analyze --limit`
from particlize.parallel import launch, work_shares


def former_shares(pm, names: list[str], world: int) -> list[dict[str, list[int]]]:
    """The split `particlize.parallel.analyze` used before: whole groups by particle count, largest first."""
    load, out = [0] * world, [[] for _ in range(world)]
    for n in sorted(names, key=lambda n: -pm[n].size):
        k = min(range(world), key=lambda r: (load[r], r))
        out[k].append(n)
        load[k] += pm[n].size
    return [{n: list(range(pm[n].size)) for n in s} for s in out]


def rank_run(model: str, limit: int, rounds: int) -> dict:
    setting = (model, "vader-sentiment", None, "text", "label", "val", limit, 32, 64, False)  # the CLI's defaults
    m, _, batches = _load(*setting)
    pm = pz.decompose(m)
    world, rank = dist.get_world_size(), dist.get_rank()
    names = [g.name for g in pm.groups]
    splits = {"former": former_shares(pm, names, world), "balanced": work_shares(pm, names, world)}
    costs = ablation_costs(pm, names)
    out: dict = {"estimated": {k: share_costs(costs, s) for k, s in splits.items()}, "rounds": []}
    tables = {}
    for r in range(rounds):
        got = {}
        for side in (("former", "balanced") if r % 2 == 0 else ("balanced", "former")):
            share = splits[side][rank]
            dist.barrier()
            t0 = time.perf_counter()
            df = pz.analyze(pm, batches, "ablation", groups=list(share), only=share, table=False, progress=False)
            busy = time.perf_counter() - t0
            dist.barrier()
            got[side] = {"busy_s": busy, "wall_s": time.perf_counter() - t0}
            keep = pd.MultiIndex.from_tuples([(n, i) for n, idx in share.items() for i in idx])
            tables[side] = df[pd.MultiIndex.from_frame(df[["group", "index"]]).isin(keep)]
        out["rounds"].append(got)
    frames: list = [None] * world
    dist.all_gather_object(frames, tables)
    if rank == 0:
        whole = {k: pd.concat([f[k] for f in frames]).sort_values(["group", "index"]).reset_index(drop=True)
                 for k in tables}
        out["rows"] = len(whole["former"])
        out["max_score_diff"] = float((whole["former"].score - whole["balanced"].score).abs().max())
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(C.ROOT / "out/minilm-vader"), help="a saved classifier (make one with the demo; in another checkout: its path)")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--out", type=Path, default=C.ROOT / "benchmarks/results/parallel-analysis.json")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    a = ap.parse_args()
    if a.out.exists() and not a.force:
        raise SystemExit(f"{a.out} exists; pass --force to replace it")
    C.start()
    probe = [C.matmul_probe()]
    ranks = launch(rank_run, 2, a.model, a.limit, a.rounds, timeout=3600)
    probe.append(C.matmul_probe())
    print(f"matmul probe {probe[0]:.0f} -> {probe[1]:.0f} GFLOP/s; {ranks[0]['rows']} particles; "
          f"max |score former - balanced| {ranks[0]['max_score_diff']:.1e}")
    summary = {}
    for side in ("former", "balanced"):
        est = [r["estimated"][side][k] for k, r in enumerate(ranks)]
        walls, idles = [], []
        for i in range(a.rounds):
            rows = [r["rounds"][i][side] for r in ranks]
            wall = max(x["wall_s"] for x in rows)
            walls.append(wall)
            idles.append(sum(wall - x["busy_s"] for x in rows) / (wall * len(rows)))
            busy = ", ".join(f"{x['busy_s']:.1f}" for x in rows)
            print(f"{side:8s} round {i}: busy {busy} s, wall {wall:.1f} s, "
                  f"idle {idles[-1]:.0%} of rank-time; estimated work {', '.join(f'{e / sum(est):.0%}' for e in est)}")
        summary[side] = {"wall_s": walls, "idle_fraction": idles, "estimated_share": [e / sum(est) for e in est]}
    ratio = [f / b for f, b in zip(summary["former"]["wall_s"], summary["balanced"]["wall_s"])]
    print(f"wall former / balanced: {', '.join(f'{x:.2f}' for x in ratio)}")
    result = {"machine": C.machine_line(), "model": a.model, "limit": a.limit, "rounds": a.rounds,
              "probe_gflops": probe, "summary": summary, "wall_ratio_former_over_balanced": ratio, "ranks": ranks}
    C.write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
