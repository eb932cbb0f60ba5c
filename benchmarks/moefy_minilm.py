"""MoEfication vs static pruning at the same FFN FLOPs: MiniLM sentiment classifier (and the Sora-style DiT).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/moefy_minilm.py --model out/minilm-vader \\
        --shares 0.5 0.25 0.125 --experts 32 --seeds 0 1 2 --recover-epochs 0.1 [--dit] [--json out.json]

For each share of FFN neurons active per token (``active = share * experts``), side by side in one run:
- dense: the classifier as trained;
- moefy: `pz.moefy` (balanced k-means experts, routers regressing expert norms), no recovery;
- moefy+rec: then ``--recover-epochs`` of distillation from the dense model, routers refitted;
- static: every FFN pruned to the same share of its neurons (fisher scores, per layer), with the same recovery
  budget (``--recover-epochs``; 0 leaves it unrecovered).
Seeds change the calibration sample, the clustering, the routers and the recovery's data order. Reported: test
accuracy per side and seed (mean over seeds), FLOPs per token relative to dense (routers included), and CPU
latency of batch 32 x 64 on 2 threads (fixed shape, inference_mode, sides interleaved, medians of paired
rounds), plus one FFN alone (dense vs grouped experts on the same 2048 tokens) to show where the time goes:
the grouped path gathers tokens per expert and scatter-adds back, ``experts`` small matmuls instead of one.
``--dit``: the shipped sora-tiny at 25% active: ε-MSE and class-conditional sample accuracy (test split).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, setup_threads  # noqa: E402

import torch  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.allocate import named_scorer  # noqa: E402
from particlize.recover import RecoveryConfig, recover  # noqa: E402
from particlize.sources import load_model, load_tokenizer  # noqa: E402
from particlize.surgery import ExpertFFN  # noqa: E402
from particlize.tasks import get_task  # noqa: E402

B, SEQ = 32, 64


def static_prune(dense, calib, share: float):
    """Every FFN cut to ``share`` of its neurons (the highest fisher scores of each layer)."""
    pm = pz.decompose(dense, seq_len=SEQ)
    scores = named_scorer("fisher")(pm, calib, {"neuron"})
    remove = {}
    for g in pm.select("neuron"):
        keep = max(1, round(share * g.size))
        remove[g.name] = scores[g.name].argsort(descending=True)[keep:].tolist()
    return pm.prune(remove).eval()


def latency(sides: dict, inputs: dict, rounds: int, reps: int) -> dict[str, float]:
    """Median ms per forward of each side, sides interleaved (the order rotates every round)."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    names = list(sides)
    with torch.inference_mode():
        for m in sides.values():
            m(**inputs)
        for r in range(rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:
                run = []
                for _ in range(reps):
                    t = time.perf_counter()
                    sides[k](**inputs)
                    run.append(time.perf_counter() - t)
                times[k].append(statistics.median(run))
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def ffn_alone(moe, tokens: int = B * SEQ, reps: int = 10) -> tuple[float, float]:
    """ms of the first FFN on ``tokens`` random tokens: all neurons (one matmul pair) vs its grouped experts."""
    ffn = next(m for m in moe.modules() if isinstance(m, ExpertFFN))
    x = torch.randn(tokens, ffn.linear("up").in_features)

    def clock(fn) -> float:
        with torch.inference_mode():
            fn(x)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                fn(x)
                ts.append(time.perf_counter() - t)
        return 1000 * statistics.median(ts)

    return clock(lambda v: ffn.linear("down")(ffn.hidden(v))), clock(ffn.grouped)


def flops(model) -> float:
    return pz.decompose(model, seq_len=SEQ).cost().flops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/minilm-vader")
    ap.add_argument("--task", default="vader-sentiment")
    ap.add_argument("--data", type=Path, default=None, help="CSV for --task text-csv")
    ap.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--recover-epochs", type=float, default=0.1)
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--router-hidden", type=int, default=64)
    ap.add_argument("--limit", type=int, default=None, help="first N train/val/test examples only (quick checks)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dit", action="store_true", help="also the shipped sora-tiny DiT at 25%% active")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    setup_threads()
    print(machine_line(), flush=True)
    task = get_task(args.task, path=args.data) if args.data else get_task(args.task)
    dense, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    lim = args.limit

    def acc(m) -> float:
        return task.evaluate(m, "test", tokenizer=tok, limit=lim)["accuracy"]

    base = acc(dense)
    f_dense = flops(dense)
    inputs = task.latency_inputs(tok, batch=B, seq=SEQ)
    print(f"dense test accuracy {base:.4f}; {args.experts} experts per FFN; recovery {args.recover_epochs} epochs", flush=True)
    rows, lat_rows = [], []
    head = f"{'share':>6} {'active':>6} {'side':<10} {'seed':>4} {'FLOPs':>6} {'test acc':>8} {'secs':>6}"
    print(head, flush=True)
    for share in args.shares:
        active = max(1, round(share * args.experts))
        kept: dict[str, torch.nn.Module] = {}
        for seed in args.seeds:
            calib = task.calibration(dense, tok, batch_size=32, max_length=SEQ, limit=args.calib, seed=seed)
            t = time.time()
            moe = pz.moefy(dense, calib, experts=args.experts, active=active, router_hidden=args.router_hidden, seed=seed)
            sides = {"moefy": (moe, time.time() - t)}
            if args.recover_epochs > 0:
                t = time.time()
                rec = pz.moefy(dense, calib, experts=args.experts, active=active, router_hidden=args.router_hidden,
                               seed=seed, task=task, recover_epochs=args.recover_epochs, tokenizer=tok, limit=lim)
                sides["moefy+rec"] = (rec, time.time() - t)
            t = time.time()
            static = static_prune(dense, calib, share)
            if args.recover_epochs > 0:
                recover(static, dense, task, RecoveryConfig(epochs=args.recover_epochs), tokenizer=tok, max_length=SEQ,
                        limit=lim, seed=seed)
            sides["static"] = (static, time.time() - t)
            for name, (m, secs) in sides.items():
                row = {"share": share, "active": active, "side": name, "seed": seed, "flops": flops(m) / f_dense,
                       "test_acc": acc(m), "secs": secs}
                rows.append(row)
                print(f"{share:>6} {active:>6} {name:<10} {seed:>4} {row['flops']:>6.3f} {row['test_acc']:>8.4f} "
                      f"{secs:>6.1f}", flush=True)
                if seed == args.seeds[0]:
                    kept[name] = m
        ms = latency({"dense": dense, **kept}, inputs, args.rounds, args.reps)
        ffn_dense, ffn_grouped = ffn_alone(kept["moefy"])
        lat_rows.append({"share": share, "active": active, **{f"ms_{k}": v for k, v in ms.items()},
                         "ffn_ms_dense": ffn_dense, "ffn_ms_grouped": ffn_grouped})
        print(f"latency share {share}: " + ", ".join(f"{k} {v:.1f} ms ({ms['dense'] / v:.2f}x)" for k, v in ms.items())
              + f"; first FFN alone: dense {ffn_dense:.2f} ms, grouped {ffn_grouped:.2f} ms "
              f"(FLOPs say {1 / share:.1f}x)", flush=True)
    print("\nmean over seeds (test accuracy, relative to dense):")
    for share in args.shares:
        for side in ("moefy", "moefy+rec", "static"):
            accs = [r["test_acc"] for r in rows if r["share"] == share and r["side"] == side]
            if accs:
                m = statistics.mean(accs)
                print(f"  share {share:<6} {side:<10} {m:.4f} ({m / base:.3f} of dense)")
    dit = run_dit(args.seeds[0], lim) if args.dit else None
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(), "dense_acc": base, "rows": rows,
                                         "latency": lat_rows, "dit": dit}, indent=1))
    return 0


def run_dit(seed: int, limit: int | None) -> dict:
    """sora-tiny at 25% of its MLP neurons active per token: ε-MSE and sample accuracy, dense vs moefied."""
    task = get_task("moving-digits")
    dense = pz.load("sora-tiny").eval()
    hidden = pz.decompose(dense).select("neuron")[0].size
    experts = 16 if hidden % 16 == 0 else 8
    calib = task.calibration(dense, batch_size=16, limit=128, seed=seed)
    moe = pz.moefy(dense, calib, experts=experts, active=experts // 4, seed=seed)
    out = {}
    for name, m in (("dense", dense), ("moefy 25%", moe)):
        q = task.quality(m, "test", limit=limit)
        out[name] = {k: v for k, v in q.items() if isinstance(v, (int, float))}
        print(f"DiT {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in out[name].items() if isinstance(v, float)),
              flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
