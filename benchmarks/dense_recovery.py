"""The ceiling of a cut: the dense MiniLM classifier given the same recovery as every cut (issue 5).

`compress`'s recovery (one epoch of distillation from the original model: KL + task loss + block-wise output
MSE, lr 1.5e-4, early stopping on validation accuracy) is also one more epoch of training with labels. A cut
that ends near the dense model may owe that to the extra epoch; this script gives the uncut model the same
epoch (student = a copy of the dense model, teacher = the dense model) so that a cut is compared with what
the recovery alone does:

    PZ_BENCH_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/dense_recovery.py --seeds 0 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import start  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.recover import RecoveryConfig, recover  # noqa: E402
from particlize.tasks import get_task  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/minilm-vader")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=float, default=1.0)
    args = ap.parse_args()
    start()
    from transformers import AutoTokenizer

    dense = pz.load(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    task = get_task("vader-sentiment")
    print(f"dense: test accuracy {task.evaluate(dense, 'test', tokenizer=tok)['accuracy']:.4f}", flush=True)
    accs = []
    for seed in args.seeds:
        student = copy.deepcopy(dense)
        torch.manual_seed(seed)
        info = recover(student, dense, task, RecoveryConfig(epochs=args.epochs), tokenizer=tok, seed=seed)
        accs.append(task.evaluate(student, "test", tokenizer=tok)["accuracy"])
        print(f"seed {seed}: dense + recovery test accuracy {accs[-1]:.4f} ({info['steps']} steps, "
              f"{info['seconds']:.0f} s)", flush=True)
    if len(accs) > 1:
        print(f"dense + recovery: {statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f} over seeds {args.seeds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
