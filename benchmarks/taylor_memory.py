"""Peak memory of first-order (Taylor) scoring on a Llama, particlize against Torch-Pruning's Taylor step (issue 29).

    .venv/bin/python benchmarks/taylor_memory.py [--shape tinyllama|small] [--batch 4] [--seq 256]
        [--dtype bf16 fp32] [--out PATH] [--force]

The model: TinyLlama-1.1B's shape (hidden 2048, 22 layers, 32 query heads in 4 key/value groups, 5632 FFN neurons,
vocab 32000), random weights drawn straight into ``--dtype`` (N(0, 0.02), norms 1), eval mode; ``--shape small`` is a
2-layer, hidden-512 stand-in to check the script. One batch of ``--batch`` × ``--seq`` random token ids, the
next-token cross-entropy on both sides (particlize's per-example loss also scores the last position against the
first token, wrapped round: one position in ``--seq`` more, the same forward and backward).

Every measurement is a fresh process (1 thread) that builds the model, runs one forward without gradients (so the
baseline holds the weights and an inference pass), then does one thing; its extra memory is the process's peak RSS
(``getrusage``) after it minus before it:

- ``particlize``: ``pz.analyze(pm, batch, "taylor")``, every head and FFN neuron group (gate gradients only);
- ``particlize, parameters requiring grad``: the same with the parameters left requiring gradients (what
  particlize did before it froze them while scoring; autograd then keeps every layer's input for a weight gradient);
- ``Torch-Pruning``: its LLM recipe (heads per kv group and FFN channels, 30%) with ``GroupTaylorImportance``:
  one ``backward`` of the same loss into the weights' ``.grad``, then ``pruner.step()``, which reads the gradients
  and prunes (skipped with a note when torch_pruning does not import).

Writes JSON to ``--out`` (default ``benchmarks/results/taylor-memory-<shape>.json``; kept unless ``--force``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import _common as C
import torch

SIDES = ("particlize", "particlize-live", "torch-pruning")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
FRACTION = 0.3


def _peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


def _model(shape: str, dtype: torch.dtype) -> torch.nn.Module:
    """The Llama, drawn into ``dtype`` without an fp32 copy (a 1.1B fp32 init on the host takes a minute)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.device("meta"):
        model = LlamaForCausalLM(C.llama_config(shape == "small"))
    model = model.to_empty(device="cpu").to(dtype)
    model.model.rotary_emb = LlamaRotaryEmbedding(model.config)  # its frequencies computed, not left empty
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
    return model.eval()


def child(side: str, shape: str, dtype: str, batch: int, seq: int) -> dict:
    """One measurement in this process: ``{"extra_gib", "peak_gib", "base_gib", "seconds"}``."""
    import particlize as pz

    torch.set_num_threads(1)
    model = _model(shape, DTYPES[dtype])
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    loss = lambda logits: torch.nn.functional.cross_entropy(  # noqa: E731
        logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    with torch.no_grad():
        model(ids)
    if side == "torch-pruning":
        import torch_pruning as tp
        from _gpu_scale import _tp_pruner

        pruner = _tp_pruner(model, ids[:1, :8], FRACTION, 4, tp.importance.GroupTaylorImportance())
    else:
        pm = pz.decompose(model)
        batches = [(ids, torch.cat([ids[:, 1:], ids[:, :1]], 1))]  # targets: the next token (the last wraps round)
        groups = [g.name for g in pm.groups if g.kind in ("head", "neuron")]
    base = _peak_gib()
    t = time.perf_counter()
    if side == "torch-pruning":
        model.zero_grad()
        loss(model(ids).logits).backward()
        pruner.step()
    else:
        ctx = contextlib.nullcontext()
        if side == "particlize-live":
            import importlib

            taylor = importlib.import_module("particlize.analysis.taylor")
            ctx = _unfrozen(taylor)
        with ctx:
            pz.analyze(pm, batches, "taylor", groups=groups, table=False, progress=False)
    seconds = time.perf_counter() - t
    peak = _peak_gib()
    return {"side": side, "base_gib": round(base, 3), "peak_gib": round(peak, 3), "extra_gib": round(peak - base, 3),
            "seconds": round(seconds, 1)}


@contextlib.contextmanager
def _unfrozen(taylor_module):
    real = taylor_module.frozen
    taylor_module.frozen = lambda m: contextlib.nullcontext()
    try:
        yield
    finally:
        taylor_module.frozen = real


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=["tinyllama", "small"], default="tinyllama")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bf16", "fp32"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.shape, args.child[1], args.batch, args.seq)))
        return 0
    out = args.out or C.ROOT / "benchmarks" / "results" / f"taylor-memory-{args.shape}.json"
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists; pass --force to replace it")
    C.start()
    try:
        import torch_pruning  # noqa: F401
        sides = SIDES
    except ImportError:
        print("torch_pruning does not import: its column is left out")
        sides = SIDES[:2]
    rows = []
    for dtype in args.dtype:
        for side in sides:
            cmd = [sys.executable, __file__, "--shape", args.shape, "--batch", str(args.batch), "--seq", str(args.seq),
                   "--child", side, dtype]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
            if res.returncode:
                print(res.stderr[-2000:])
                raise SystemExit(f"the {side} {dtype} measurement failed (exit {res.returncode})")
            row = {"dtype": dtype, **json.loads(res.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{dtype:5s} {side:24s} extra {row['extra_gib']:6.2f} GiB (peak {row['peak_gib']:.2f}, "
                  f"base {row['base_gib']:.2f})  {row['seconds']:.1f} s", flush=True)
    table = []
    for dtype in args.dtype:
        by = {r["side"]: r for r in rows if r["dtype"] == dtype}
        tp_extra = by.get("torch-pruning", {}).get("extra_gib")
        for side, r in by.items():
            table.append([dtype, side, f"{r['extra_gib']:.2f}", f"{r['peak_gib']:.2f}", f"{r['seconds']:.1f}",
                          f"{r['extra_gib'] / tp_extra:.2f}×" if tp_extra else "—"])
    C.print_table(["dtype", "side", "extra GiB", "peak GiB", "s", "extra / Torch-Pruning's"], table)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": C.machine_line(), "shape": args.shape, "batch": args.batch, "seq": args.seq,
                               "rows": rows}, indent=1) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
