"""Which compensation should a cut use? MiniLM sentiment classifier cut once to a FLOPs budget, the same
particles removed under every compensation (none / bias / merge / refit), test accuracy right after the cut and
after short recoveries (distillation from the dense model, compress's recovery with its defaults).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compensate_minilm.py --model out/minilm-vader \\
        --budgets 0.5 0.25 0.125 --epochs 0 0.1 --seeds 0 [--json benchmarks/results/compensate.json]

One-shot cut (compress's global fisher-per-FLOP allocation with its minimum widths), calibration: 256 training
sentences (the scores and every compensation's statistics). Recovery seeds vary the recovery's data order only.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, setup_threads  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.allocate import AllocationConfig, allocate, named_scorer  # noqa: E402
from particlize.recover import RecoveryConfig, recover  # noqa: E402
from particlize.tasks import get_task  # noqa: E402

SEQ = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/minilm-vader")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--compensate", nargs="+", default=["none", "bias", "merge", "refit"])
    ap.add_argument("--epochs", type=float, nargs="+", default=[0.0, 0.1], help="recovery epochs to report (0: the cut alone)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    setup_threads()
    from transformers import AutoTokenizer

    dense = pz.load(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    task = get_task("vader-sentiment")
    print(machine_line())
    base = task.evaluate(dense, "test", tokenizer=tok)["accuracy"]
    print(f"dense test accuracy {base:.4f}; calibration {args.calib} training sentences; one-shot cut")
    pm = pz.decompose(dense, seq_len=SEQ)
    calib = task.calibration(dense, tok, batch_size=32, max_length=SEQ, limit=args.calib, seed=0)
    cfg = AllocationConfig()
    imp = named_scorer(cfg.scorer)(pm, calib, cfg.kinds)
    rows = []
    print(f"{'budget':>6} {'compensate':<10} {'epochs':>6} {'seed':>4} {'FLOPs kept':>10} {'test acc':>8} {'secs':>6}")
    for budget in args.budgets:
        remove = allocate(pm, imp, (1 - budget) * pm.cost().flops, cfg, SEQ)
        kept = pm.cost(remove).flops / pm.cost().flops
        for comp in args.compensate:
            t = time.perf_counter()
            cut = pm.prune(remove, compensate=comp, data=calib)
            secs = time.perf_counter() - t
            for epochs in sorted(args.epochs):
                for seed in (args.seeds if epochs else args.seeds[:1]):
                    small = copy.deepcopy(cut)
                    if epochs:
                        recover(small, dense, task, RecoveryConfig(epochs=epochs), tokenizer=tok, max_length=SEQ, seed=seed)
                    acc = task.evaluate(small, "test", tokenizer=tok)["accuracy"]
                    rows.append({"budget": budget, "compensate": comp, "epochs": epochs, "seed": seed,
                                 "flops_kept": kept, "test_accuracy": acc, "compensate_s": secs})
                    print(f"{budget:>6} {comp:<10} {epochs:>6} {seed:>4} {kept:>10.3f} {acc:>8.4f} {secs:>6.1f}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_line(), "dense_test_accuracy": base, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
