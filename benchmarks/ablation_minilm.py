"""Exact zero-ablation of every MiniLM particle: particlize's engine vs the naive loop (issue 4's headline).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ablation_minilm.py [--examples 512] [--batch-size 64]
        [--neurons-per-layer 32] [--rounds 2] [--max-rows N] [--no-sort]

Model: the MiniLM sentiment classifier (``out/minilm-vader``, ``particlize train minilm --task
vader-sentiment --out out/minilm-vader``); data: the first ``--examples`` test sentences in batches of
``--batch-size``, sorted by token length (the naive loop's best case: least padding; ``--no-sort`` keeps
the split order). Both sides get the very same batches. Metric: loss; mode: zero.

- naive: ``ablation_effects(fast=False)``, one full forward of the model per particle (what
  TransformerLens' run_with_hooks loop and Captum's FeatureAblation do);
- particlize: ``ablation_effects()`` with its defaults (start at the reader, per-row masks, padding cut,
  the Q/K/V after the next norm updated in closed form, rows per forward for this device).

All 72 heads run on both sides. FFN neurons: a seeded random sample per layer runs on both sides (the
per-particle cost is the same for every neuron of a layer: the same work on the same rows), timed per
layer; the full 9,216-neuron times are the per-layer costs × 1,536 plus each side's fixed cost, which is
measured on its own (a call with no particle: particlize's clean forwards and length check). Rounds are
interleaved (which side runs first alternates); medians and paired ratios; a matmul probe before and
after (../shared/BENCHMARKING.md). Every effect computed on both sides is compared (bound: 1e-4).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import _common as C
import torch
from analysis_minilm import make_batches, max_diff, tokens


def log(*a: Any) -> None:
    print(*a, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(C.ROOT / "out" / "minilm-vader"))
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--neurons-per-layer", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=None, help="particlize rows per forward (default: the engine's)")
    ap.add_argument("--no-sort", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from particlize.analysis.ablation import ablation_effects, default_rows
    from particlize.tasks import get_task

    C.setup_threads()
    log("ablation_minilm:", C.machine_line())
    log("command:", " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]))
    model, tok, pm, heads, neurons = C.classifier_and_particles(args.model)
    texts, labels = get_task("vader-sentiment").split("test")
    texts, labels = texts[:args.examples], labels[:args.examples]
    batches = make_batches(tok, texts, labels, args.batch_size, not args.no_sort)
    pad, real = tokens(batches)
    rows = args.max_rows or default_rows(model)
    log(f"{len(texts)} sentences, {len(batches)} batches of {args.batch_size} "
        f"({'split order' if args.no_sort else 'sorted by length'}): {pad} padded tokens for {real} real "
        f"({pad / real:.2f}x); particlize rows per forward {rows}")

    def timed(fast: bool, groups: list[str], only: dict[str, list[int]] | None = None) -> tuple[float, dict]:
        t = time.perf_counter()
        eff = ablation_effects(pm, batches, groups=groups, only=only, fast=fast, max_rows=args.max_rows)
        return time.perf_counter() - t, eff

    gen = torch.Generator().manual_seed(args.seed)
    sample = {g: sorted(torch.randperm(pm[g].size, generator=gen)[:args.neurons_per_layer].tolist()) for g in neurons}
    timed(True, heads[:1], {heads[0]: [0]})  # warm-up
    timed(False, heads[:1], {heads[0]: [0]})
    probe0 = C.matmul_probe()
    log(f"matmul probe before: {probe0:.0f} GFLOP/s")

    T: dict[tuple[bool, str], list[float]] = {}  # (fast, part) -> seconds per round
    worst = 0.0
    for r in range(args.rounds):
        for fast in ([True, False] if r % 2 == 0 else [False, True]):
            side = "particlize" if fast else "naive"
            t0, _ = timed(fast, neurons[:1], {neurons[0]: []})
            T.setdefault((fast, "fixed"), []).append(t0)
            t, eff_h = timed(fast, heads)
            T.setdefault((fast, "heads"), []).append(t)
            msg = [f"fixed {t0:.1f} s", f"72 heads {t:.1f} s"]
            effs = {"heads": eff_h}
            for i, g in enumerate(neurons):
                t, effs[g] = timed(fast, [g], {g: sample[g]})
                T.setdefault((fast, g), []).append(t)
                msg.append(f"L{i} {t:.1f} s")
            log(f"round {r + 1} {side}: " + ", ".join(msg))
            if fast:
                mine = effs
            else:
                other = effs
        worst = max(worst, max(max_diff(mine[k], other[k])[1] for k in mine))
    probe1 = C.matmul_probe()
    log(f"matmul probe after: {probe1:.0f} GFLOP/s")
    log(f"identical scores: max |Δ per-example effect| over every particle run on both sides = {worst:.2e} "
        f"({'PASS' if worst <= 1e-4 else 'FAIL'} at 1e-4)")

    med = {k: statistics.median(v) for k, v in T.items()}
    s = args.neurons_per_layer
    full: dict[bool, float] = {}
    table = []
    for fast in (False, True):
        fixed = med[(fast, "fixed")]
        total = med[(fast, "heads")]  # its fixed cost included: paid once by a sweep of everything
        for g in neurons:
            total += (med[(fast, g)] - fixed) / s * pm[g].size
        full[fast] = total
    for i, g in enumerate(neurons):
        n_per = (med[(False, g)] - med[(False, "fixed")]) / s
        f_per = (med[(True, g)] - med[(True, "fixed")]) / s
        table.append([f"layer {i} neurons", f"{n_per:.3f}", f"{f_per:.3f}", f"{n_per / f_per:.2f}×"])
    table.append(["72 heads (all, measured)", f"{med[(False, 'heads')]:.1f} s", f"{med[(True, 'heads')]:.1f} s",
                  f"{med[(False, 'heads')] / med[(True, 'heads')]:.2f}×"])
    table.append(["fixed cost per call", f"{med[(False, 'fixed')]:.1f} s", f"{med[(True, 'fixed')]:.1f} s", ""])
    table.append(["**all 9,288 particles** (heads measured, neurons per layer × 1,536)",
                  f"{full[False] / 3600:.2f} h", f"{full[True] / 3600:.2f} h", f"**{full[False] / full[True]:.2f}×**"])
    C.print_table(["what (s per particle unless said)", "naive loop", "particlize", "naive / particlize"], table)
    paired = []
    for r in range(args.rounds):
        tot = {}
        for fast in (False, True):
            fixed = T[(fast, "fixed")][r]
            tot[fast] = T[(fast, "heads")][r] + sum((T[(fast, g)][r] - fixed) / s * pm[g].size for g in neurons)
        paired.append(tot[False] / tot[True])
    log(f"paired ratio per round (all 9,288): {', '.join(f'{x:.2f}×' for x in paired)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
