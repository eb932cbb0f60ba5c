"""Which scorer and allocation should `compress` use by default? One-shot pruning of the MiniLM sentiment
classifier to a FLOPs budget, no recovery, validation accuracy — every combination in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/scorer_oneshot.py --model out/minilm-vader --budget 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, setup_threads  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.allocate import AllocationConfig, allocate, named_scorer  # noqa: E402
from particlize.tasks import get_task  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/minilm-vader")
    ap.add_argument("--budget", type=float, nargs="+", default=[0.5])
    ap.add_argument("--scorers", nargs="+", default=["taylor", "taylor-example", "fisher", "magnitude", "activation"])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--val", type=int, default=None, help="validation sentences (default: all)")
    args = ap.parse_args()
    setup_threads()
    from transformers import AutoTokenizer

    model = pz.load(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    task = get_task("vader-sentiment")
    print(machine_line())
    dense = task.evaluate(model, "val", tokenizer=tok, limit=args.val)["accuracy"]
    print(f"dense val accuracy {dense:.4f}; calibration {args.calib} train sentences; no recovery")
    pm = pz.decompose(model, seq_len=64)
    calib = task.batches("train", tokenizer=tok, batch_size=32, limit=args.calib, shuffle=True, seed=0)
    print(f"{'budget':>6} {'scorer':<15} {'allocation':<9} {'FLOPs kept':>10} {'val acc':>8} {'score s':>8}")
    for scorer in args.scorers:
        cfg = AllocationConfig(scorer=scorer)
        t = time.perf_counter()
        imp = named_scorer(scorer)(pm, calib, {"head", "neuron"})
        secs = time.perf_counter() - t
        for budget in args.budget:
            for allocation in ("global", "uniform"):
                cfg.allocation = allocation
                remove = allocate(pm, imp, (1 - budget) * pm.cost().flops, cfg, 64)
                small = pm.prune(remove)
                kept = pz.decompose(small, seq_len=64).cost().flops / pm.cost().flops
                acc = task.evaluate(small, "val", tokenizer=tok, limit=args.val)["accuracy"]
                print(f"{budget:>6} {scorer:<15} {allocation:<9} {kept:>10.3f} {acc:>8.4f} {secs:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
