"""A 2-layer LSTM on the VADER sentences, compressed by hidden units per layer to 50% and 25% of its FLOPs with
recovery, beside the dense model: test accuracy (several seeds of the cut + recovery), CPU latency per sequence
(batch 1 and 32, 2 threads, interleaved rounds, paired ratios), and what Torch-Pruning 1.6.1 does with the same
model.

    # the dense reference (its own command; or let this script train it into --dense when missing)
    particlize train lstm --task vader-sentiment --out out/lstm-vader --epochs 2
    PYTHONPATH=src python benchmarks/lstm_vader.py --dense out/lstm-vader --seeds 0 1 2

Every compressed model is cut in one round straight to its target (``max_fraction=1``, Fisher scores of the units
on 256 training sentences, global allocation by importance per FLOP, minimum width 25% per layer) and recovered by
distillation from the dense model (KL + cross-entropy, AdamW at ``--lr``, ``--recover-epochs`` passes, early
stopping on validation accuracy). The seed changes the calibration sample and the recovery's shuffling; the dense
model is the same for every seed. Training and recovery run on ``--train-threads`` torch threads (1: on a
shared, oversubscribed 2-core machine a second thread mostly spins); latency on 2. Writes ``benchmarks/results/lstm-vader.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import _common as C
import torch
from torch import nn

import particlize as pz
from particlize.adapters.stacked_rnn import StackedRNN
from particlize.loop import compress
from particlize.sources import load_tokenizer
from particlize.tasks import get_task
from particlize.train import fine_tune

RESULTS = C.ROOT / "benchmarks" / "results" / "lstm-vader.json"


def n_params(model: nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


def cut_and_recover(dense: nn.Module, task: Any, tok: Any, target: float, seed: int, epochs: float,
                    lr: float) -> tuple[nn.Module, dict[str, Any]]:
    t0 = time.perf_counter()
    res = compress(dense, task, tokenizer=tok, target_flops=target, granularity=("units",), max_fraction=1.0,
                   recover_epochs=epochs, lr=lr, min_quality=0.0, seed=seed, latency_batch=1, latency_seq=8)
    small = res.model.eval()
    test = task.evaluate(small, "test", tokenizer=tok)
    entry = res.returned
    return small, {"target": target, "seed": seed, "recover_epochs": epochs, "test_accuracy": test["accuracy"],
                   "val_accuracy": entry.get("val_accuracy"), "flops_ratio": entry["flops_ratio"],
                   "rnn_params": n_params(small, "rnn."), "widths": list(small.rnn.hidden_sizes)
                   if isinstance(small.rnn, StackedRNN) else [small.rnn.hidden_size] * small.rnn.num_layers,
                   "recovery": entry.get("recovery", {}), "seconds": time.perf_counter() - t0}


# ---- Torch-Pruning ---------------------------------------------------------------------------------


class _Unpacked(nn.Module):
    """The same LSTM classifier without packing (every sequence full length): Torch-Pruning's usual setting."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.embed, self.rnn, self.head = m.embed, m.rnn, m.head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(input_ids))
        return self.head(out[:, -1])


def torch_pruning_try(dense: nn.Module, inputs: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """Ask Torch-Pruning to remove 50% of the LSTM's hidden units (magnitude importance) three ways."""
    import torch_pruning as tp

    ids = inputs["input_ids"]
    setups = {
        "TextRNNClassifier as is (packed nn.LSTM, 2 layers)": (lambda: copy.deepcopy(dense), inputs),
        "unpacked nn.LSTM(num_layers=2)": (lambda: _Unpacked(copy.deepcopy(dense)), ids),
        "two single-layer nn.LSTMs (StackedRNN)": (lambda: _unpacked_stacked(dense), ids),
    }
    rows = []
    for what, (make, x) in setups.items():
        model = make().eval()
        before = {n: tuple(p.shape) for n, p in model.named_parameters()}
        row: dict[str, Any] = {"setup": what}
        try:
            pruner = tp.pruner.BasePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                          pruning_ratio=0.5, ignored_layers=[model.head])
            pruner.step()
            after = {n: tuple(p.shape) for n, p in model.named_parameters()}
            changed = {n: f"{before[n]}->{s}" for n, s in after.items() if s != before[n]}
            with torch.no_grad():
                out = model(**x) if isinstance(x, dict) else model(x)
            row.update(outcome="ran", changed=changed, output_shape=list(out.shape),
                       rnn_params_ratio=n_params(model, "rnn.") / sum(
                           torch.Size(s).numel() for n, s in before.items() if n.startswith("rnn.")))
        except Exception as e:  # noqa: BLE001 - the outcome is what we report
            tb = traceback.extract_tb(e.__traceback__)[-1]
            row.update(outcome=f"{type(e).__name__}: {str(e)[:160]}",
                       where=f"{Path(tb.filename).name}:{tb.lineno} `{tb.line}`")
        print(f"  Torch-Pruning, {what}: {row['outcome']} {row.get('changed', row.get('where', ''))}", flush=True)
        rows.append(row)
    return rows


def _unpacked_stacked(dense: nn.Module) -> nn.Module:
    m = _Unpacked(copy.deepcopy(dense))
    m.rnn = StackedRNN.from_rnn(m.rnn)
    return m


# ---- latency ---------------------------------------------------------------------------------------


def latency(models: dict[str, nn.Module], batch: int, seq: int, rounds: int, reps: int) -> dict[str, Any]:
    """Interleaved rounds (dense, 50%, 25%, dense, …): per-side median ms per sequence, paired ratios to dense."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (batch, seq), generator=g)
    x = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    per: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(3):
                m(**x)
        for _ in range(rounds):
            for k, m in models.items():
                t = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    m(**x)
                    t.append(time.perf_counter() - t0)
                per[k].append(statistics.median(t) * 1e3 / batch)
    out: dict[str, Any] = {}
    for k, v in per.items():
        ratios = [d / s for d, s in zip(per["dense"], v)]
        out[k] = {"ms_per_seq": statistics.median(v), "speedup_median": statistics.median(ratios),
                  "rounds_faster": sum(r > 1 for r in ratios), "rounds": rounds, "raw": v}
    return out


# ---- main --------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", default="out/lstm-vader", help="folder of `particlize train lstm` (trained when missing)")
    ap.add_argument("--train-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    ap.add_argument("--recover-epochs", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seq", type=int, default=32, help="tokens per sequence for latency")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--train-threads", type=int, default=1)
    ap.add_argument("--cut-only", action="store_true", help="also the accuracy right after the cut (seed 0)")
    ap.add_argument("--latency-only", action="store_true", help="re-measure latency into an existing --out")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    C.start()
    if args.latency_only:
        return latency_only(pz.load(args.dense).eval(), args)
    t_start = time.perf_counter()
    probe0 = C.matmul_probe()
    torch.set_num_threads(args.train_threads)
    dense_dir = Path(args.dense)
    trained_here = None
    if not (dense_dir / "particlize.json").is_file():
        t0 = time.perf_counter()
        fine_tune("vader-sentiment", dense_dir, model="lstm", epochs=args.train_epochs)
        trained_here = time.perf_counter() - t0
    meta = json.loads((dense_dir / "particlize.json").read_text())["extra"]
    dense, tok, task = pz.load(dense_dir).eval(), load_tokenizer(str(dense_dir)), get_task("vader-sentiment")
    dense_test = task.evaluate(dense, "test", tokenizer=tok)
    print(f"dense: test accuracy {dense_test['accuracy']:.4f} ({dense_test['n']} sentences), "
          f"{n_params(dense, 'rnn.'):,} LSTM params, trained {meta['train']['epochs']} epochs", flush=True)

    data: dict[str, Any] = {"machine": C.machine_line(), "args": vars(args), "probe_gflops": [probe0]}
    data["dense"] = {"dir": str(dense_dir), "test": dense_test, "train": {k: v for k, v in meta["train"].items()
                     if k != "history"}, "trained_here_seconds": trained_here, "rnn_params": n_params(dense, "rnn."),
                     "params": n_params(dense)}
    runs: list[dict[str, Any]] = []
    kept: dict[float, nn.Module] = {}
    data["runs"] = runs
    if args.cut_only:
        for target in args.targets:
            _, info = cut_and_recover(dense, task, tok, target, args.seeds[0], 0, args.lr)
            runs.append(info | {"no_recovery": True})
            print(f"  {target:.0%} FLOPs, cut only (seed {args.seeds[0]}): test {info['test_accuracy']:.4f}", flush=True)
    for i, seed in enumerate(args.seeds):  # seed by seed, so a run cut short still has whole seeds
        for target in args.targets:
            small, info = cut_and_recover(dense, task, tok, target, seed, args.recover_epochs, args.lr)
            runs.append(info)
            kept.setdefault(target, small)
            print(f"  {target:.0%} FLOPs, seed {seed}: test {info['test_accuracy']:.4f} (flops {info['flops_ratio']:.3f},"
                  f" widths {info['widths']}, {info['seconds']:.0f} s)", flush=True)
        if i == 0:  # the first seed's models: latency and Torch-Pruning now, more seeds after
            C.setup_threads()
            data["latency"] = measure_all(dense, kept, args)
            ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(1))
            data["torch_pruning"] = torch_pruning_try(dense, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
            torch.set_num_threads(args.train_threads)
        data["summary"] = summarize(runs, args.targets)
        _write(Path(args.out), data)
    data["probe_gflops"].append(C.matmul_probe())
    print_table(data, dense, dense_test, args.rounds)
    data["wall_seconds"] = time.perf_counter() - t_start
    print(f"matmul probe {data['probe_gflops'][0]:.0f} → {data['probe_gflops'][-1]:.0f} GFLOP/s; "
          f"wall {data['wall_seconds']:.0f} s")
    _write(Path(args.out), data)
    print(f"wrote {args.out}")


def measure_all(dense: nn.Module, kept: dict[float, nn.Module], args: Any) -> dict[str, Any]:
    """Latency of dense (as ``nn.LSTM`` and as the same weights in a `StackedRNN`, what a cut model runs on),
    and of the cut models; ratios are to the ``nn.LSTM`` dense model, ``vs_stacked`` to the StackedRNN one."""
    stacked = copy.deepcopy(dense)
    stacked.rnn = StackedRNN.from_rnn(stacked.rnn)
    models = {"dense": dense, "dense-stacked": stacked, **{f"{t:.0%}": m for t, m in kept.items()}}
    out = {f"batch{b}": latency(models, b, args.seq, args.rounds, reps=5 if b == 1 else 3) for b in (1, 32)}
    for lat in out.values():
        for k, v in lat.items():
            ratios = [a / b for a, b in zip(lat["dense-stacked"]["raw"], v["raw"])]
            v["speedup_vs_stacked"] = statistics.median(ratios)
            v["rounds_faster_vs_stacked"] = sum(r > 1 for r in ratios)
    return out


def latency_only(dense: nn.Module, args: Any) -> None:
    """Re-measure latency into an existing results file: cut models rebuilt at the widths its first seed got
    (latency depends on the shapes only)."""
    data = json.loads(Path(args.out).read_text())
    kept = {}
    for target in args.targets:
        run = next(r for r in data["runs"] if r["target"] == target and not r.get("no_recovery"))
        pm = pz.decompose(dense)
        kept[target] = pm.prune({f"rnn.l{l}.units": list(range(w, pm[f"rnn.l{l}.units"].size))
                                 for l, w in enumerate(run["widths"])}).eval()
    probe0 = C.matmul_probe()
    data["latency"] = measure_all(dense, kept, args)
    data["latency_probe_gflops"] = [probe0, C.matmul_probe()]
    data["latency_machine"] = C.machine_line()
    _write(Path(args.out), data)
    print_table(data, dense, data["dense"]["test"], args.rounds)


def summarize(runs: list[dict[str, Any]], targets: list[float]) -> list[dict[str, Any]]:
    out = []
    for target in targets:
        accs = [r["test_accuracy"] for r in runs if r["target"] == target and not r.get("no_recovery")]
        if accs:
            out.append({"target": target, "test_mean": statistics.mean(accs),
                        "test_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "seeds": len(accs)})
    return out


def print_table(data: dict[str, Any], dense: nn.Module, dense_test: dict[str, Any], rounds: int) -> None:
    b1, b32 = data["latency"]["batch1"], data["latency"]["batch32"]
    print("\n| model | FLOPs | LSTM params | test accuracy | ms/seq b1 (× dense) | ms/seq b32 (× dense) |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | 1.000 | {n_params(dense, 'rnn.'):,} | {dense_test['accuracy']:.4f} | {b1['dense']['ms_per_seq']:.3f} "
          f"| {b32['dense']['ms_per_seq']:.3f} |")
    if "dense-stacked" in b1:
        s1, s32 = b1["dense-stacked"], b32["dense-stacked"]
        print(f"| dense as StackedRNN | 1.000 | same | same | {s1['ms_per_seq']:.3f} ({s1['speedup_median']:.2f}×) "
              f"| {s32['ms_per_seq']:.3f} ({s32['speedup_median']:.2f}×) |")
    for s in data["summary"]:
        k = f"{s['target']:.0%}"
        first = next(r for r in data["runs"] if r["target"] == s["target"] and not r.get("no_recovery"))
        print(f"| {k} units | {first['flops_ratio']:.3f} | {first['rnn_params']:,} | {s['test_mean']:.4f} ± "
              f"{s['test_std']:.4f} ({s['seeds']} seeds) | {b1[k]['ms_per_seq']:.3f} ({b1[k]['speedup_median']:.2f}×, "
              f"{b1[k]['rounds_faster']}/{rounds}; {b1[k].get('speedup_vs_stacked', float('nan')):.2f}× vs stacked) | "
              f"{b32[k]['ms_per_seq']:.3f} ({b32[k]['speedup_median']:.2f}×, {b32[k]['rounds_faster']}/{rounds}; "
              f"{b32[k].get('speedup_vs_stacked', float('nan')):.2f}× vs stacked) |")


def _write(out: Path, data: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(out)

if __name__ == "__main__":
    main()
