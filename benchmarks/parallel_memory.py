"""Measured peak memory per rank of the 1.1B Llama shape, sharded over 1, 2 and 4 gloo processes on CPU.

    .venv/bin/python benchmarks/parallel_memory.py [--worlds 1 2 4] [--tokens 16] [--small] [--out PATH] [--force]

TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 query heads, 4 key/value heads, 5632 FFN neurons, vocab 32000,
untied head), random init, fp32. Every rank is a fresh spawned process (`particlize.parallel.launch`, 1 thread)
that never holds the whole model:

1. builds the model inside `empty_parameters` (parameters on ``meta``, buffers real);
2. shards it (`shard`: this rank's heads, key/value groups and neurons; shapes only);
3. `materialize`s its share (each tensor drawn whole from a generator seeded by its name, then cut: the
   share equals the same slice of the whole model initialised with the seed);
4. runs one forward of batch 1 x ``--tokens`` tokens through the sharded model (inference mode).

Reported per rank: the peak RSS (``getrusage`` max RSS) on entering the rank function (an interpreter with
torch, transformers and particlize imported and the process group up), after building on meta (the baseline:
everything but the weights), after materialising and after the forward; the model's share = the last minus the
baseline; the parameter bytes the shard holds (counted, as the
``--memory-only`` part of ``parallel_minilm.py`` counts them). Also the max RSS of a bare
``python -c "import torch"``. The last-token logits of every world size are compared with those of one process
(the same weights, by the seeded init). ``--small`` swaps in a 2-layer hidden-512 shape to check the script.

Writes ``benchmarks/results/parallel-llama-rss.json`` (``--out``; an existing file is kept unless ``--force``).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import _common as C
import torch
import transformers as T

from particlize.parallel import empty_parameters, launch, local_bytes, materialize, shard
from particlize import decompose
from particlize.surgery import layout
from particlize.surgery.shard import kv_heads, kv_slices


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rank_run(small: bool, tokens: int) -> dict:
    """One rank: build on meta, shard, materialise the share, one forward; the memory at each step."""
    baseline = _peak_mb()
    t0 = time.perf_counter()
    with empty_parameters():
        model = T.LlamaForCausalLM(C.llama_config(small)).eval()
    built = _peak_mb()
    part = materialize(shard(model), seed=0)
    del model
    materialised, rss_after = _peak_mb(), _rss_mb()
    ids = torch.randint(0, part.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = part(input_ids=ids).logits[0, -1].tolist()  # a list: a tensor would travel as shared memory
    return {"baseline_mb": baseline, "after_build_mb": built, "after_materialize_mb": materialised,
            "rss_after_materialize_mb": rss_after, "peak_mb": _peak_mb(), "param_bytes": local_bytes(part),
            "seconds": time.perf_counter() - t0, "logits": logits, "threads": torch.get_num_threads()}


def bare_torch_mb() -> float:
    code = "import resource, torch; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def split_bytes(small: bool, world: int) -> tuple[int, int]:
    """``(replicated, split)`` parameter bytes of the layout over ``world`` ranks (counted on meta)."""
    with torch.device("meta"):
        model = T.LlamaForCausalLM(C.llama_config(small))
    pm = decompose(model)
    lay = layout(pm, world)
    cut = {s.name for n, p in lay.items()
           for s in (*pm[n].writers, *pm[n].readers, *(kv_slices(pm, pm[n]) if kv_heads(pm[n], p) else ()))}
    whole = local_bytes(model)
    split = sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n in cut)
    return whole - split, split


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--small", action="store_true", help="a 2-layer hidden-512 Llama (checks the script)")
    ap.add_argument("--out", type=Path, default=C.ROOT / "benchmarks/results/parallel-llama-rss.json")
    ap.add_argument("--force", action="store_true", help="replace an existing --out")
    a = ap.parse_args()
    if a.out.exists() and not a.force:
        raise SystemExit(f"{a.out} exists; pass --force to replace it")
    C.start()
    bare = bare_torch_mb()
    print(f"bare interpreter with torch imported: max RSS {bare:.0f} MB")
    rows, ref = [], None
    for world in a.worlds:
        t0 = time.perf_counter()
        ranks = launch(rank_run, world, a.small, a.tokens, timeout=900)
        wall = time.perf_counter() - t0
        ref = torch.tensor(ranks[0]["logits"]) if ref is None else ref
        diff = max(float((torch.tensor(r["logits"]) - ref).abs().max()) for r in ranks)
        rep, split = split_bytes(a.small, world)
        for r in ranks:
            del r["logits"]
        rows.append({"world_size": world, "wall_s": wall, "max_abs_logit_diff_vs_first": diff,
                     "replicated_bytes": rep, "split_bytes": split, "ranks": ranks})
        print(f"world {world} ({wall:.0f} s): |logits - world {a.worlds[0]}| {diff:.1e}; counted "
              f"{rep / 1e9:.3f} + {split / 1e9:.3f}/{world} = {(rep + split / world) / 1e9:.3f} GB per rank")
        for k, r in enumerate(ranks):
            print(f"  rank {k}: params {r['param_bytes'] / 1e9:.3f} GB | peak RSS: on entry {r['baseline_mb']:.0f} MB, "
                  f"built on meta {r['after_build_mb']:.0f}, materialised {r['after_materialize_mb']:.0f}, after the "
                  f"forward {r['peak_mb']:.0f} (the model's share: {(r['peak_mb'] - r['after_build_mb']) * 2**20 / 1e9:.3f} GB "
                  f"= {(r['peak_mb'] - r['after_build_mb']) * 2**20 / r['param_bytes']:.2f}x params)")
    result = {"machine": C.machine_line(), "small": a.small, "tokens": a.tokens, "bare_torch_max_rss_mb": bare,
              "worlds": rows}
    C.write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
