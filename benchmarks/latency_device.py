"""Latency per FLOP of the compressed MiniLM architectures on any device (the GPU row of issue 5's table).

Latency depends on the architecture, not the weights, so this needs no trained model: the classifier is
rebuilt from the encoder config in ``--arch`` (random weights, seeded) and cut to each recorded width
(``[[heads, FFN neurons], ...]`` per layer, fewer layers for block removal) with particlize's own surgery.
The file travels to a GPU machine with the source tree; nothing else is needed there but torch and
transformers:

    PYTHONPATH=src python3 benchmarks/latency_device.py --device cuda --dtype fp32 bf16 \
        --shape 32x64 256x128 --json $OUT/gpu.json

Timing: every model at every shape and dtype, ``--rounds`` interleaved rounds of ``--reps`` forwards under
``torch.inference_mode`` (CUDA: events around the batch of forwards, after a synchronize); the speedup is
the per-round paired ratio dense / pruned, median over rounds. ``--graphs`` (CUDA) also times each forward
replayed as a CUDA graph, which removes the kernel-launch cost that dominates small batches on a GPU;
``--compile`` times each model under ``torch.compile`` (static shapes), which fuses the LayerNorms, residual adds
and activations that FLOPs do not count.
**Efficiency = speedup × FLOPs kept** (issue 5 asks ≥ 0.95); FLOPs kept is recomputed from the models timed, at
each shape's token count (`flops_kept`), not read from ``--arch``. On a CPU with glibc, set
``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296``, or the dense model's large
activations are mapped afresh each forward and its page faults inflate every speedup (RESULTS.md, session 13).

Every run also times a *floor* model (one head and one FFN neuron per layer, 3% of MiniLM's FLOPs). Its time as a
share of the dense model's, less its FLOPs share, is the work no width cut removes (embeddings, LayerNorms,
residual adds, the projections that write the full hidden width); it bounds what any width-only cut can reach.

``--write-arch`` makes the ``--arch`` file from a trained model folder and ``compress_minilm.py --json`` /
``latency_allocation.py`` width records (run once on the machine that has them).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import by_widths, machine_line, setup_threads  # noqa: E402
from _gpu_common import capture  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.models.text import TextClassifier  # noqa: E402

ARCH = Path(__file__).parent / "minilm_architectures.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def write_arch(model_dir: Path, width_files: list[Path], out: Path) -> None:
    """The encoder config of ``model_dir`` and every (variant, budget, seed) width record of ``width_files``."""
    recipe = json.loads((model_dir / "particlize.json").read_text())["recipe"]
    dense = pz.load(model_dir)
    dense_flops = pz.decompose(dense, seq_len=64).cost().flops
    models, seen = [], set()
    for f in width_files:
        for r in json.loads(f.read_text()):
            key = (r.get("variant") or r.get("strategy"), r["budget"], r.get("seed", 0))
            arch = json.dumps(r["widths"])
            if arch in seen:  # the same architecture under another name times the same
                continue
            seen.add(arch)
            m = by_widths(dense, r["widths"])
            models.append({"name": f"{key[0]}@{key[1]}/{key[2]}", "budget": key[1], "widths": r["widths"],
                           "flops_kept": round(pz.decompose(m, seq_len=64).cost().flops / dense_flops, 4)})
    out.write_text(json.dumps({"recipe": recipe["kwargs"], "models": models}, indent=1) + "\n")
    print(f"wrote {out}: {len(models)} architectures")


def flops_kept(models: dict[str, torch.nn.Module], seq_len: int) -> dict[str, float]:
    """Each model's share of the ``"dense"`` model's FLOPs at ``seq_len`` tokens (`ParticleMap.cost`), measured on the
    models that are timed rather than read from the ``--arch`` file, so the efficiency is about what ran."""
    flops = {k: pz.decompose(m, seq_len=seq_len).cost().flops for k, m in models.items()}
    return {k: f / flops["dense"] for k, f in flops.items()}


class _Timer:
    """Milliseconds per forward of ``model`` on ``x``: eager, compiled (``torch.compile``, static shapes), or
    replayed as a CUDA graph."""

    def __init__(self, model: torch.nn.Module, x: dict[str, torch.Tensor], mode: str):
        if mode == "compile":  # one compiled frame per model: lift dynamo's limit of 8 so none falls back to eager
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            model = torch.compile(model, dynamic=False)
        self.model, self.x, self.graph = model, x, None
        graph = mode == "graph"
        with torch.inference_mode():
            if graph:  # warmed up on a side stream, then captured
                self.graph = capture(x["input_ids"].device, lambda: model(**x))
            else:
                for _ in range(3):
                    model(**x)

    def __call__(self, reps: int) -> float:
        cuda = self.x["input_ids"].is_cuda
        with torch.inference_mode():
            if cuda:
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(reps):
                    self.graph.replay() if self.graph is not None else self.model(**self.x)
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / reps
            t = time.perf_counter()
            for _ in range(reps):
                self.model(**self.x)
            return (time.perf_counter() - t) * 1e3 / reps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=Path, default=ARCH)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=list(DTYPES))
    ap.add_argument("--shape", nargs="+", default=["32x64"], help="batch x tokens, e.g. 32x64 256x128")
    ap.add_argument("--budgets", type=float, nargs="+", default=None, help="only these budgets (default: all)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=20, help="forwards per timed batch")
    ap.add_argument("--graphs", action="store_true", help="CUDA: also time CUDA-graph replays")
    ap.add_argument("--compile", action="store_true",
                    help="also time every model under torch.compile (inductor; CPU needs a C++ compiler)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--write-arch", nargs="+", type=Path, metavar=("MODEL_DIR", "WIDTHS_JSON"),
                    help="write --arch from a trained model folder and width records, then exit")
    args = ap.parse_args()
    setup_threads()
    if args.write_arch:
        if len(args.write_arch) < 2:
            raise SystemExit("--write-arch takes a model folder and at least one widths JSON file")
        write_arch(args.write_arch[0], args.write_arch[1:], args.arch)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu")
    if args.graphs and not args.device.startswith("cuda"):
        raise SystemExit("--graphs needs --device cuda")
    spec = json.loads(args.arch.read_text())
    device = torch.device(args.device)
    info = machine_line()
    if device.type == "cuda":
        info += f" | {torch.cuda.get_device_name(device)}"
    print(info, flush=True)
    torch.manual_seed(0)
    dense = TextClassifier(**spec["recipe"]).eval()
    archs = [a for a in spec["models"] if args.budgets is None or a["budget"] in args.budgets]
    cpu_models = {"dense": dense, **{a["name"]: by_widths(dense, a["widths"]) for a in archs}}
    # the floor: one head and one FFN neuron per layer; its time beyond its FLOPs is the work no width cut removes
    cpu_models["floor"] = by_widths(dense, [[1, 1]] * dense.encoder.config.num_hidden_layers)
    recorded = {a["name"]: a["flops_kept"] for a in archs if "flops_kept" in a}
    kept_at = {t: flops_kept(cpu_models, t) for t in sorted({int(s.lower().split("x")[1]) for s in args.shape})}
    for name, share in recorded.items():  # the --arch file's number, written at 64 tokens, is only cross-checked
        if 64 in kept_at and abs(kept_at[64][name] - share) > 1e-3:
            print(f"note: {name} keeps {kept_at[64][name]:.4f} of the FLOPs at 64 tokens, the --arch file says {share}")
    results = []
    for dname in args.dtype:
        models = {k: copy.deepcopy(m).to(device=device, dtype=DTYPES[dname]) for k, m in cpu_models.items()}
        for shape in args.shape:
            b, t = (int(v) for v in shape.lower().split("x"))
            g = torch.Generator().manual_seed(0)
            x = {"input_ids": torch.randint(1000, 30000, (b, t), generator=g).to(device),
                 "attention_mask": torch.ones(b, t, dtype=torch.long, device=device)}
            kept = kept_at[t]
            for mode in ["eager", *(["compile"] if args.compile else []), *(["graph"] if args.graphs else [])]:
                timers = {k: _Timer(m, x, mode) for k, m in models.items()}
                times: dict[str, list[float]] = {k: [] for k in timers}
                for _ in range(args.rounds):
                    for k, tm in timers.items():
                        times[k].append(tm(args.reps))
                del timers
                dense_ms = statistics.median(times["dense"])
                print(f"\n{dname} {shape} {mode}: dense {dense_ms:.3f} ms")
                print(f"{'model':<34} {'FLOPs kept':>10} {'ms':>9} {'speedup':>8} {'efficiency':>10}")
                for k in times:
                    sp = statistics.median(d / v for d, v in zip(times["dense"], times[k]))
                    row = {"dtype": dname, "shape": shape, "mode": mode, "model": k, "flops_kept": kept[k],
                           "ms": statistics.median(times[k]), "speedup": sp, "efficiency": sp * kept[k]}
                    results.append(row)
                    print(f"{k:<34} {kept[k]:>10.3f} {row['ms']:>9.3f} {sp:>7.2f}× {row['efficiency']:>10.2f}", flush=True)
                share = statistics.median(f / d for f, d in zip(times["floor"], times["dense"]))
                fixed = share - kept["floor"]  # the floor's own FLOPs counted at the dense model's rate
                results.append({"dtype": dname, "shape": shape, "mode": mode, "floor_share": share, "fixed_share": fixed})
                print(f"fixed work: the floor (one head, one neuron per layer; {kept['floor']:.1%} of the FLOPs) takes "
                      f"{share:.1%} of the dense time, so {fixed:.1%} is work no width cut removes. Efficiency 0.95 at a "
                      f"FLOPs share f needs that under 0.05·f / (0.95·(1 − f)) even if the rest scaled with the FLOPs "
                      f"(1.8% at 25%, 0.8% at 12.5%)")
        del models
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
