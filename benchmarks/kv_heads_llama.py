"""Key/value heads vs query heads as the granularity of attention pruning on a GQA Llama (issue 29).

Under grouped-query attention, pruning *query* heads (what particlize's ``heads`` and Torch-Pruning do: the same
number from every key/value group) leaves every key and value head, so the KV cache and the k/v projections
stay; pruning whole *key/value* heads (``kv_heads``: a key/value head with all its query heads) removes the same
query heads' attention and shrinks the cache too. Both are cut here to the same number of query heads per
layer, measured side by side in one run (sides interleaved per round, medians and paired ratios):

- params, FLOPs per token (``pm.cost``, checked against the decomposed pruned model), KV-cache bytes per token;
- greedy decoding with the cache (prefill ``--prompt`` tokens, then ``--new`` tokens), and one long prefill;
- masked == pruned for the kv-head cut (max |diff| of logits).

A random-init model: this is about cost and speed, not quality (which needs a trained GQA model and recovery).

    HF_HUB_OFFLINE=1 python benchmarks/kv_heads_llama.py --json benchmarks/results/kv-heads.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from _common import machine_line, matmul_probe, setup_threads

import particlize as pz


def build(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv, intermediate_size=args.ffn, vocab_size=1000,
                      max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


def plans(pm: pz.ParticleMap, cut: int) -> dict[str, dict[str, list[int]]]:
    """``cut`` of every layer's key/value heads (with their query heads), or as many query heads taken evenly
    from every key/value group: the same query heads per layer go either way. The first ones (random init)."""
    kv, heads = pm.select("kv_head"), {g.name: g for g in pm.select("head")}
    out: dict[str, dict[str, list[int]]] = {"kv_heads": {}, "heads": {}}
    for g in kv:
        h = heads[g.contains]
        c = h.size // g.size  # query heads per key/value head
        out["kv_heads"][g.name] = list(range(cut))
        per = cut * c // g.size  # from each of the g.size key/value groups
        out["heads"][h.name] = [k * c + j for k in range(g.size) for j in range(per)]
    return out


def kv_cache_bytes(model: torch.nn.Module) -> int:
    """Bytes of key and value cache per token (fp32) of the model's attention layers."""
    return sum(2 * m.k_proj.out_features * 4 for m in model.modules() if hasattr(m, "k_proj"))


def timed(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--ffn", type=int, default=2816)
    ap.add_argument("--cut", type=int, default=2, help="key/value heads removed per layer (of --kv)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--long", type=int, default=1024, help="tokens of the one-sequence long prefill")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    setup_threads()
    print("machine:", machine_line(), flush=True)
    probe0 = matmul_probe()
    model = build(args)
    pm = pz.decompose(model, seq_len=args.prompt + args.new)
    models = {"dense": model}
    info: dict[str, dict[str, float]] = {"dense": {"params": pm.cost().params, "flops": pm.cost().flops}}
    ids = torch.randint(0, 1000, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    for side, remove in plans(pm, args.cut).items():
        small = pm.prune(remove).eval()
        again = pz.decompose(small, seq_len=pm.seq_len).cost()
        predicted = pm.cost(remove)
        assert predicted.params == again.params and abs(predicted.flops - again.flops) <= 1e-9 * again.flops
        models[side] = small
        info[side] = {"params": predicted.params, "flops": predicted.flops}
        if side == "kv_heads":
            with torch.no_grad(), pm.ablate(remove) as gated:
                masked = gated(ids).logits
            with torch.no_grad():
                info[side]["masked_vs_pruned_max_abs"] = float((small(ids).logits - masked).abs().max())
    for side, m in models.items():
        info[side]["kv_cache_bytes_per_token"] = kv_cache_bytes(m)
        info[side]["query_heads"] = sum(m.get_submodule(f"model.layers.{i}.self_attn").q_proj.out_features
                                        for i in range(args.layers)) // (args.hidden // args.heads)
    long_ids = torch.randint(0, 1000, (1, args.long), generator=torch.Generator().manual_seed(2))
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    decode: dict[str, list[float]] = {s: [] for s in models}
    prefill: dict[str, list[float]] = {s: [] for s in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            m.generate(ids[:, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)
            m(long_ids[:, :64])
        for r in range(args.rounds):
            for side, m in models.items():  # interleaved: dense, kv_heads, heads, dense, ...
                decode[side].append(timed(lambda: m.generate(ids, **gen), 1))
                prefill[side].append(timed(lambda: m(long_ids), 1))
            print(f"round {r + 1}: " + ", ".join(f"{s} decode {decode[s][-1]:.3f}s prefill {prefill[s][-1]:.3f}s"
                                                 for s in models), flush=True)
    probe1 = matmul_probe()
    rows = []
    for side in models:
        d_ratio = [decode["dense"][i] / decode[side][i] for i in range(args.rounds)]
        p_ratio = [prefill["dense"][i] / prefill[side][i] for i in range(args.rounds)]
        info[side].update(decode_s=statistics.median(decode[side]), prefill_s=statistics.median(prefill[side]),
                          decode_speedup=statistics.median(d_ratio), prefill_speedup=statistics.median(p_ratio),
                          decode_rounds_faster=sum(x > 1 for x in d_ratio), prefill_rounds_faster=sum(x > 1 for x in p_ratio))
        i, d = info[side], info["dense"]
        rows.append(f"| {side} | {i['query_heads']} | {i['params'] / d['params']:.3f} | {i['flops'] / d['flops']:.3f} | "
                    f"{i['kv_cache_bytes_per_token'] / d['kv_cache_bytes_per_token']:.3f} | "
                    f"{i['decode_speedup']:.2f}x ({i['decode_rounds_faster']}/{args.rounds}) | "
                    f"{i['prefill_speedup']:.2f}x ({i['prefill_rounds_faster']}/{args.rounds}) |")
    print(f"matmul probe: {probe0:.0f} -> {probe1:.0f} GFLOP/s")
    print("| cut | query heads | params | FLOPs/token | KV cache | decode speed-up vs dense (rounds faster) | "
          f"prefill {args.long} speed-up |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    kv, hd = info["kv_heads"], info["heads"]
    print(f"kv_heads vs heads (same query heads removed): decode {statistics.median(decode['heads']) / statistics.median(decode['kv_heads']):.2f}x, "
          f"KV cache {kv['kv_cache_bytes_per_token'] / hd['kv_cache_bytes_per_token']:.2f}, masked vs pruned max |diff| "
          f"{kv['masked_vs_pruned_max_abs']:.1e}")
    if args.json:
        out = {"machine": machine_line(), "args": vars(args) | {"json": str(args.json)}, "probe_gflops": [probe0, probe1],
               "sides": info, "decode_s": decode, "prefill_s": prefill}
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, indent=1))
        tmp.replace(args.json)


if __name__ == "__main__":
    main()
