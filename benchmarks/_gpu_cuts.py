"""The width rows of `gpu_check.py`: how fast the MiniLM cuts run per FLOP kept (fp32 eager; bf16 as CUDA graphs),
which width multiple a device likes (``round_to``), and whether ``cost="latency"`` prices particles right on the
device. Latency depends on the architecture, not the weights: the cuts are the recorded widths of
``minilm_architectures.json`` (particlize's one-shot cuts and Torch-Pruning's uniform ones, per budget) applied
to the classifier rebuilt from its config, with particlize's own surgery.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import _common as C
import torch

from _gpu_common import ARCH, Ctx, ForwardTimer, build_classifier, device_round_to, med, round_widths, scale_widths

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TARGET_EFF = 0.9  # latency × FLOPs kept at 50%


def _models(ctx: Ctx) -> dict[str, Any]:
    """The dense classifier and every cut (CPU, fp32), with each one's widths; the same widths share a model."""

    def make() -> dict[str, Any]:
        spec = json.loads(ARCH.read_text())
        widths = {m["name"]: m["widths"] for m in spec["models"]}
        dense = build_classifier(ctx.cfg.small)
        enc = dense.encoder.config
        head_dim = enc.hidden_size // enc.num_attention_heads
        widths = {k: scale_widths(w, enc.num_attention_heads, enc.intermediate_size, ctx.cfg.small) for k, w in widths.items()}
        models, seen, alias = {"dense": dense}, {}, {"dense": "dense"}
        for b in ctx.cfg.budgets:
            pzw = widths[f"pz-oneshot@{b}/0"]
            variants = {f"pz@{b}": pzw, f"tp@{b}": widths[f"tp-taylor@{b}/0"]}
            for m in ctx.cfg.multiples:
                variants[f"pz@{b}/round_to={m}"] = round_widths(pzw, m, head_dim, enc.num_attention_heads,
                                                                enc.intermediate_size)
            for name, w in variants.items():
                key = json.dumps(w)
                if key not in seen:
                    seen[key] = name
                    models[name] = C.by_widths(dense, w)
                alias[name] = seen[key]  # the model that has these widths
        # the floor: one head and one neuron per layer; its time beyond its FLOPs is what no width cut removes
        models["floor"] = C.by_widths(dense, [[1, 1]] * enc.num_hidden_layers)
        alias["floor"] = "floor"
        return {"models": models, "alias": alias}

    return ctx.once("cut_models", make)


def _inputs(ctx: Ctx, model: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """A fixed-shape batch of random token ids (every position real) on the device."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.encoder.config.vocab_size, (batch, seq), generator=g)
    return {"input_ids": ids.to(ctx.device), "attention_mask": torch.ones_like(ids, device=ctx.device)}


def _flops_kept(models: dict[str, Any], seq_len: int) -> dict[str, float]:
    import particlize as pz

    f = {k: pz.decompose(m, seq_len=seq_len).cost().flops for k, m in models.items()}
    return {k: v / f["dense"] for k, v in f.items()}


def cut_times(ctx: Ctx, dtype: str) -> dict[str, Any]:
    """Speedup (paired per round, dense / cut) and efficiency of every cut at the dtype's shape; bf16 on a GPU
    replays each forward as a CUDA graph (the launch cost of small batches is not the model's)."""

    def run() -> dict[str, Any]:
        made = _models(ctx)
        B, T = ctx.cfg.cut_shapes[dtype]
        graph = ctx.cuda and dtype == "bf16"
        x = _inputs(ctx, made["models"]["dense"], B, T)
        models = {k: copy.deepcopy(m).to(device=ctx.device, dtype=DTYPES[dtype]) for k, m in made["models"].items()}
        timers = {k: ForwardTimer(ctx, m, x, graph=graph) for k, m in models.items()}
        times: dict[str, list[float]] = {k: [] for k in timers}
        for _ in range(ctx.cfg.cut_rounds):
            for k, tm in timers.items():
                times[k].append(tm(ctx.cfg.cut_reps))
        kept = _flops_kept(made["models"], T)
        out = {}
        for name, alias in made["alias"].items():
            sp = med([d / v for d, v in zip(times["dense"], times[alias])])
            out[name] = {"speedup": sp, "flops_kept": kept[alias], "efficiency": sp * kept[alias],
                         "ms": med(times[alias]) * 1e3}
        del timers, models
        return {"shape": f"{B}x{T}", "mode": "cuda graph" if graph else "eager", "dense_ms": med(times["dense"]) * 1e3,
                "cuts": out}

    return ctx.once(f"cuts_{dtype}", run)


def _pz_name(ctx: Ctx, b: float, dtype: str) -> str:
    rt = device_round_to(ctx.device, DTYPES[dtype])
    return f"pz@{b}" if rt is None else f"pz@{b}/round_to={rt}"


def _minilm_name(ctx: Ctx) -> str:
    return "small MiniLM-family (2 layers x 64)" if ctx.cfg.small else "MiniLM"


def _cut_row(ctx: Ctx, dtype: str, what: str) -> dict[str, Any]:
    res = cut_times(ctx, dtype)
    cuts, budgets = res["cuts"], ctx.cfg.budgets
    mine = {b: cuts[_pz_name(ctx, b, dtype)]["efficiency"] for b in budgets}
    tp = {b: cuts[f"tp@{b}"]["efficiency"] for b in budgets}
    today = {b: cuts[f"pz@{b}"]["efficiency"] for b in budgets}
    ok = mine[0.5] >= TARGET_EFF and all(mine[b] >= tp[b] for b in budgets)
    return {"what": f"{what} ({res['shape']}, {res['mode']}): latency × FLOPs kept at 50%", "unit": "efficiency",
            "particlize": mine[0.5], "peer": {"torch-pruning widths": tp[0.5]}, "ratio": mine[0.5] / tp[0.5],
            "target": f">= {TARGET_EFF} at 50% and >= Torch-Pruning's at every budget", "passed": ok,
            "details": {"round_to": device_round_to(ctx.device, DTYPES[dtype]), "particlize": mine, "torch_pruning": tp,
                        "particlize_unaligned": today, "speedup_at_50": cuts[_pz_name(ctx, 0.5, dtype)]["speedup"],
                        "tp_speedup_at_50": cuts["tp@0.5"]["speedup"], "dense_ms": res["dense_ms"],
                        # share of the dense time no width cut removes (the floor's time less its FLOPs share)
                        "fixed_share": 1 / cuts["floor"]["speedup"] - cuts["floor"]["flops_kept"], "all": cuts}}


def row_cuts_fp32(ctx: Ctx) -> dict[str, Any]:
    """MiniLM cuts at 50 / 25 / 12.5% of the FLOPs: latency × FLOPs kept, fp32 eager, against Torch-Pruning's widths."""
    return _cut_row(ctx, "fp32", f"{_minilm_name(ctx)} cuts fp32")


def row_cuts_bf16(ctx: Ctx) -> dict[str, Any]:
    """MiniLM cuts: latency × FLOPs kept, bf16 as CUDA graphs (eager on a CPU), against Torch-Pruning's widths."""
    return _cut_row(ctx, "bf16", f"{_minilm_name(ctx)} cuts bf16")


def row_round_to(ctx: Ctx) -> dict[str, Any]:
    """Which width multiple the device likes, per dtype: mean efficiency over the budgets of each multiple."""
    best, per = {}, {}
    for dtype in DTYPES:
        cuts = cut_times(ctx, dtype)["cuts"]
        score = {"none": med([cuts[f"pz@{b}"]["efficiency"] for b in ctx.cfg.budgets])}
        for m in ctx.cfg.multiples:
            score[str(m)] = med([cuts[f"pz@{b}/round_to={m}"]["efficiency"] for b in ctx.cfg.budgets])
        per[dtype] = score
        best[dtype] = max(score, key=score.get)
    chosen = {d: str(device_round_to(ctx.device, DTYPES[d])).replace("None", "none") for d in DTYPES}
    share = min(per[d][chosen[d]] / per[d][best[d]] for d in DTYPES)
    return {"what": "round_to by device: median efficiency per multiple (fp32 | bf16)", "unit": "efficiency",
            "particlize": per["fp32"][chosen["fp32"]], "peer": {"best fp32": per["fp32"][best["fp32"]],
                                                               "best bf16": per["bf16"][best["bf16"]]},
            "ratio": share, "target": "the device's round_to within 2% of the best multiple", "passed": share >= 0.98,
            "details": {"best": best, "chosen": chosen, "median_efficiency": per}}


def row_latency_cost(ctx: Ctx) -> dict[str, Any]:
    """``cost="latency"``: the library's measured price per head / neuron (`allocate.latency_prices`) against the
    same models timed here with CUDA events (perf_counter on a CPU)."""
    import particlize as pz
    from particlize.allocate import AllocationConfig, _shrink_plan, latency_prices  # the plans latency_prices times

    model = copy.deepcopy(_models(ctx)["models"]["dense"]).to(ctx.device)
    B, T = ctx.cfg.cut_shapes["fp32"]
    x = _inputs(ctx, model, B, T)
    pm, cfg = pz.decompose(model), AllocationConfig()
    lib = latency_prices(model, pm, x, cfg, {"head", "neuron"})  # timed with CUDA events on a GPU (measure.Clock)
    ours = {}
    dense = ForwardTimer(ctx, model, x)
    for kind in ("head", "neuron"):
        plan = _shrink_plan(pm, cfg, {kind}, 0.5)
        small = ForwardTimer(ctx, pm.prune(plan), x)
        saved = [dense(ctx.cfg.cut_reps) - small(ctx.cfg.cut_reps) for _ in range(ctx.cfg.cut_rounds)]
        ours[kind] = med(saved) * 1e3 / sum(len(v) for v in plan.values())  # <= 0: no saving measurable here
    agree = {k: lib[k] / ours[k] if ours[k] > 0 else None for k in ours}
    return {"what": "cost='latency' prices (ms per neuron): library vs event-timed", "unit": "ms",
            "particlize": lib["neuron"], "peer": {"event-timed": ours["neuron"]}, "ratio": agree["neuron"],
            "target": "library / event-timed within 0.5-2x for heads and neurons",
            "passed": all(a is not None and 0.5 <= a <= 2.0 for a in agree.values()),
            "details": {"library_ms": lib, "event_timed_ms": ours, "ratio": agree}}


ROWS = {"cuts_fp32": row_cuts_fp32, "cuts_bf16": row_cuts_bf16, "round_to": row_round_to, "latency_cost": row_latency_cost}
