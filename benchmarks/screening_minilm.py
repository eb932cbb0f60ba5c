"""Which k particles matter most, exactly? Screens compared on all 9,288 particles of the MiniLM classifier.

For the first ``--examples`` test sentences (sorted by length, batches of ``--batch-size``): the full exact
zero-ablation sweep of every head and FFN neuron (particlize's fast engine; the ground truth), then for each
screen (``taylor``: first order; ``taylor2``: plus the Gauss-Newton curvature; ``fisher``): its time, its
Spearman correlation with the exact effects per kind, the neuron shortlist it would need to contain the exact
top-k (the worst screen rank among the exact top-k neurons), and ``pz.top_particles(k, screen=...)`` itself
(every head ablated exactly; the neurons by the adaptive shortlist, ``--shortlists auto``, or a fixed one,
e.g. ``--shortlists auto 200``): time, particles ablated exactly, speedup over the full sweep, overlap with the
exact top-k, same set, same order. Screens: ``taylor-norm`` (the default of ``top_particles``: first order with
the next LayerNorm exact), ``taylor`` (first order), ``taylor2`` (plus the Gauss-Newton curvature), ``fisher``.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/screening_minilm.py --examples 32 --threads 1 \
        --sweep-csv bench-out/sweep32.csv

``--sweep-csv`` keeps the full sweep (and its time): a second run reads it instead of sweeping again. When the
sweep runs in the same process, each ``top_particles`` configuration is timed before and after it and the mean
of the two is compared with the sweep (the machine's speed drifts over the sweep's minutes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _common as C  # noqa: E402
from analysis_minilm import make_batches  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(C.ROOT / "out" / "minilm-vader"))
    ap.add_argument("--examples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--screens", nargs="+", default=["taylor-norm", "taylor"])
    ap.add_argument("--shortlists", nargs="+", default=["auto", "200"], help="'auto' (adaptive) and/or fixed neuron counts")
    ap.add_argument("--threads", type=int, default=C.THREADS)
    ap.add_argument("--sweep-csv", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import particlize as pz
    from particlize.tasks import get_task
    from transformers import AutoTokenizer

    print(C.machine_line(), f"| matmul probe {C.matmul_probe():.0f} GFLOP/s", flush=True)
    model = pz.load(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    texts, labels = get_task("vader-sentiment").split("test")
    batches = make_batches(tok, list(texts[: args.examples]), labels[: args.examples], args.batch_size, True)
    pm = pz.decompose(model)
    groups = [g.name for g in pm.groups if g.kind in ("head", "neuron")]
    kind = {g.name: g.kind for g in pm.groups}
    configs = [(screen, sl) for screen in args.screens for sl in args.shortlists]

    def run_top(screen: str, sl: str):
        t = time.perf_counter()
        got = pz.top_particles(pm, batches, k=args.k, screen=screen, groups=groups, shortlist=None if sl == "auto" else int(sl))
        return time.perf_counter() - t, got

    # timed before and after the sweep when the sweep runs here: machine drift over its minutes hits both sides
    before = {} if args.sweep_csv and args.sweep_csv.is_file() else {c: run_top(*c)[0] for c in configs}
    if args.sweep_csv and args.sweep_csv.is_file():
        exact = pd.read_csv(args.sweep_csv)
        t_full = float(exact.seconds_full_sweep.iloc[0])
        print(f"full exact sweep read from {args.sweep_csv} ({t_full:.1f} s when it ran)")
    else:
        t = time.perf_counter()
        exact = pz.analyze(pm, batches, "ablation", groups=groups, table=False)
        t_full = time.perf_counter() - t
        exact = exact[["group", "index", "score"]].assign(seconds_full_sweep=t_full)
        if args.sweep_csv:
            args.sweep_csv.parent.mkdir(parents=True, exist_ok=True)
            exact.to_csv(args.sweep_csv, index=False)
        print(f"full exact sweep of {len(exact)} particles: {t_full:.1f} s", flush=True)
    exact["kind"] = exact.group.map(kind)
    top = exact.nlargest(args.k, "score")
    top_keys = list(zip(top.group, top["index"]))
    print(f"exact top-{args.k}: {top.kind.value_counts().to_dict()}; k-th effect {top.score.iloc[-1]:+.5f}")
    rows = [[f"full exact sweep ({len(exact)})", f"{t_full:.1f}", str(len(exact)), "1.0×", "", "", "", f"{args.k}/{args.k}", "yes", "yes"]]
    for screen in args.screens:
        t = time.perf_counter()
        cheap = pz.analyze(pm, batches, screen, groups=groups, table=False)
        t_screen = time.perf_counter() - t
        both = exact.merge(cheap[["group", "index", "score"]].rename(columns={"score": "cheap"}), on=["group", "index"])
        rho = {k: both[both.kind == k].score.corr(both[both.kind == k].cheap, method="spearman") for k in ("head", "neuron")}
        neu = both[both.kind == "neuron"].copy()
        neu["rank"] = neu.cheap.rank(ascending=False, method="first").astype(int)
        nrank = dict(zip(zip(neu.group, neu["index"]), neu["rank"]))
        need = max((nrank[k] for k in top_keys if k in nrank), default=0)
        for sl in args.shortlists:
            t_after, got = run_top(screen, sl)
            t_top = (t_after + before[(screen, sl)]) / 2 if (screen, sl) in before else t_after
            if (screen, sl) in before:
                print(f"top_particles({screen}, {sl}): {before[(screen, sl)]:.1f} s before the sweep, {t_after:.1f} s after")
            keys = list(zip(got.group, got["index"]))
            overlap = len(set(keys) & set(top_keys))
            missed = [f"{g.replace('encoder.encoder.layer.', 'L').split('.')[0]}[{i}] (rank {nrank.get((g, i), '-')})"
                      for g, i in top_keys if (g, i) not in set(keys)]
            rows.append([f"top_particles(screen={screen!r}, shortlist={sl})", f"{t_top:.1f}", str(got.attrs["verified"]),
                         f"{t_full / t_top:.1f}×", f"{t_screen:.2f}", f"{rho['head']:.3f} / {rho['neuron']:.3f}", str(need),
                         f"{overlap}/{args.k}", "yes" if set(keys) == set(top_keys) else "no", "yes" if keys == top_keys else "no"])
            print(f"{screen}, shortlist {sl}: screen {t_screen:.2f} s, Spearman heads {rho['head']:.3f} neurons "
                  f"{rho['neuron']:.3f}, shortlist needed {need}, top_particles {t_top:.1f} s ({got.attrs['verified']} "
                  f"particles ablated exactly), overlap {overlap}/{args.k}" + (f", missed {', '.join(missed)}" if missed else ""),
                  flush=True)
    print()
    C.print_table(["", "s", "ablated exactly", "speedup vs full sweep", "screen s", "Spearman heads / neurons",
                         "neuron shortlist needed", f"top-{args.k} overlap", "same set", "same order"], rows)
    print(f"matmul probe after: {C.matmul_probe():.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
