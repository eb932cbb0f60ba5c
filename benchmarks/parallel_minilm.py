"""Particle-parallel on CPU: sharded forward throughput, 2 gloo processes x 1 thread against one process with 1
thread and against one process with 2 threads (the fair baseline: the same two cores); and the parameter bytes
each rank holds for the 1.1B Llama shape at 1-4 ranks, counted on the ``meta`` device (nothing allocated).

    .venv/bin/python benchmarks/parallel_minilm.py [--reps 10] [--rounds 3] [--tiny] [--memory-only] [--force]

Throughput. Models: all-MiniLM-L6-v2 (12 heads, 1536 neurons per layer) and a wider random-init BERT encoder
(hidden 1024, 16 heads, 4096 neurons, 4 layers); ``--tiny`` swaps both for a 2-layer hidden-32 BERT (a smoke
check of the script). Batch 8 x 128 tokens, fp32, inference_mode. Each side is a fresh `launch`: every rank
builds the same model, shards it (one process: nothing is split), checks the output against the whole
model's, runs one warm-up and ``--reps`` timed forwards, and reports the median; a side's examples/s is the
batch over its slowest rank's median. Each round runs the three sides one after the other (order rotated
per round); ratios are paired per round, their median reported with how many rounds agreed. A matmul probe
(GFLOP/s) runs before and after.

Memory (``--memory-only`` for this part alone). TinyLlama's shape (hidden 2048, 22 layers, 32 heads, 4
key/value heads, 5632 neurons, vocab 32000, untied head) built on ``meta``; for each world size the layout
and every rank's shard are built (`shard_model`, no process group needed) and its parameter + buffer bytes
counted (fp32; bf16 halves every number). Two layouts: particlize's (whole key/value groups) and the former
scheme (query heads of every key/value group split, key/value projections replicated) where they differ
(world sizes dividing the 4 key/value heads; over 3 ranks the layout itself replicates k/v).

Writes ``benchmarks/results/parallel-minilm.json`` (``parallel-llama-memory.json`` with ``--memory-only``;
``--out`` to choose; an existing file is kept unless ``--force``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import _common as C
import torch
import transformers as T

import particlize as pz
from particlize.parallel import launch, local_bytes, main_output, shard
from particlize.surgery import layout, shard_model
from particlize.surgery.shard import kv_heads, kv_slices

B, SEQ = 8, 128
SIDES = (("1x1", 1, 1), ("1x2", 1, 2), ("2x1", 2, 1))  # (name, processes, threads per process)


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "minilm":
        return C.load_minilm()
    if name == "tiny":
        cfg = T.BertConfig(vocab_size=30000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=SEQ)
    else:
        cfg = T.BertConfig(vocab_size=30000, hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                           intermediate_size=4096, max_position_embeddings=SEQ)
    return T.BertModel(cfg).eval()


def rank_run(name: str, reps: int, threads: int) -> dict:
    torch.set_num_threads(threads)  # launch sets 1 per process first
    model = build(name)
    batch = C.bert_inputs(B, SEQ)
    with torch.inference_mode():
        ref = main_output(model(**batch))
        part = shard(model)
        del model
        diff = float((main_output(part(**batch)) - ref).abs().max())
        times = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            part(**batch)
            times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times[1:]), "diff": diff, "threads": torch.get_num_threads(),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "param_mb": local_bytes(part) / 2**20}


def throughput(name: str, reps: int, rounds: int) -> dict:
    per_round = []
    for k in range(rounds):
        got = {}
        for side, nproc, threads in SIDES[k % 3:] + SIDES[: k % 3]:
            rows = launch(rank_run, nproc, name, reps, threads, timeout=1800)
            got[side] = {"examples_per_s": B / max(r["median_s"] for r in rows), "ranks": rows}
        per_round.append(got)
    med = {s: statistics.median(r[s]["examples_per_s"] for r in per_round) for s, _, _ in SIDES}
    ratios = {f"2x1/{b}": [r["2x1"]["examples_per_s"] / r[b]["examples_per_s"] for r in per_round] for b in ("1x1", "1x2")}
    return {"median_examples_per_s": med, "ratios": ratios, "rounds": per_round,
            "max_diff": max(x["diff"] for r in per_round for s in r.values() for x in s["ranks"])}


def _former_layout(pm, world: int) -> dict:
    """The former grouped-query layout: query heads of every key/value group split, k/v replicated."""
    lay = layout(pm, world)
    for n in lay:
        g = pm[n]
        if g.balanced > 1:
            chunk = g.size // g.balanced
            cuts = [round(k * chunk / world) for k in range(world + 1)]
            lay[n] = [[kv * chunk + i for kv in range(g.balanced) for i in range(cuts[k], cuts[k + 1])] for k in range(world)]
    return lay


def memory(worlds: list[int]) -> list[dict]:
    with torch.device("meta"):
        model = T.LlamaForCausalLM(C.llama_config())
    pm = pz.decompose(model)
    whole = local_bytes(model)
    rows = []
    for w in worlds:
        kv = pm.groups[0].balanced  # 4 key/value heads: whole groups when the world divides them (module doc)
        for scheme, lay in (("particlize", layout(pm, w)), ("former: k/v replicated", _former_layout(pm, w))):
            if scheme != "particlize" and (w == 1 or kv % w):  # there the layout replicates k/v itself
                continue
            per_rank = [local_bytes(shard_model(pm, r, w, lay).model) for r in range(w)]
            cut = {s.name for n, p in lay.items() for s in (*pm[n].writers, *pm[n].readers,
                                                             *(kv_slices(pm, pm[n]) if kv_heads(pm[n], p) else ()))}
            split = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n in cut)
            rows.append({"world_size": w, "scheme": scheme, "bytes_per_rank": per_rank, "whole_bytes": whole,
                         "replicated_bytes": whole - split, "split_bytes": split})
    return rows


def _write(path: Path, data: dict, force: bool) -> None:
    if path.exists() and not force:
        raise SystemExit(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="a tiny BERT instead of both models (checks the script)")
    ap.add_argument("--memory-only", action="store_true", help="only the 1.1B Llama parameter bytes per rank")
    ap.add_argument("--out", type=Path, help="default benchmarks/results/parallel-minilm.json "
                    "(parallel-llama-memory.json with --memory-only)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    a = ap.parse_args()
    a.out = a.out or C.ROOT / "benchmarks/results" / ("parallel-llama-memory.json" if a.memory_only else "parallel-minilm.json")
    if a.out.exists() and not a.force:
        raise SystemExit(f"{a.out} exists; pass --force to replace it")
    C.start()
    result: dict = {"machine": C.machine_line(), "reps": a.reps, "rounds": a.rounds, "batch": [B, SEQ]}
    if not a.memory_only:
        result["probe_gflops_before"] = C.matmul_probe()
        for name in (["tiny"] if a.tiny else ["minilm", "wide"]):
            r = result[name] = throughput(name, a.reps, a.rounds)
            med, rat = r["median_examples_per_s"], r["ratios"]
            print(f"{name:7s} examples/s (median of {a.rounds} rounds): " +
                  ", ".join(f"{s} {v:.1f}" for s, v in med.items()) + f"; max |sharded - whole| {r['max_diff']:.1e}")
            for k, v in rat.items():
                print(f"{'':7s} {k}: x{statistics.median(v):.2f} (rounds: {', '.join(f'{x:.2f}' for x in v)}; "
                      f"{sum(x > 1 for x in v)}/{len(v)} above 1)")
            ranks = r["rounds"][-1]["2x1"]["ranks"]
            params = ", ".join(f"{x['param_mb']:.1f}" for x in ranks)
            rss = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in ranks)
            print(f"{'':7s} 2x1 per rank: params {params} MB, peak RSS {rss} MB (RSS includes the whole model loaded first)")
        result["probe_gflops_after"] = C.matmul_probe()
        print(f"matmul probe: {result['probe_gflops_before']:.0f} -> {result['probe_gflops_after']:.0f} GFLOP/s")
    result["llama_1b1_memory"] = memory([1, 2, 3, 4])
    for row in result["llama_1b1_memory"]:
        gb = [b / 1e9 for b in row["bytes_per_rank"]]
        print(f"llama-1.1B fp32 world {row['world_size']} ({row['scheme']}): per rank "
              f"{', '.join(f'{x:.3f}' for x in gb)} GB = replicated {row['replicated_bytes'] / 1e9:.3f} + split "
              f"{row['split_bytes'] / 1e9:.3f} / {row['world_size']} (whole model {row['whole_bytes'] / 1e9:.3f} GB)")
    _write(a.out, result, a.force)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
