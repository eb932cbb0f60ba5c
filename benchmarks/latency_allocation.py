"""How fast per FLOP is each allocation? Prune-only (no recovery) latency of the MiniLM classifier cut to a
FLOPs budget by several allocation strategies, side by side with Torch-Pruning's uniform per-layer cut.

For each budget every strategy removes particles once (fisher scores on 256 calibration sentences for
particlize; GroupTaylor for Torch-Pruning) to keep that fraction of the encoder FLOPs (seq 64, embeddings
excluded). Then all models are timed interleaved (batch 32 x 64 tokens, fp32, ``torch.inference_mode``),
``--rounds`` rounds, and the paired speedup dense/pruned is compared with the FLOPs reduction:
**efficiency = speedup / FLOPs reduction** (the issue asks >= 0.95). Test accuracy before recovery is
printed too, to see what each allocation costs in quality.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/latency_allocation.py --budgets 0.5 0.25 0.125

``--widths FILE.json ...`` instead times the architectures that ``compress_minilm.py --json`` recorded (heads and
FFN neurons per layer; latency depends on nothing else), rebuilt from the dense model, in one quiet
interleaved run: the accuracy grid can then run in parallel processes without disturbing the timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import by_widths, machine_line, matmul_probe, setup_threads  # noqa: E402
from compress_minilm import encoder_flops, layer_widths, tp_prune  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.allocate import AllocationConfig, allocate, latency_prices, named_scorer  # noqa: E402
from particlize.measure import latency_inputs, measure_latency  # noqa: E402
from particlize.tasks import get_task  # noqa: E402

HN, HNB = ("heads", "neurons"), ("heads", "neurons", "blocks")
STRATEGIES: dict[str, dict] = {  # name: the AllocationConfig settings of the cut (fisher scores throughout)
    "pz-global-flops": dict(granularity=HN),
    "pz-global-latency": dict(granularity=HN, cost="latency"),
    "pz-global-flops-r16": dict(granularity=HN, round_to=16),
    "pz-global-flops-r32": dict(granularity=HN, round_to=32),
    "pz-global-flops-mw20": dict(granularity=HN, min_width=0.2),
    "pz-global-flops-mw15": dict(granularity=HN, min_width=0.15),
    "pz-uniform": dict(granularity=HN, allocation="uniform"),
    "pz-global-flops-blocks": dict(granularity=HNB),
    "pz-global-latency-blocks": dict(granularity=HNB, cost="latency"),
}


def time_widths(dense, x, files: list[Path], rounds: int) -> None:
    rows = [r for f in files for r in json.loads(f.read_text())]
    models = {"dense": dense}
    for r in rows:
        models[f"{r['variant']}@{r['budget']}/{r['seed']}"] = by_widths(dense, r["widths"])
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            times[k].append(measure_latency(m, x, warmup=1, reps=3))
    dense_ms = statistics.median(times["dense"])
    print(f"dense {dense_ms:.1f} ms (median of {rounds} interleaved rounds); matmul probe after {matmul_probe():.0f} GFLOP/s")
    print(f"{'budget':>6} {'variant':<18} {'FLOPs kept':>10} {'speedup (mean over seeds, paired median)':>42} {'efficiency':>10}")
    for (budget, variant) in dict.fromkeys((r["budget"], r["variant"]) for r in rows):
        part = [r for r in rows if r["budget"] == budget and r["variant"] == variant]
        sp = [statistics.median(d / t for d, t in zip(times["dense"], times[f"{variant}@{budget}/{r['seed']}"]))
              for r in part]
        kept = statistics.mean(r["flops_kept"] for r in part)
        print(f"{budget:>6} {variant:<18} {kept:>10.3f} {statistics.mean(sp):>14.2f}× (per seed "
              f"{', '.join(f'{v:.2f}' for v in sp)}) {statistics.mean(sp) * kept:>10.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/minilm-vader")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--strategies", nargs="+", default=[*STRATEGIES, "tp-taylor"], choices=[*STRATEGIES, "tp-taylor"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--widths", type=Path, nargs="+", default=None, help="time the architectures in these compress_minilm JSON files")
    args = ap.parse_args()
    setup_threads()
    from transformers import AutoTokenizer

    print(machine_line(), f"matmul probe {matmul_probe():.0f} GFLOP/s", sep="\n", flush=True)
    dense = pz.load(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    task = get_task("vader-sentiment")
    x = latency_inputs(task, tok, 32, 64)
    if args.widths:
        time_widths(dense, x, args.widths, args.rounds)
        return 0
    dense_flops = encoder_flops(dense)
    pm = pz.decompose(dense, seq_len=64)
    calib = task.calibration(dense, tok, batch_size=32, max_length=64, limit=256, seed=0)
    prices_cache: dict[frozenset, dict[str, float]] = {}
    models, rows = {"dense": dense}, []
    for budget in args.budgets:
        for s in args.strategies:
            if s == "tp-taylor":
                m, _ = tp_prune(copy.deepcopy(dense), task, tok, 1 - budget, "taylor", 256, 0)
            else:
                cfg = AllocationConfig(**STRATEGIES[s])
                kinds = cfg.kinds
                prices = None
                if cfg.cost == "latency":
                    key = frozenset(kinds)
                    if key not in prices_cache:
                        prices_cache[key] = latency_prices(dense, pm, x, cfg, kinds)
                        print(f"latency prices {sorted(kinds)}: "
                              + ", ".join(f"{k} {v:.4f} ms" for k, v in prices_cache[key].items()), flush=True)
                    prices = prices_cache[key]
                imp = named_scorer(cfg.scorer)(pm, calib, kinds)
                remove = allocate(pm, imp, pm.cost().flops * (1 - budget), cfg, 64, prices)
                m = pm.prune(remove).eval()
            acc = task.evaluate(m, "test", tokenizer=tok)["accuracy"]
            key = f"{s}@{budget}"
            models[key] = m
            rows.append({"strategy": s, "budget": budget, "flops_kept": encoder_flops(m) / dense_flops, "acc_before": acc,
                         "widths": (w := layer_widths(m)), "blocks": len(w)})
            print(json.dumps(rows[-1]), flush=True)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            times[k].append(measure_latency(m, x, warmup=1, reps=3))
    dense_ms = statistics.median(times["dense"])
    print(f"\nmatmul probe after: {matmul_probe():.0f} GFLOP/s; dense {dense_ms:.1f} ms (median of {args.rounds})")
    print(f"{'budget':>6} {'strategy':<26} {'FLOPs kept':>10} {'speedup':>8} {'range':>13} {'efficiency':>10} {'acc before':>10}")
    for r in rows:
        key = f"{r['strategy']}@{r['budget']}"
        ratios = [d / t for d, t in zip(times["dense"], times[key])]
        r["speedup"] = statistics.median(ratios)
        r["efficiency"] = r["speedup"] * r["flops_kept"]
        print(f"{r['budget']:>6} {r['strategy']:<26} {r['flops_kept']:>10.3f} {r['speedup']:>7.2f}× "
              f"{min(ratios):>5.2f}–{max(ratios):<5.2f}× {r['efficiency']:>10.2f} {r['acc_before']:>10.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
