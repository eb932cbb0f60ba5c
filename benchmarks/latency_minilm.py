"""CPU latency of all-MiniLM-L6-v2 pruned to 50% of the heads and 50% of the FFN neurons of every layer
(particlize, and Torch-Pruning 1.6.1 for reference) vs the dense model.

    .venv/bin/python benchmarks/latency_minilm.py [--rounds 20] [--reps 3] [--no-tp]

Batch 32 x 64 tokens (fixed shape, attention_mask all ones), fp32, 2 threads, inference_mode. After a
warm-up the sides run interleaved (the order rotates every round); each side's time in a round is the
median of ``--reps`` forwards. Reported: median ms per side, the paired per-round speedup dense/pruned
(median, min, max, share of rounds where the pruned model was faster), and the encoder FLOPs reduction
from ``pm.cost(remove, seq_len=64)`` to compare the speedup with. A matmul throughput probe runs before
and after.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import _common as C
import torch

B, T = 32, 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20, at least 15 advised)")
    ap.add_argument("--reps", type=int, default=3, help="forwards per side per round (median taken)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed forwards per side before the rounds")
    ap.add_argument("--no-tp", action="store_true", help="leave the Torch-Pruning model out of the loop")
    args = ap.parse_args()

    import particlize as pz

    C.setup_threads()
    print("latency_minilm:", C.machine_line(), flush=True)
    dense = C.load_minilm()
    pm = pz.decompose(dense, seq_len=T)
    remove = C.pz_plan(pm)
    pruned = pm.prune(remove).eval()
    full, cut = pm.cost(seq_len=T), pm.cost(remove, seq_len=T)
    sides: dict[str, torch.nn.Module] = {"dense": dense, "particlize 50%": pruned}
    if not args.no_tp:
        tpm = copy.deepcopy(dense)
        C.tp_pruner(tpm).step()
        C.tp_fix_attributes(tpm)
        sides["torch-pruning 50%"] = tpm.eval()

    x = C.bert_inputs(B, T)
    # checks: shapes, finiteness, particlize-pruned == masked dense
    for name, m in sides.items():
        if name != "dense":
            bad = C.check_shapes(m, heads=6, head_dim=32, ffn=768, hidden=384)
            if bad:
                print(f"WARNING {name}: {bad[:3]}")
    y_small = C.model_output(pruned, x)
    with pm.ablate(remove) as masked:
        y_mask = C.model_output(masked, x)
    diff = float((y_small - y_mask).abs().max())
    finite = all(bool(torch.isfinite(C.model_output(m, x)).all()) for m in sides.values())
    print(f"check: particlize-pruned vs masked dense max abs diff {diff:.2e}; all outputs finite: {finite}")

    def forward(m):
        with torch.inference_mode():
            m(**x)

    probe0 = C.matmul_probe()
    print(f"matmul probe before: {probe0:.0f} GFLOP/s", flush=True)
    for m in sides.values():
        for _ in range(args.warmup):
            forward(m)
    names = list(sides)
    times: dict[str, list[float]] = {n: [] for n in names}
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            ts = []
            for _ in range(args.reps):
                t = time.perf_counter()
                forward(sides[n])
                ts.append(time.perf_counter() - t)
            times[n].append(statistics.median(ts) * 1e3)
    wall = time.perf_counter() - t_start
    probe1 = C.matmul_probe()
    print(f"matmul probe after: {probe1:.0f} GFLOP/s (before {probe0:.0f}); timed loop {wall:.0f} s", flush=True)

    rows = []
    for n in names:
        p = C.n_params(sides[n])
        ms = times[n]
        row = [n, f"{statistics.median(ms):.1f}", f"{min(ms):.1f}–{max(ms):.1f}", f"{p / 1e6:.2f}M"]
        if n == "dense":
            row += ["1.00", "—", "—"]
        else:
            sp = [d / s for d, s in zip(times["dense"], ms)]
            faster = sum(s > 1 for s in sp)
            row += [f"{cut.flops / full.flops:.3f}" if n.startswith("particlize") else f"{cut.flops / full.flops:.3f} (same shapes)",
                    f"{statistics.median(sp):.2f}× ({min(sp):.2f}–{max(sp):.2f})", f"{faster}/{len(sp)}"]
        rows.append(row)
    print()
    print(f"all-MiniLM-L6-v2, batch {B} x seq {T}, fp32, {torch.get_num_threads()} threads, inference_mode; "
          f"{args.rounds} interleaved rounds x {args.reps} reps (median per round), warm-up {args.warmup}")
    C.print_table(["model", "median ms / batch", "min–max ms", "params", "encoder FLOPs vs dense (seq 64)",
                   "paired speedup dense/pruned: median (min–max)", "rounds pruned faster"], rows)
    print(f"encoder FLOPs per token at seq 64: dense {full.flops / 1e6:.1f} M, pruned {cut.flops / 1e6:.1f} M "
          f"(×{full.flops / cut.flops:.2f} fewer; embeddings and pooler not counted); "
          f"params {full.params / 1e6:.2f}M → {cut.params / 1e6:.2f}M")
    drift = abs(probe1 - probe0) / max(probe0, 1e-9)
    print(f"matmul probe: {probe0:.0f} → {probe1:.0f} GFLOP/s ({'moved ' + format(drift, '.0%') if drift > 0.25 else 'stable within 25%'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
