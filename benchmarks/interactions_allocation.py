"""Does an interaction-aware cut keep more accuracy? MiniLM sentiment classifier, heads only, one shot.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/interactions_allocation.py [--cuts 0.5 0.25] [--seeds 0 1 2]
        [--calib 32] [--val 512] [--pairs hessian|ablation] [--recover 0.1]

For each seed (a different seeded calibration sample of ``--calib`` training sentences) both sides get the
same scores: the exact single-head effects on the loss (``importance_for(..., "ablation")``) and, for the
interaction-aware side, the pairwise interactions of all 72 heads (``--pairs``: the gate-Hessian estimate
by default, the exact engine with ``ablation``). Then ``--cuts`` of the head FLOPs are removed:

- independent: `allocate` (global: lowest |effect| per FLOP first);
- interaction-aware: `allocate` with ``AllocationConfig(interactions=True)`` (the greedy adds each
  candidate's interactions with the heads already taken).

Validation accuracy on the first ``--val`` sentences right after the cut and, with ``--recover E``, after E
epochs of the task's usual recovery (distillation from the dense model, seeded by the seed); mean ± std over
the seeds and the paired difference per seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import _common as C
import torch
from analysis_minilm import make_batches
from transformers import AutoTokenizer

import particlize as pz
from particlize.allocate import AllocationConfig, PairImportance, allocate
from particlize.analysis import importance_for
from particlize.recover import RecoveryConfig, recover
from particlize.tasks import get_task


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(C.ROOT / "out" / "minilm-vader"))
    ap.add_argument("--cuts", type=float, nargs="+", default=[0.5, 0.25], help="shares of the head FLOPs removed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--val", type=int, default=512)
    ap.add_argument("--pairs", default="hessian", choices=["hessian", "ablation"])
    ap.add_argument("--recover", type=float, default=0.0,
                    help="also recover each cut this many epochs (distillation, the task's defaults) and evaluate again")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--block", type=int, default=2, help="Hessian rows per HVP pass (memory)")
    ap.add_argument("--out", default=str(C.ROOT / "benchmarks" / "results" / "interactions-allocation.json"))
    args = ap.parse_args()

    C.start()
    torch.set_num_threads(args.threads)
    model = pz.load(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    task = get_task("vader-sentiment")
    pm = pz.decompose(model, seq_len=64)
    heads = [g.name for g in pm.groups if g.kind == "head"]
    head_flops = pm.table(seq_len=64).query("kind == 'head'").flops.sum()
    dense = task.evaluate(model, "val", tokenizer=tok, limit=args.val)["accuracy"]
    print(f"dense val accuracy {dense:.4f} on {args.val} sentences; calibration {args.calib} train sentences per seed; "
          f"pairs: {args.pairs}; recovery {args.recover or 'none'}", flush=True)
    train_x, train_y = task.split("train")
    rows = []
    for seed in args.seeds:
        # a seeded random sample of the training split, drawn here as in the first runs of this benchmark
        pick = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))[:args.calib].tolist()
        calib = make_batches(tok, [train_x[i] for i in pick], train_y[torch.tensor(pick)], args.calib, False)
        t = time.perf_counter()
        imp = importance_for(pm, calib, "ablation", {"head"})
        t1 = time.perf_counter()
        pairs = pz.interactions(pm, calib, heads, args.pairs, block=args.block)
        t2 = time.perf_counter()
        print(f"seed {seed}: singles {t1 - t:.0f} s, {len(pairs)} pairs ({args.pairs}) {t2 - t1:.0f} s", flush=True)
        for cut in args.cuts:
            res = {"seed": seed, "cut": cut}
            for side, cfg, scores in (
                ("independent", AllocationConfig(granularity=("heads",)), imp),
                ("interactions", AllocationConfig(granularity=("heads",), interactions=True), PairImportance(imp, pairs)),
            ):
                remove = allocate(pm, scores, cut * head_flops, cfg, 64)
                small = pm.prune(remove)
                res[side] = task.evaluate(small, "val", tokenizer=tok, limit=args.val)["accuracy"]
                res[side + "_removed"] = {k.split(".")[-3]: v for k, v in remove.items()}
                if args.recover:
                    recover(small, model, task, RecoveryConfig(epochs=args.recover), tokenizer=tok, max_length=64, seed=seed)
                    res[side + "_recovered"] = task.evaluate(small, "val", tokenizer=tok, limit=args.val)["accuracy"]
            overlap = sum(len(set(res["independent_removed"].get(k, [])) & set(v)) for k, v in res["interactions_removed"].items())
            res["same_heads"] = overlap
            rows.append(res)
            print(f"  cut {cut:.0%} of head FLOPs: independent {res['independent']:.4f}, interaction-aware "
                  f"{res['interactions']:.4f} ({res['interactions'] - res['independent']:+.4f}); "
                  f"{overlap} of the removed heads in common", flush=True)
            if args.recover:
                print(f"    after {args.recover} epoch: independent {res['independent_recovered']:.4f}, interaction-aware "
                      f"{res['interactions_recovered']:.4f}", flush=True)
    summary = {}
    sd = lambda x: statistics.stdev(x) if len(x) > 1 else 0.0  # noqa: E731
    for cut in args.cuts:
        part = [r for r in rows if r["cut"] == cut]
        for when in ("", "_recovered") if args.recover else ("",):
            ind = [r["independent" + when] for r in part]
            ia = [r["interactions" + when] for r in part]
            d = [b - a for a, b in zip(ind, ia)]
            summary[str(cut) + when] = {"independent": [statistics.mean(ind), sd(ind)], "interactions": [statistics.mean(ia), sd(ia)],
                                        "diff": [statistics.mean(d), sd(d)], "wins": sum(x > 0 for x in d), "seeds": len(d)}
            print(f"cut {cut:.0%}{' after recovery' if when else ''}: independent {statistics.mean(ind):.4f} ± {sd(ind):.4f}, "
                  f"interaction-aware {statistics.mean(ia):.4f} ± {sd(ia):.4f}; paired diff {statistics.mean(d):+.4f} ± "
                  f"{sd(d):.4f} ({sum(x > 0 for x in d)}/{len(d)} seeds better)", flush=True)
    out = {"dense": dense, "rows": rows, "summary": summary, "machine": C.machine_line().replace(f"torch threads {C.THREADS}", f"torch threads {args.threads}"), "command": " ".join(sys.argv)}
    with open(args.out + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
