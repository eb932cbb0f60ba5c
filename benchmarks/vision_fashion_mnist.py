"""Fashion-MNIST: the small ResNet compressed to 50% / 25% of its FLOPs by particlize and by Torch-Pruning.

What it measures, all in one run (BENCHMARKING.md):
1. the reference: `resnet_small` trained by `particlize.train.fine_tune` (cached in out/; trained here
   when missing, which takes long on a shared CPU: `particlize train resnet-small --task fashion-mnist ...`);
2. what the coupled residual channels cost: the share of FLOPs / parameters no group can remove and the
   lowest FLOPs a plan can reach, with the conv adapter's residual-stream groups off and on;
3. per target and seed: particlize (`compress`, channel granularity, its default scorer and allocation
   ("auto": uniform for conv channels), one round: ``max_fraction=1``; beside it the default multi-round
   schedule and global allocation) vs Torch-Pruning 1.6.1 (`BasePruner`, dependency graph, Taylor and magnitude
   importance, one shot at the smallest uniform per-layer ratio that meets the FLOPs target), each recovered with the
   same `particlize.recover.recover` call (distillation from the dense model, the same epochs, data,
   optimiser and lr); test accuracy on the 10,000 official test images;
4. CPU latency (2 threads, batch ``--latency-batch`` fixed): every model interleaved, several rounds, the
   median and the paired ratio to the dense model per round.

    PZ_BENCH_THREADS=1 PYTHONPATH=src python benchmarks/vision_fashion_mnist.py --seeds 3 --rounds 9   # ≈10 min, 1 core
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

from _common import ROOT, matmul_probe, print_table, start  # noqa: I001  (sets up sys.path and threads)

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import particlize as pz
from particlize.adapters import register
from particlize.adapters.conv import ConvAdapter
from particlize.errors import ParticlizeError
from particlize.loop import compress
from particlize.recover import recover
from particlize.recover.config import RecoveryConfig
from particlize.tasks import get_task
from particlize.train import fine_tune

SHAPE = (1, 1, 28, 28)


def flops(model: nn.Module) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.eval()(torch.zeros(SHAPE))
    return fc.get_total_flops()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def reference(path: Path, args: argparse.Namespace) -> nn.Module:
    if not (path / "particlize.json").is_file():
        print(f"training the reference into {path} ({args.train_epochs} epochs, {args.train_limit} examples)", flush=True)
        fine_tune("fashion-mnist", path, model="resnet-small", epochs=args.train_epochs, batch_size=128,
                  limit=args.train_limit, seed=0, force=True)
    meta = json.loads((path / "particlize.json").read_text())["extra"]
    print(f"reference {path}: test accuracy {meta['metrics']['test']['accuracy']:.4f}, trained {meta['train']}", flush=True)
    return pz.load(path).eval()


# ---- 2. what coupling costs -----------------------------------------------------------------------


def coupling(model: nn.Module) -> dict[str, Any]:
    """Unprunable share and lowest reachable FLOPs / params with the residual streams off and on."""
    out = {}
    x = torch.zeros(SHAPE)
    for streams in (False, True):
        res = ConvAdapter(streams=streams).build(model, seq_len=1, example_inputs=x)
        pm = pz.ParticleMap(model, res.groups, tensor_flops=res.tensor_flops, flops_unit=res.flops_unit)
        dense = pm.cost()
        chans = [g for g in pm.groups if g.kind == "channel"]
        floor = pm.cost({g.name: list(range(1, g.size)) for g in chans})  # one channel left in every group
        touched = {s.name for g in chans for s in (*g.writers, *g.readers)}
        fixed_p = sum(p.numel() for n, p in model.named_parameters() if n not in touched)
        fixed_f = sum(model.get_parameter(n).numel() * f for n, f in pm.tensor_flops.items() if n not in touched)
        out["on" if streams else "off"] = {
            "channel_groups": len(chans), "unplaced_convs": res.unplaced,
            "untouched_params_share": fixed_p / dense.params, "untouched_flops_share": fixed_f / dense.flops,
            "min_flops_share": floor.flops / dense.flops, "min_params_share": floor.params / dense.params,
        }
    return out


# ---- 3. the two tools -----------------------------------------------------------------------------


def pz_compress(teacher: nn.Module, task: Any, target: float, seed: int, args: argparse.Namespace,
                rounds: bool = False, allocation: str = "auto") -> nn.Module:
    """particlize's loop: one round to the target (``max_fraction=1``), or with ``rounds`` compress's default
    schedule (at most 1/3 of what is left per round), the same recovery budget split evenly over the rounds.
    ``allocation`` "auto" (the default: uniform for conv channels) or "global" (by importance per FLOP)."""
    if rounds:
        n = _rounds_to(target, 1 / 3)
        kw = dict(max_fraction=1 / 3, max_rounds=n + 1, recover_epochs=args.recover_epochs / n)
    else:
        kw = dict(max_fraction=1.0, max_rounds=2, recover_epochs=args.recover_epochs)
    res = compress(teacher, task, target_flops=target, granularity=("channels",), min_quality=0.0,
                   limit=args.recover_limit, batch_size=args.batch, calib_examples=args.calib, seed=seed,
                   min_width=args.min_width, allocation=allocation, **kw)
    return res.model.eval()


def _rounds_to(target: float, fraction: float) -> int:
    """Rounds needed to reach ``target`` of the FLOPs removing at most ``fraction`` of what is left per round."""
    left, n = 1.0, 0
    while left > target + 1e-9:
        left, n = max(target, left * (1 - fraction)), n + 1
    return n


def tp_compress(teacher: nn.Module, task: Any, target: float, seed: int, importance: str,
                args: argparse.Namespace) -> nn.Module:
    """Torch-Pruning, one shot: the smallest uniform per-layer channel ratio whose pruned model has FLOPs <=
    target (bisection, 8 tries, each a fresh `BasePruner` on a copy), then the same recovery as particlize."""
    torch.manual_seed(seed)
    calib = task.calibration(teacher, batch_size=args.batch, limit=args.calib, seed=seed * 1000 + 1)
    dense = flops(teacher)

    def prune(ratio: float) -> nn.Module:
        model = copy.deepcopy(teacher).eval()
        imp = tp.importance.TaylorImportance() if importance == "taylor" else tp.importance.MagnitudeImportance(p=2)
        pruner = tp.pruner.BasePruner(model, torch.zeros(SHAPE), importance=imp, pruning_ratio=ratio,
                                      ignored_layers=[model.fc], global_pruning=False)
        if importance == "taylor":  # Taylor importance reads the weights' gradients of the task loss
            for x, y in calib:
                F.cross_entropy(model(x), y).backward()
        pruner.step()
        model.zero_grad(set_to_none=True)
        return model

    lo, hi, best = 0.0, 1.0 - args.min_width, None
    for _ in range(8):
        mid = (lo + hi) / 2
        model = prune(mid)
        if flops(model) <= target * dense:
            hi, best = mid, model
        else:
            lo = mid
    model = best if best is not None else prune(hi)
    recover(model, teacher, task, RecoveryConfig(epochs=args.recover_epochs), batch_size=args.batch,
            limit=args.recover_limit, seed=seed * 1000 + 1)
    return model.eval()


TEST_LIMIT: int | None = None  # --test-limit: the first N official test images (all 10,000 by default)


def accuracy(model: nn.Module, task: Any) -> float:
    return float(task.evaluate(model, "test", batch_size=500, limit=TEST_LIMIT)["accuracy"])


# ---- 4. latency -----------------------------------------------------------------------------------


def latencies(models: dict[str, nn.Module], batch: torch.Tensor, rounds: int, reps: int) -> dict[str, dict[str, float]]:
    """Interleaved per round (dense first): median ms per model and the paired ratio dense / model."""
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.eval()
            for _ in range(3):
                m(batch)
        for _ in range(rounds):
            for k, m in models.items():
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    m(batch)
                    ts.append(time.perf_counter() - t)
                times[k].append(statistics.median(ts) * 1e3)
    dense = times["dense"]
    return {k: {"ms": statistics.median(v), "speedup": statistics.median(d / x for d, x in zip(dense, v)),
                "rounds_faster": sum(d > x for d, x in zip(dense, v))} for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", type=Path, default=ROOT / "out" / "fmnist-resnet-small")
    ap.add_argument("--train-epochs", type=int, default=30)
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--recover-epochs", type=float, default=1.0)
    ap.add_argument("--recover-limit", type=int, default=None,
                    help="first N train (and val) examples for recovery (default: the whole training split)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--calib", type=int, default=1024, help="calibration images (scores; TP's Taylor gradients)")
    ap.add_argument("--min-width", type=float, default=0.1)
    ap.add_argument("--test-limit", type=int, default=None, help="first N test images (default: all 10,000)")
    ap.add_argument("--latency-batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--methods", nargs="+", default=None, help="only these sides (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vision-fashion-mnist.json")
    args = ap.parse_args()
    global TEST_LIMIT
    TEST_LIMIT = args.test_limit
    start()
    t_start = time.perf_counter()
    probe0 = matmul_probe()
    task = get_task("fashion-mnist")
    teacher = reference(args.reference, args)
    dense_acc = accuracy(teacher, task)
    dense_f, dense_p = flops(teacher), n_params(teacher)
    print(f"dense: test accuracy {dense_acc:.4f}, {dense_f / 1e6:.3f} MFLOPs, {dense_p:,} params", flush=True)
    cost = coupling(teacher)
    print(json.dumps(cost, indent=1), flush=True)

    methods = {"particlize": None, "particlize-rounds": "rounds", "particlize-global": "global",
               "tp-taylor": "taylor", "tp-magnitude": "magnitude"}
    methods = {k: v for k, v in methods.items() if not args.methods or k in args.methods}
    rows: list[dict[str, Any]] = []
    timed: dict[str, nn.Module] = {"dense": teacher}
    for target in args.targets:
        for seed in range(args.seeds):
            for name, imp in methods.items():
                t0 = time.perf_counter()
                try:
                    small = (pz_compress(teacher, task, target, seed, args, rounds=imp == "rounds",
                                         allocation="global" if imp == "global" else "auto")
                             if imp in (None, "rounds", "global") else tp_compress(teacher, task, target, seed, imp, args))
                except (ParticlizeError, RuntimeError) as e:  # report a side that cannot run, do not hide it
                    rows.append({"method": name, "target": target, "seed": seed, "error": str(e)})
                    print(f"{name} @ {target}: {e}", flush=True)
                    continue
                row = {"method": name, "target": target, "seed": seed, "accuracy": accuracy(small, task),
                       "flops_share": flops(small) / dense_f, "params_share": n_params(small) / dense_p,
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(row, flush=True)
                if seed == 0:
                    timed[f"{name}@{target}"] = small
        if target < cost["off"]["min_flops_share"]:
            print(f"streams off: {target} is below the lowest reachable {cost['off']['min_flops_share']:.3f}", flush=True)
        elif args.seeds and not args.methods:  # the same loop with the residual streams left alone (the adapter before this change)
            register(ConvAdapter(streams=False), priority=10)
            try:
                small = pz_compress(teacher, task, target, 0, args)
                rows.append({"method": "particlize-no-streams", "target": target, "seed": 0,
                             "accuracy": accuracy(small, task), "flops_share": flops(small) / dense_f,
                             "params_share": n_params(small) / dense_p})
                print(rows[-1], flush=True)
            finally:
                register(ConvAdapter(), priority=10)
    batch = torch.rand(args.latency_batch, *SHAPE[1:])
    lat = latencies(timed, batch, args.rounds, reps=5)
    probe1 = matmul_probe()

    summary = []
    for target in args.targets:
        for name in [*methods, "particlize-no-streams"]:
            ok = [r for r in rows if r["method"] == name and r["target"] == target and "accuracy" in r]
            if not ok:
                continue
            accs = [r["accuracy"] for r in ok]
            key = f"{name}@{target}"
            summary.append([f"{target:.0%}", name, len(ok), f"{statistics.mean(accs):.4f} ± {statistics.pstdev(accs):.4f}",
                            f"{statistics.mean(r['flops_share'] for r in ok):.3f}",
                            f"{statistics.mean(r['params_share'] for r in ok):.3f}",
                            f"{lat[key]['ms']:.2f}" if key in lat else "—",
                            f"{lat[key]['speedup']:.2f}× ({lat[key]['rounds_faster']}/{args.rounds})" if key in lat else "—"])
    print(f"dense: accuracy {dense_acc:.4f}, latency {lat['dense']['ms']:.2f} ms / batch {args.latency_batch}")
    table = print_table(["target", "method", "seeds", "test acc (mean ± std)", "FLOPs", "params",
                         "ms / batch", "speed-up vs dense"], summary)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "dense": {"accuracy": dense_acc, "flops": dense_f,
              "params": dense_p}, "coupling": cost, "rows": rows, "latency": lat, "table": table,
              "matmul_gflops": [probe0, probe1], "seconds": round(time.perf_counter() - t_start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out)
    print(f"matmul probe {probe0:.0f} → {probe1:.0f} GFLOP/s; {result['seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
