"""The grouped expert path of a MoEfied FFN, side by side: dense FFN vs the previous per-expert loop vs the two
layouts of `ExpertFFN.grouped` (blocks, segments) and its default choice between them.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/moefy_grouped.py --model out/minilm-vader \\
        [--active 16 8 4] [--tokens 2048 64] [--whole] [--json benchmarks/results/moefy-grouped.json]

One FFN of the MiniLM sentiment classifier (layer 0: 1,536 neurons -> 32 experts of 48) made a mixture of
experts by `pz.moefy` (its router trained on calibration sentences, so the routing is as unbalanced as a real
router's), timed on its real inputs: the first ``tokens`` FFN inputs of the latency batch (32 sentences padded
to 64 tokens). Sides, interleaved round by round (the order rotates), 2 threads, inference_mode:
- dense: the original FFN, every neuron (one up and one down matmul);
- loop: the grouped path as it was before (sort pairs by expert, then per expert: ``index_select`` its tokens,
  two matmuls on weight slices, ``index_add`` into the output) — reproduced here as the baseline;
- blocks: ``grouped(x, "blocks")`` — each expert's pairs in equal blocks of rows, one ``bmm`` per projection for
  all blocks (weights gathered per block, or views when one block per expert), one gather back, a sum over k;
- segments: ``grouped(x, "segments")`` — one expert at a time over its run of sorted pairs: ``index_select``,
  ``addmm`` on weight views, the activation, a matmul with the cached ``[E, m, d_out]`` down weights, an
  in-place ``index_add_``;
- auto: ``grouped(x)``, the default (segments on one thread, blocks on more).
Reported: median ms per side, the paired ratio per round (dense / side) and how many rounds auto beat the old
loop; the routing's imbalance (the busiest expert's pairs over the mean: what one block per expert would pad
to). ``--whole``: also the whole classifier (every FFN MoEfied, batch 32 x 64), old loop vs the default. Every side is checked against the dense-masked reference (<= 1e-4) before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, matmul_probe, setup_threads  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.sources import load_model, load_tokenizer  # noqa: E402
from particlize.surgery import ExpertFFN  # noqa: E402
from particlize.tasks import get_task  # noqa: E402

B, SEQ = 32, 64


def loop_grouped(ffn: ExpertFFN, x: torch.Tensor) -> torch.Tensor:
    """The grouped path before the batched one (verbatim logic): one Python iteration per expert."""
    lead, d = x.shape[:-1], x.shape[-1]
    xf = x.reshape(-1, d)
    k, m = min(ffn.active, ffn.num_experts), ffn.expert_size
    top = ffn.router(xf).topk(k, dim=-1).indices.reshape(-1)
    order = top.argsort(stable=True)
    tokens = order // k
    counts = torch.bincount(top, minlength=ffn.num_experts).tolist()
    w_down = ffn.linear("down").weight
    out = xf.new_zeros(xf.shape[0], w_down.shape[0])
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        idx = tokens[start:start + c]
        start += c
        rows = slice(e * m, (e + 1) * m)
        h = ffn.hidden(xf.index_select(0, idx), rows)
        out = out.index_add(0, idx, F.linear(h, w_down[:, rows]))
    if ffn.linear("down").bias is not None:
        out = out + ffn.linear("down").bias
    return out.reshape(*lead, w_down.shape[0])


def interleaved(sides: dict, rounds: int, reps: int) -> dict[str, list[float]]:
    """ms per call of each side per round (median of ``reps`` calls), sides rotating their order each round."""
    names = list(sides)
    times: dict[str, list[float]] = {k: [] for k in names}
    with torch.inference_mode():
        for f in sides.values():  # warm-up
            f()
        for r in range(rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:
                run = []
                for _ in range(reps):
                    t = time.perf_counter()
                    sides[k]()
                    run.append(time.perf_counter() - t)
                times[k].append(1000 * statistics.median(run))
    return times


def summary(times: dict[str, list[float]]) -> dict:
    dense = times["dense"]
    out = {k: {"ms": statistics.median(v), "speedup_vs_dense": statistics.median([a / b for a, b in zip(dense, v)])}
           for k, v in times.items()}
    if "loop" in times and "auto" in times:
        pairs = [a / b for a, b in zip(times["loop"], times["auto"])]
        out["auto"]["speedup_vs_loop"] = statistics.median(pairs)
        out["auto"]["rounds_faster_than_loop"] = f"{sum(p > 1 for p in pairs)}/{len(pairs)}"
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/minilm-vader")
    ap.add_argument("--task", default="vader-sentiment")
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--active", type=int, nargs="+", default=[16, 8, 4])
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 64])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--whole", action="store_true", help="also the whole classifier, every FFN MoEfied")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the benchmarks' 2)")
    args = ap.parse_args()
    setup_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(), flush=True)
    probe0 = matmul_probe()
    task = get_task(args.task)
    dense, tok = load_model(args.model).eval(), load_tokenizer(args.model)
    calib = task.calibration(dense, tok, batch_size=32, max_length=SEQ, limit=args.calib, seed=0)
    inputs = task.latency_inputs(tok, batch=B, seq=SEQ)
    pm = pz.decompose(dense, seq_len=SEQ)
    groups = [g.name for g in pm.select("neuron")]
    t = time.time()
    moe = pz.moefy(dense, calib, experts=args.experts, active=4, groups=groups if args.whole else groups[:1])
    print(f"moefy: {time.time() - t:.0f} s", flush=True)
    ffn = next(m for m in moe.modules() if isinstance(m, ExpertFFN))
    seen: list[torch.Tensor] = []
    h = ffn.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        moe(**inputs)
    h.remove()
    x_all = seen[0].clone()
    up, down = ffn.linear("up"), ffn.linear("down")
    results: dict = {"machine": machine_line(), "ffn": f"{up.out_features} neurons, {ffn.num_experts} experts of "
                     f"{ffn.expert_size}, d {up.in_features}", "rows": []}
    cols = ("dense", "loop", "blocks", "segments", "auto")
    print(f"{'tokens':>6} {'k':>3} {'imbalance':>9}  " + "  ".join(f"{s:>22}" for s in cols) + "  auto vs loop", flush=True)
    for n in args.tokens:
        x = x_all[:n]
        for k in args.active:
            ffn.active = k
            with torch.inference_mode():
                ref = ffn.masked(x)
                for f in (ffn.grouped, lambda v: ffn.grouped(v, "blocks"), lambda v: ffn.grouped(v, "segments"),
                          lambda v: loop_grouped(ffn, v)):
                    assert torch.allclose(f(x), ref, atol=1e-4, rtol=0)
                counts = torch.bincount(ffn.router(x).topk(k, -1).indices.reshape(-1), minlength=ffn.num_experts)
            imbalance = float(counts.max()) / (n * k / ffn.num_experts)
            sides = {"dense": lambda: down(ffn.hidden(x)), "loop": lambda: loop_grouped(ffn, x),
                     "blocks": lambda: ffn.grouped(x, "blocks"), "segments": lambda: ffn.grouped(x, "segments"),
                     "auto": lambda: ffn.grouped(x)}
            s = summary(interleaved(sides, args.rounds, args.reps))
            row = {"tokens": n, "active": k, "experts": ffn.num_experts, "imbalance": imbalance, **s}
            results["rows"].append(row)
            cells = "  ".join(f"{s[c]['ms']:8.2f} ms ({s[c]['speedup_vs_dense']:4.2f}x)" for c in cols)
            print(f"{n:>6} {k:>3} {imbalance:>9.2f}  {cells}  {s['auto']['speedup_vs_loop']:.2f}x "
                  f"({s['auto']['rounds_faster_than_loop']} rounds)", flush=True)
    if args.whole:
        ffns = [m for m in moe.modules() if isinstance(m, ExpertFFN)]
        for k in args.active:
            for f in ffns:
                f.active = k
            default = {f: f.grouped for f in ffns}

            def with_loop():
                for f in ffns:
                    f.grouped = lambda v, f=f: loop_grouped(f, v)
                try:
                    return moe(**inputs)
                finally:
                    for f in ffns:
                        del f.grouped

            sides = {"dense": lambda: dense(**inputs), "loop": with_loop, "auto": lambda: moe(**inputs)}
            s = summary(interleaved(sides, max(5, args.rounds // 2), args.reps))
            assert all(f.grouped == default[f] for f in ffns)
            results["rows"].append({"whole_model": True, "tokens": B * SEQ, "active": k, "experts": args.experts, **s})
            print(f"whole classifier, k={k}: " + ", ".join(f"{c} {s[c]['ms']:.1f} ms ({s[c]['speedup_vs_dense']:.2f}x)"
                                                         for c in ("dense", "loop", "auto")), flush=True)
    probe1 = matmul_probe()
    results["probe_gflops"] = [probe0, probe1]
    print(f"matmul probe: {probe0:.0f} GFLOP/s before, {probe1:.0f} after", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(f".{args.json.name}.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
