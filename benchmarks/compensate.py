"""Which compensation should a cut use? A model cut once to a FLOPs budget, the same particles removed under
every compensation (none / bias / merge / refit), test quality right after the cut and after short recoveries
(distillation from the dense model: compress's recovery with the task's defaults).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compensate.py --model out/minilm-vader --task vader-sentiment \\
        --budgets 0.5 0.25 0.125 --epochs 0 0.1 --seeds 0 [--json benchmarks/results/compensate-minilm.json]
    .venv/bin/python benchmarks/compensate.py --model sora-tiny --task moving-digits --budgets 0.5 --epochs 0 1

One-shot cut (compress's global fisher-per-FLOP allocation of heads and neurons with its minimum widths);
calibration: 256 training examples (the scores and every compensation's statistics). Classifiers report test
accuracy; the video DiT its held-out ε-MSE and the frame classifier's sample accuracy (40 videos, 50 DDIM steps).
Recovery seeds vary the recovery's data order only.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, setup_threads, write_json  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.allocate import AllocationConfig, allocate, named_scorer  # noqa: E402
from particlize.recover import RecoveryConfig, recover  # noqa: E402
from particlize.sources import load_tokenizer  # noqa: E402
from particlize.tasks import get_task  # noqa: E402

SEQ = 64


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/minilm-vader")
    ap.add_argument("--task", default="vader-sentiment")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--compensate", nargs="+", default=["none", "bias", "merge", "refit"])
    ap.add_argument("--epochs", type=float, nargs="+", default=[0.0, 0.1], help="recovery epochs to report (0: the cut alone)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--calib-seed", type=int, default=0, help="seed of the calibration subset (the cut's data)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    setup_threads()
    dense = pz.load(args.model).eval()
    task = get_task(args.task)
    tok = load_tokenizer(args.model) if task.kind == "text" else None
    print(machine_line())
    keys = ["accuracy"] if task.kind != "video" else ["eps_mse", "sample_accuracy"]
    base = _measure(task, dense, tok, keys)
    print(f"dense {base}; calibration {args.calib} training examples; one-shot cut")
    pm = pz.decompose(dense, seq_len=SEQ)
    calib = task.calibration(dense, tok, batch_size=32, max_length=SEQ, limit=args.calib, seed=args.calib_seed)
    cfg = AllocationConfig()
    imp = named_scorer(cfg.scorer)(pm, calib, cfg.kinds)
    rows = []
    print(f"{'budget':>6} {'compensate':<10} {'epochs':>6} {'seed':>4} {'FLOPs kept':>10} " + " ".join(f"{k:>15}" for k in keys)
          + f" {'secs':>6}")
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
                    q = _measure(task, small, tok, keys)
                    rows.append({"budget": budget, "compensate": comp, "epochs": epochs, "seed": seed,
                                 "flops_kept": kept, **q, "compensate_s": secs})
                    print(f"{budget:>6} {comp:<10} {epochs:>6} {seed:>4} {kept:>10.3f} "
                          + " ".join(f"{q[k]:>15.4f}" for k in keys) + f" {secs:>6.1f}", flush=True)
                    if args.json:  # after every row: a long run stopped midway keeps what it measured
                        write_json(args.json, {"machine": machine_line(), "task": args.task, "dense": base,
                                               "calib_seed": args.calib_seed, "rows": rows})
    return 0


def _measure(task, model, tok, keys: list[str]) -> dict[str, float]:
    q = task.quality(model, "test", tokenizer=tok, max_length=SEQ) if task.kind != "video" else task.quality(model, "test")
    return {k: float(q[k]) for k in keys}


if __name__ == "__main__":
    raise SystemExit(main())
