"""The scale rows of `gpu_check.py`: the 1.1B Llama (TinyLlama shape, random weights) cut by 30% of its heads
and FFN neurons, unaligned and aligned, against Torch-Pruning's cut; its whole path (decompose, Taylor scores,
prune, save, load) with peak memory; key/value heads as a granularity; and the Sora-style DiT sampler.
"""

from __future__ import annotations

import copy
import math
import tempfile
from typing import Any

import _common as C
import torch

from _gpu_common import (Ctx, ForwardTimer, MissingAPI, build_llama, interleaved, kv_head_groups, llama_config,
                         llama_ids, med, paired, peak_gib, peer, reset_peak, timed, version)

FRACTION = 0.3  # heads and FFN neurons removed (issue 29's Llama rows)
TARGET_LLAMA, TARGET_DIT = 1.0, 1.8


def llama_plan(pm: Any, fraction: float, multiple: int = 1) -> dict[str, list[int]]:
    """Remove ``fraction`` of every layer's heads (the same number per key/value group) and FFN neurons, the
    smallest writer-row L2 first; ``multiple``: the kept neurons rounded down to a multiple of it."""
    remove: dict[str, list[int]] = {}
    for g in pm.groups:
        if g.kind not in ("head", "neuron"):
            continue
        score = C.writer_l2(pm.model, g)
        chunks = max(g.balanced, 1) if g.kind == "head" else 1
        per = g.size // chunks
        k = round(per * fraction)
        if g.kind == "neuron" and multiple > 1:
            k = per - (per - k) // multiple * multiple
        idx: list[int] = []
        for c in range(chunks):
            idx += (torch.topk(score[c * per:(c + 1) * per], k, largest=False).indices + c * per).tolist()
        remove[g.name] = sorted(idx)
    return remove


def _tp_pruner(model: Any, example: torch.Tensor, fraction: float, round_to: int | None, importance: Any = None) -> Any:
    """Torch-Pruning's LLM recipe on the Llama: heads (whole query heads per kv group) and FFN channels,
    ``round_to`` on the channels, the residual stream kept (o_proj, down_proj and lm_head ignored)."""
    import torch_pruning as tp

    cfg, num_heads, ignored = model.config, {}, [model.lm_head]
    for layer in model.model.layers:
        a = layer.self_attn
        num_heads.update({a.q_proj: cfg.num_attention_heads, a.k_proj: cfg.num_key_value_heads,
                          a.v_proj: cfg.num_key_value_heads})
        ignored += [a.o_proj, layer.mlp.down_proj]
    return tp.pruner.BasePruner(
        model, example, importance=importance or tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=fraction,
        ignored_layers=ignored, global_pruning=False, num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=fraction, round_to=round_to, output_transform=lambda o: o.logits.sum())


def _tp_shape_plan(pm: Any, fraction: float, round_to: int) -> dict[str, list[int]]:
    """The shapes Torch-Pruning's run gives (BENCHMARKING.md: head ratios rounded up per kv group, channel
    counts removed rounded up to ``round_to``), cut with particlize's surgery when Torch-Pruning is absent."""
    remove = {}
    for g in pm.groups:
        if g.kind == "head":
            per = g.size // max(g.balanced, 1)
            k = math.ceil(per * fraction)
            remove[g.name] = [c * per + j for c in range(max(g.balanced, 1)) for j in range(per - k, per)]
        elif g.kind == "neuron":
            k = math.ceil(g.size * fraction / round_to) * round_to
            remove[g.name] = list(range(g.size - k, g.size))
    return remove


def llama_times(ctx: Ctx) -> dict[str, Any]:
    """bf16 forwards of the dense Llama and its 30% cuts (unaligned, neurons a multiple of 64, Torch-Pruning
    ``round_to=4``) at ``llama_shape``, interleaved rounds; paired speedups against dense."""

    def run() -> dict[str, Any]:
        import particlize as pz

        reset_peak(ctx)
        dense = build_llama(ctx, torch.bfloat16)
        pm = pz.decompose(dense)
        B, T = ctx.cfg.llama_shape
        x = llama_ids(ctx, B, T, dense.config.vocab_size)
        models = {"dense": dense, "unaligned": pm.prune(llama_plan(pm, FRACTION)),
                  "aligned64": pm.prune(llama_plan(pm, FRACTION, 64))}
        tp, why = peer("torch_pruning")
        if tp is not None:
            cut = copy.deepcopy(dense)
            _tp_pruner(cut, x[:1, :8], FRACTION, 4).step()
            C.tp_fix_attributes(cut)
            models["tp_round_to_4"], source = cut, f"torch-pruning {version(tp)}"
        else:  # its column stays empty; its shapes, cut by particlize, are timed for the details only
            models["tp_shapes"] = pm.prune(_tp_shape_plan(pm, FRACTION, 4))
            source = why
        timers = {k: ForwardTimer(ctx, m, x) for k, m in models.items()}
        t = interleaved(ctx, {k: (lambda tm=tm: tm(ctx.cfg.llama_reps)) for k, tm in timers.items()}, ctx.cfg.llama_rounds)
        flops = {k: pz.decompose(m, seq_len=T).cost().flops for k, m in models.items()}
        widths = {k: C.layer_shapes(m)[0] for k, m in models.items()}
        out = {k: {"speedup": paired(t, "dense", k), "flops_kept": flops[k] / flops["dense"], "layer0": widths[k],
                   "ms": med(t[k]) * 1e3 / ctx.cfg.llama_reps} for k in models}  # each timed call ran llama_reps forwards
        del timers, models
        return {"cuts": out, "peer_source": source, "shape": f"{B}x{T}"}

    return ctx.once("llama_times", run)


def _llama_name(ctx: Ctx) -> str:
    return "small Llama (2 layers x 256)" if ctx.cfg.small else "1.1B Llama"


def _llama_row(ctx: Ctx, name: str, what: str) -> dict[str, Any]:
    res = llama_times(ctx)
    me, tp = res["cuts"][name], res["cuts"].get("tp_round_to_4")
    tp_speedup = tp["speedup"] if tp else None
    return {"what": f"{what}, bf16 {res['shape']}, 30% heads + neurons ({me['layer0']['ffn']} neurons): speedup vs dense",
            "unit": "ms", "particlize": me["ms"], "peer": {"torch-pruning round_to 4": tp_speedup},
            "ratio": me["speedup"], "target": f"> {TARGET_LLAMA:g}x dense and >= Torch-Pruning's speedup",
            "passed": me["speedup"] > TARGET_LLAMA and (tp_speedup is None or me["speedup"] >= tp_speedup),
            "details": {**me, "per_flop": me["speedup"] * me["flops_kept"], "peer_source": res["peer_source"],
                        "tp": tp, "tp_shapes_cut_by_particlize": res["cuts"].get("tp_shapes"),
                        "dense_ms": res["cuts"]["dense"]["ms"]}}


def row_llama_unaligned(ctx: Ctx) -> dict[str, Any]:
    """1.1B Llama cut by 30% of its heads and neurons, widths as they fall, against dense and Torch-Pruning."""
    return _llama_row(ctx, "unaligned", f"{_llama_name(ctx)} unaligned")


def row_llama_aligned(ctx: Ctx) -> dict[str, Any]:
    """1.1B Llama cut by 30% of its heads and neurons, neurons kept a multiple of 64, against dense and Torch-Pruning."""
    return _llama_row(ctx, "aligned64", f"{_llama_name(ctx)} neurons x64")


def taylor_bf16(pm: Any, batches: list[Any]) -> Any:
    """Taylor scores of a bf16 model with fp32 accumulation: on a bf16/fp16 model the library's gates are fp32
    leaves and the per-example sums float64 (`particlize.analysis.taylor.GATE_DTYPE`)."""
    import particlize as pz

    return pz.analyze(pm, batches, method="taylor", table=False)


def row_llama_path(ctx: Ctx) -> dict[str, Any]:
    """decompose → Taylor (fp32; bf16 with fp32 accumulation) → prune → save → load of the 1.1B Llama, timed, with
    peak GPU memory; Torch-Pruning's graph build and Taylor step beside it when importable."""
    import particlize as pz

    B, T = ctx.cfg.taylor_shape
    d: dict[str, Any] = {}
    model = build_llama(ctx, torch.float32)
    ids = llama_ids(ctx, B, T, model.config.vocab_size, seed=1)
    d["decompose_s"], pm = timed(ctx, lambda: pz.decompose(model))
    reset_peak(ctx)
    d["taylor_fp32_s"], _ = timed(ctx, lambda: pz.analyze(pm, [(ids, ids)], method="taylor", table=False))
    d["taylor_fp32_peak_gib"] = peak_gib(ctx)
    plan = llama_plan(pm, FRACTION, 64)
    d["prune_s"], small = timed(ctx, lambda: pm.prune(plan))
    with tempfile.TemporaryDirectory() as tmp:
        d["save_s"], _ = timed(ctx, lambda: pz.save(small, f"{tmp}/m"))
        d["load_s"], again = timed(ctx, lambda: pz.load(f"{tmp}/m", device=ctx.device))
        with torch.inference_mode():
            d["load_max_abs_diff"] = float((again(ids).logits - small(ids).logits).abs().max())
    del small, again
    bf = model.to(torch.bfloat16)
    pm = pz.decompose(bf)
    reset_peak(ctx)
    try:
        d["taylor_bf16_s"], _ = timed(ctx, lambda: taylor_bf16(pm, [(ids, ids)]))
        d["taylor_bf16_peak_gib"] = peak_gib(ctx)
    except MissingAPI as e:
        d["taylor_bf16_error"] = str(e)
    tp, why = peer("torch_pruning")
    if tp is not None:
        reset_peak(ctx)
        d["tp_graph_s"], pruner = timed(ctx, lambda: _tp_pruner(bf, ids[:1, :8], FRACTION, 4, tp.importance.GroupTaylorImportance()))

        def tp_step() -> None:
            bf.zero_grad()
            bf(ids).logits.float().logsumexp(-1).mean().backward()
            pruner.step()

        d["tp_taylor_step_s"], _ = timed(ctx, tp_step)
        d["tp_peak_gib"] = peak_gib(ctx)
    else:
        d["tp"] = why
    total = d["decompose_s"] + d["taylor_fp32_s"] + d["prune_s"] + d["save_s"] + d["load_s"]
    # memory is judged where both peaks were measured (a GPU with Torch-Pruning); elsewhere the load check alone
    d["memory_judged"] = d.get("taylor_bf16_peak_gib") is not None and d.get("tp_peak_gib") is not None
    ok_mem = d["taylor_bf16_peak_gib"] <= d["tp_peak_gib"] if d["memory_judged"] else "taylor_bf16_error" not in d
    return {"what": f"{_llama_name(ctx)} path: decompose, Taylor {B}x{T} fp32, prune, save, load", "unit": "s", "particlize": total,
            "peer": {"tp graph + Taylor step": (d["tp_graph_s"] + d["tp_taylor_step_s"]) if "tp_graph_s" in d else None},
            "ratio": ((d["tp_graph_s"] + d["tp_taylor_step_s"]) / (d["decompose_s"] + d["taylor_fp32_s"] + d["prune_s"])
                      if "tp_graph_s" in d else None),
            "target": "end to end, load equals prune (<= 1e-4); bf16 Taylor peak <= Torch-Pruning's",
            "passed": d["load_max_abs_diff"] <= 1e-4 and ok_mem, "details": d}


def row_kv_heads(ctx: Ctx) -> dict[str, Any]:
    """Key/value heads as a granularity: remove one whole kv group (with its query heads) per layer of the Llama."""
    import particlize as pz

    from transformers import LlamaForCausalLM

    torch.manual_seed(0)  # a granularity check, not a speed one: the small GQA shape (16 heads in 4 kv groups)
    model = LlamaForCausalLM(llama_config(True)).to(ctx.device).eval()
    pm = pz.decompose(model)
    groups = kv_head_groups(pm)
    remove = {g.name: [0] for g in groups}
    sec, small = timed(ctx, lambda: pm.prune(remove))
    ids = llama_ids(ctx, 1, 16, model.config.vocab_size)
    with torch.inference_mode():
        finite = bool(torch.isfinite(small(ids).logits).all())
    kept = pz.decompose(small).cost().flops / pm.cost().flops
    return {"what": "kv heads: one whole kv group per layer removed", "unit": "s", "particlize": sec, "peer": {},
            "ratio": kept, "target": "prunes and runs (no peer does it)", "passed": finite,
            "details": {"flops_kept": kept, "finite": finite}}


# ---- the Sora-style DiT sampler -----------------------------------------------------------------


def half_flops_plan(pm: Any) -> dict[str, list[int]]:
    """Half of every block's heads, then the smallest share of each FFN's neurons (writer L2) that brings the
    model to <= 50% of its FLOPs."""
    dense = pm.cost().flops
    plan: dict[str, list[int]] = {}
    for f in [i / 20 for i in range(10, 20)]:
        plan = {}
        for g in pm.groups:
            if g.kind in ("head", "neuron"):
                k = g.size // 2 if g.kind == "head" else round(g.size * f)
                plan[g.name] = sorted(torch.topk(C.writer_l2(pm.model, g), k, largest=False).indices.tolist())
        if pm.cost(plan).flops <= 0.5 * dense:
            break
    return plan


def row_dit(ctx: Ctx) -> dict[str, Any]:
    """``sora-tiny`` cut to half its FLOPs by width: ``videos`` videos × ``steps`` DDIM steps, dense vs cut, eager
    and (GPU) with the library's CUDA-graph sampler (`FastSampler(mode="graph")`, one guided step per replay)."""
    import particlize as pz
    from particlize.models.sora_sampler import FastSampler

    cfg = ctx.cfg
    dense = pz.load("sora-tiny", device=ctx.device).eval()
    pm = pz.decompose(dense)
    cut = pm.prune(half_flops_plan(pm)).eval()
    kept = pz.decompose(cut).cost().flops / pm.cost().flops
    labels = torch.arange(cfg.videos) % 10
    sides = {"dense": lambda: dense.sample(labels, steps=cfg.steps), "cut": lambda: cut.sample(labels, steps=cfg.steps)}
    d: dict[str, Any] = {"flops_kept": kept}
    # graph vs eager on a GPU; on a CPU the sampler's eager mode (the step the graph captures) vs ``sample``
    gd = FastSampler(dense, cfg.videos, mode="graph" if ctx.cuda else "eager")
    d["graph_max_abs_diff"] = float((gd(labels, steps=cfg.steps) - dense.sample(labels, steps=cfg.steps)).abs().max())
    if ctx.cuda:
        gc = FastSampler(cut, cfg.videos, mode="graph")
        sides.update({"dense_graph": lambda: gd(labels, steps=cfg.steps),
                      "cut_graph": lambda: gc(labels, steps=cfg.steps)})
    for f in sides.values():  # warm-up
        f()
    t = interleaved(ctx, sides, cfg.dit_rounds)
    d.update({"eager_speedup": paired(t, "dense", "cut"), "seconds": {k: med(v) for k, v in t.items()}})
    if ctx.cuda:
        d["graph_vs_eager"] = {"dense": paired(t, "dense", "dense_graph"), "cut": paired(t, "cut", "cut_graph")}
    mode = "cut_graph" if ctx.cuda else "cut"
    sp = paired(t, "dense_graph", "cut_graph") if ctx.cuda else d["eager_speedup"]
    return {"what": f"Sora-style DiT, {cfg.videos} videos x {cfg.steps} steps, {kept:.0%} FLOPs width cut"
                    f" ({'CUDA graphs' if ctx.cuda else 'eager'})", "unit": "s",
            "particlize": med(t[mode]), "peer": {"dense": med(t["dense_graph" if ctx.cuda else "dense"])}, "ratio": sp,
            "target": f">= {TARGET_DIT:g}x at 50% FLOPs", "passed": sp >= TARGET_DIT, "details": d}


ROWS = {"llama_unaligned": row_llama_unaligned, "llama_aligned": row_llama_aligned, "llama_path": row_llama_path,
        "kv_heads": row_kv_heads, "dit": row_dit}
