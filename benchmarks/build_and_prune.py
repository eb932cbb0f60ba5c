"""Time to build the particle map / dependency graph and prune 50% of the heads and FFN neurons of
every layer: particlize vs Torch-Pruning 1.6.1.

    .venv/bin/python benchmarks/build_and_prune.py [--rounds 3] [--rounds-1b 2] [--skip-1b]

Models: (a) the real all-MiniLM-L6-v2 (BertModel), (b) a random-init TinyLlama-shaped 1.1B
LlamaForCausalLM (fp32, hidden 2048, 22 layers, 32 heads / 4 kv heads, FFN 5632, vocab 32000).

Every (model, tool, round) runs in its own subprocess with a time limit, so a hang or a crash of one
tool is reported instead of stopping the benchmark. Rounds alternate the order of the tools. Inside a
subprocess: load/build the model (untimed), one untimed warm-up run of the same tool (on a copy of
MiniLM, or on a tiny Llama for the 1.1B model), then the timed run and the checks.

* build = ``pz.decompose(model)`` | ``tp.pruner.BasePruner(...)`` (dependency graph + pruner set-up);
* prune = choosing the indices + physical removal: particlize scores each head / neuron by the L2 of its
  writer rows (query/key/value rows for BERT heads, q_proj rows for Llama heads under GQA, the FFN
  up/gate rows), removes the lowest half (per key/value chunk under GQA) and calls ``pm.prune`` (which
  returns a new model: it deep-copies the original); Torch-Pruning runs ``pruner.step()`` with its
  ``GroupMagnitudeImportance`` (group L2 over all coupled weights), in place, plus the attribute fix-ups
  it leaves to the user. The two criteria differ, so the removed sets differ; the shapes do not.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import _common as C
import torch

TARGET = {"minilm": dict(heads=6, head_dim=32, ffn=768, hidden=384),
          "llama1b": dict(heads=16, head_dim=64, ffn=2816, hidden=2048)}
LABEL = {"minilm": "all-MiniLM-L6-v2 (BertModel, 22.7M)", "llama1b": "Llama 1.1B random-init fp32 (TinyLlama shape)"}


# ---- one timed run (in a subprocess) ------------------------------------------------------------


def _inputs(kind: str, model):
    if kind == "minilm":
        return C.bert_inputs(2, 16)
    return C.llama_inputs(1, 8, model.config.vocab_size)


def _run_pz(model):
    import particlize as pz

    t0 = time.perf_counter()
    pm = pz.decompose(model)
    t1 = time.perf_counter()
    remove = C.pz_plan(pm)
    small = pm.prune(remove)
    t2 = time.perf_counter()
    return pm, remove, small, t1 - t0, t2 - t1


def _run_tp(model):
    t0 = time.perf_counter()
    pruner = C.tp_pruner(model)
    t1 = time.perf_counter()
    pruner.step()
    C.tp_fix_attributes(model)
    t2 = time.perf_counter()
    return pruner, t1 - t0, t2 - t1


def worker(kind: str, tool: str) -> dict:
    C.setup_threads()
    res: dict = {"model": kind, "tool": tool}
    t = time.perf_counter()
    model = C.load_minilm() if kind == "minilm" else C.build_llama()
    res["load_s"] = time.perf_counter() - t
    inputs = _inputs(kind, model)
    res["params_before"] = C.n_params(model)
    with torch.no_grad():
        ref = C.model_output(model, inputs).clone()

    # untimed warm-up of the same tool (lazy imports, first-call costs)
    warm = copy.deepcopy(model) if kind == "minilm" else C.build_llama(small=True)
    if tool == "particlize":
        _run_pz(warm)
    else:
        _run_tp(warm)
    del warm

    if tool == "particlize":
        import particlize as pz
        from particlize.surgery import plan_step

        # untimed breakdown: pm.prune's conversion of the plan to kept indices (surgery.plan_step)
        pm0 = pz.decompose(model)
        rm0 = C.pz_plan(pm0)
        t = time.perf_counter()
        plan_step(pm0, rm0)
        res["plan_step_s"] = time.perf_counter() - t
        del pm0, rm0
        if kind == "llama1b":  # how much of pm.prune is its deep copy (measured separately, untimed above)
            t = time.perf_counter()
            dup = copy.deepcopy(model)
            res["deepcopy_s"] = time.perf_counter() - t
            del dup
        pm, remove, small, res["build_s"], res["prune_s"] = _run_pz(model)
        res["removed"] = {k: v for k, v in remove.items()} if kind == "minilm" else None
        res["params_after"] = C.n_params(small)
        res["original_untouched"] = C.n_params(model) == res["params_before"]
        y = C.model_output(small, inputs)
        with pm.ablate(remove) as masked:
            y_mask = C.model_output(masked, inputs)
        res["max_abs_diff_vs_masked"] = float((y - y_mask).abs().max())
        res["masked_equal"] = bool(torch.allclose(y, y_mask, atol=1e-4, rtol=1e-4))
        pruned = small
    else:
        pruner, res["build_s"], res["prune_s"] = _run_tp(model)
        if kind == "minilm":
            readers = {f"encoder.layer.{i}.attention.output.dense": 32 for i in range(len(model.encoder.layer))}
            ffn = {f"encoder.layer.{i}.intermediate.dense" for i in range(len(model.encoder.layer))}
            res["removed"] = C.tp_removed(pruner, readers, ffn)
            res["partial_heads"] = any(v == [-1] for k, v in res["removed"].items() if k in readers)
        else:
            n = len(model.model.layers)
            readers = {f"model.layers.{i}.self_attn.o_proj": 64 for i in range(n)}
            heads = C.tp_removed(pruner, readers, set())
            per_kv = [[sum(1 for h in hs if h // 8 == c) for c in range(4)] for hs in heads.values()]
            res["heads_removed_per_kv_group"] = sorted({tuple(x) for x in per_kv})
            res["partial_heads"] = any(hs == [-1] for hs in heads.values())
        res["params_after"] = C.n_params(model)
        pruned = model
    res["total_s"] = res["build_s"] + res["prune_s"]
    y = C.model_output(pruned, inputs)
    res["finite"] = bool(torch.isfinite(y).all())
    res["out_shape_ok"] = tuple(y.shape) == tuple(ref.shape)
    res["shape_problems"] = C.check_shapes(pruned, **TARGET[kind])[:5]
    return res


# ---- orchestration ------------------------------------------------------------------------------


def run_job(kind: str, tool: str, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, tool]
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": kind, "tool": tool, "error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["job_wall_s"] = wall
            return res
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"model": kind, "tool": tool, "error": f"exit {p.returncode}: " + " | ".join(tail)}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds for MiniLM (default 3)")
    ap.add_argument("--rounds-1b", type=int, default=2, help="rounds for the 1.1B Llama (default 2)")
    ap.add_argument("--skip-1b", action="store_true", help="skip the 1.1B Llama")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per MiniLM job")
    ap.add_argument("--timeout-1b", type=float, default=900, help="seconds per 1.1B job")
    ap.add_argument("--json", type=Path, help="also write all raw results here")
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "TOOL"), help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        res = worker(*args.worker)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    C.setup_threads()
    print("build_and_prune:", C.machine_line(), flush=True)
    probe0 = C.matmul_probe()
    print(f"matmul probe before: {probe0:.0f} GFLOP/s", flush=True)
    plan = []
    if not args.skip_minilm:
        plan.append(("minilm", args.rounds, args.timeout))
    if not args.skip_1b:
        plan.append(("llama1b", args.rounds_1b, args.timeout_1b))
    results: list[dict] = []
    for kind, rounds, timeout in plan:
        for r in range(rounds):
            order = ("particlize", "torch-pruning") if r % 2 == 0 else ("torch-pruning", "particlize")
            for tool in order:
                res = run_job(kind, tool, timeout)
                res["round"] = r
                results.append(res)
                brief = res.get("error") or (f"build {res['build_s']:.3f}s prune {res['prune_s']:.3f}s "
                                             f"total {res['total_s']:.3f}s params {res['params_after']:,}")
                print(f"  [{kind} round {r + 1}/{rounds}] {tool}: {brief}", flush=True)
    probe1 = C.matmul_probe()
    print(f"matmul probe after: {probe1:.0f} GFLOP/s (before {probe0:.0f})", flush=True)

    # ---- table
    rows = []
    notes = []
    for kind, rounds, _ in plan:
        by_tool = {t: [x for x in results if x["model"] == kind and x["tool"] == t] for t in ("particlize", "torch-pruning")}
        ratios = []
        for r in range(rounds):
            a = next((x for x in by_tool["particlize"] if x["round"] == r and "error" not in x), None)
            b = next((x for x in by_tool["torch-pruning"] if x["round"] == r and "error" not in x), None)
            if a and b:
                ratios.append(b["total_s"] / a["total_s"])
        for tool, xs in by_tool.items():
            ok = [x for x in xs if "error" not in x]
            errs = [x["error"] for x in xs if "error" in x]
            if not ok:
                rows.append([LABEL[kind], tool, f"FAILED ({len(errs)}/{len(xs)}): {errs[0] if errs else ''}",
                             "", "", "", "", "", ""])
                continue
            checks = []
            x0 = ok[0]
            checks.append("shapes ok" if not any(x["shape_problems"] for x in ok) else "SHAPES: " + "; ".join(x0["shape_problems"]))
            checks.append("finite" if all(x["finite"] for x in ok) else "NON-FINITE OUTPUT")
            if tool == "particlize":
                checks.append(f"= masked (max abs diff {max(x['max_abs_diff_vs_masked'] for x in ok):.1e})"
                              if all(x["masked_equal"] for x in ok) else
                              f"≠ masked (max abs diff {max(x['max_abs_diff_vs_masked'] for x in ok):.1e})")
            if tool == "torch-pruning":
                checks.append("PARTIAL HEADS" if any(x.get("partial_heads") for x in ok) else "whole heads")
                if kind == "llama1b":
                    checks.append(f"heads removed per kv group {ok[0].get('heads_removed_per_kv_group')}")
            if errs:
                checks.append(f"{len(errs)} failed: {errs[0]}")
            ratio = ""
            if tool == "torch-pruning" and ratios:
                ratio = f"{statistics.median(ratios):.2f}×" + (f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else "")
            rows.append([
                LABEL[kind], tool, f"{len(ok)}",
                C.fmt_s(_med([x["build_s"] for x in ok])), C.fmt_s(_med([x["prune_s"] for x in ok])),
                C.fmt_s(_med([x["total_s"] for x in ok])),
                f"{x0['params_before'] / 1e6:.2f}M → {x0['params_after'] / 1e6:.2f}M", ratio, ", ".join(checks),
            ])
            if tool == "particlize":
                dc = _med([x.get("deepcopy_s") for x in ok])
                ps = _med([x.get("plan_step_s") for x in ok])
                notes.append(f"{kind}: particlize prune (median {_med([x['prune_s'] for x in ok]):.2f} s) includes "
                             + (f"a deep copy of the model (copy.deepcopy alone: {dc:.1f} s, measured separately "
                                "in the same process; Torch-Pruning prunes in place) and " if dc is not None else
                                "a deep copy of the model (Torch-Pruning prunes in place) and ")
                             + f"surgery.plan_step (alone: {ps:.2f} s, measured separately)")
        # overlap of the removed sets on MiniLM (different criteria)
        if kind == "minilm":
            a = next((x for x in by_tool["particlize"] if "error" not in x), None)
            b = next((x for x in by_tool["torch-pruning"] if "error" not in x), None)
            if a and b and a.get("removed") and b.get("removed"):
                hs, ns = [], []
                for i in range(6):
                    pa = set(a["removed"][f"encoder.layer.{i}.attention.heads"])
                    pb = set(b["removed"][f"encoder.layer.{i}.attention.output.dense"])
                    hs.append(len(pa & pb))
                    na = set(a["removed"][f"encoder.layer.{i}.intermediate.neurons"])
                    nb = set(b["removed"][f"encoder.layer.{i}.intermediate.dense"])
                    ns.append(len(na & nb))
                notes.append(f"minilm: removed sets shared by both tools per layer — heads {hs} of 6, "
                             f"FFN neurons {ns} of 768 (different importance criteria)")
    print()
    C.print_table(["model", "tool", "runs", "build map (s)", "prune (s)", "total (s)", "params before → after",
                   "TP total / particlize total (median, min–max)", "checks"], rows)
    for kind, rounds, _ in plan:
        print(f"rounds: {kind} {rounds} (tools alternate order per round; median per tool; ratio paired per round)")
    for n in notes:
        print("note:", n)
    drift = abs(probe1 - probe0) / max(probe0, 1e-9)
    print(f"matmul probe: {probe0:.0f} → {probe1:.0f} GFLOP/s ({'moved ' + format(drift, '.0%') if drift > 0.25 else 'stable within 25%'})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"probe": [probe0, probe1], "results": results}, indent=1))
    unequal = [x for x in results if x.get("tool") == "particlize" and "error" not in x and not x.get("masked_equal")]
    if unequal:  # a pruned model that differs from the masked one fails the run, whatever the timings
        print(f"FAIL: {len(unequal)} particlize run(s) differ from the masked model "
              f"(max abs diff {max(x['max_abs_diff_vs_masked'] for x in unequal):.1e})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
