"""Particle-parallel on CPU: throughput of a sharded forward with 1 vs 2 processes (1 thread each, gloo).

    .venv/bin/python benchmarks/parallel_minilm.py [--reps 10] [--nproc 1 2] [--tiny]

Models: all-MiniLM-L6-v2 (12 heads, 1536 neurons per layer) and a wider random-init BERT encoder (hidden
1024, 16 heads, 4096 neurons, 4 layers); ``--tiny`` swaps both for a 2-layer hidden-32 BERT (a smoke check
of the script). Batch 8 x 128 tokens, fp32, inference_mode. Each rank builds the same model, checks the
sharded output against the whole model's, runs ``--reps`` sharded forwards after a warm-up and reports the
median time; examples/s is the batch over the slowest rank's median. Sides run in the same invocation, one
after the other. Also: the peak resident memory per rank (includes the whole model each rank loads first).
"""

from __future__ import annotations

import argparse
import statistics
import time

import _common as C
import torch
import transformers as T

from particlize.parallel import launch, main_output, shard

B, SEQ = 8, 128


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


def rank_run(name: str, reps: int) -> dict:
    import resource

    torch.set_num_threads(1)
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
    return {"median_s": statistics.median(times[1:]), "diff": diff,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params": sum(p.numel() for p in part.parameters())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tiny", action="store_true", help="a tiny BERT instead of both models (checks the script)")
    a = ap.parse_args()
    print(C.machine_line())
    for name in (["tiny"] if a.tiny else ["minilm", "wide"]):
        base = None
        for n in a.nproc:
            rows = launch(rank_run, n, name, a.reps, timeout=1800)
            slowest = max(r["median_s"] for r in rows)
            ex_s = B / slowest
            base = base or ex_s
            params = ", ".join(f"{r['params'] / 1e6:.1f}M" for r in rows)
            rss = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in rows)
            print(f"{name:7s} nproc={n}: {ex_s:8.1f} examples/s (x{ex_s / base:.2f} vs nproc={a.nproc[0]}), "
                  f"max |sharded - whole| {max(r['diff'] for r in rows):.1e}, params per rank "
                  f"{params}, peak RSS per rank {rss} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
