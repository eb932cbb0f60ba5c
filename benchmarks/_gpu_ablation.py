"""The exact-ablation rows of `gpu_check.py`: particlize's engine against the naive one-forward-per-particle
loop (``ablation_effects(fast=False)``) and Captum's ``LayerFeatureAblation``, on the MiniLM-shaped classifier
with synthetic VADER-like batches (same batches for every side), plus ``top_particles`` against the full sweep.

Neurons: the engine ablates every neuron of every layer (measured); the naive loop and Captum run a seeded
sample per layer and are extrapolated (every neuron of a layer costs them the same: one forward of the whole
model per particle), as in ``ablation_minilm.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from _gpu_common import Ctx, build_classifier, interleaved, length_stats, med, paired, peer, timed, vader_like_batches

TARGET_PART, TARGET_ALL, TARGET_TOP = 3.0, 10.0, 10.0
AGREE = 1e-4  # max |Δ per-example effect| between the engine and the naive loop (fp32)


def setup(ctx: Ctx) -> dict[str, Any]:
    """The classifier on the device, its particle map, the batches (split order and length-sorted), warmed up."""

    def make() -> dict[str, Any]:
        import particlize as pz
        from particlize.analysis.ablation import ablation_effects, default_rows

        model = build_classifier(ctx.cfg.small).to(ctx.device)
        pm = pz.decompose(model)
        vocab = model.encoder.config.vocab_size
        s = {"pm": pm, "heads": [g.name for g in pm.select("head")], "neurons": [g.name for g in pm.select("neuron")],
             "batches": vader_like_batches(ctx, vocab), "sorted": vader_like_batches(ctx, vocab, sort=True)}
        one = {s["heads"][0]: [0]}
        for fast in (True, False):  # warm-up (kernels, allocator) on both sides
            ablation_effects(pm, s["batches"], groups=s["heads"][:1], only=one, fast=fast)
        s["info"] = {**length_stats(s["batches"]), "examples": ctx.cfg.examples, "batch_size": ctx.cfg.batch_size,
                     "rows_per_forward": default_rows(model), "sorted_padding_overhead":
                     length_stats(s["sorted"])["padding_overhead"]}
        return s

    return ctx.once("ablation_setup", make)


def _engine(s: dict, groups: list[str], *, fast: bool = True, split: bool = True, only: dict | None = None,
            batches: list | None = None) -> dict[str, torch.Tensor]:
    from particlize.analysis.ablation import ablation_effects

    return ablation_effects(s["pm"], batches or s["batches"], groups=groups, fast=fast, split=split, only=only)


def captum_effects(pm: Any, batches: list[Any], group: str, particles: list[int] | None) -> torch.Tensor:
    """``[examples, n]`` zero-ablation effects on the per-example loss by Captum's ``LayerFeatureAblation`` on
    the input of the group's reader, one feature id per particle asked for, the rest one more id (NaN for
    them). Captum attributes ``f(clean) − f(ablated)``: the effect is its negative."""
    from captum.attr import LayerFeatureAblation

    model, g = pm.model, pm[group]
    reader = model.get_submodule(g.gate.module)
    width = reader.in_features // g.size
    wanted = list(range(g.size)) if particles is None else list(particles)
    ids = torch.full((g.size,), len(wanted), dtype=torch.long)
    ids[torch.tensor(wanted, dtype=torch.long)] = torch.arange(len(wanted))
    dev = next(model.parameters()).device
    mask = ids.repeat_interleave(width).view(1, 1, -1).to(dev)

    def loss(input_ids: torch.Tensor, attention_mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(input_ids=input_ids, attention_mask=attention_mask), y,
                                                 reduction="none")

    ablator = LayerFeatureAblation(loss, reader)
    cols = torch.tensor(wanted, dtype=torch.long) * width
    out = []
    for b in batches:
        with torch.no_grad():
            attr = ablator.attribute(b.inputs["input_ids"], additional_forward_args=(b.inputs["attention_mask"], b.targets),
                                     layer_mask=mask, attribute_to_layer_input=True)
        eff = torch.full((b.size, g.size), float("nan"), dtype=torch.float64)
        eff[:, wanted] = -attr[:, 0, cols.to(attr.device)].double().cpu()
        out.append(eff)
    return torch.cat(out)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Max |Δ| per example over the entries both computed."""
    worst = 0.0
    for k in a:
        ok = ~(torch.isnan(a[k]) | torch.isnan(b[k]))
        if ok.any():
            worst = max(worst, float((a[k][ok] - b[k][ok]).abs().max()))
    return worst


def row_heads(ctx: Ctx) -> dict[str, Any]:
    """Exact ablation of every head: engine (defaults) vs the naive loop and Captum, interleaved rounds."""
    s = setup(ctx)
    captum, why = peer("captum")
    heads, store = s["heads"], {}
    sides = {"particlize": lambda: store.__setitem__("pz", _engine(s, heads)),
             "naive": lambda: store.__setitem__("naive", _engine(s, heads, fast=False))}
    if captum is not None:
        sides["captum"] = lambda: store.__setitem__("captum", {h: captum_effects(s["pm"], s["batches"], h, None) for h in heads})
    t = interleaved(ctx, sides, ctx.cfg.rounds)
    diff = max_diff(store["pz"], store["naive"])
    r_naive = paired(t, "naive", "particlize")
    r_captum = paired(t, "captum", "particlize") if captum is not None else None
    ratios = [r for r in (r_naive, r_captum) if r is not None]
    return {"what": f"exact ablation, {len(heads) * s['pm'][heads[0]].size} heads", "unit": "s",
            "particlize": med(t["particlize"]), "peer": {"naive": med(t["naive"]),
                                                         "captum": med(t["captum"]) if captum is not None else None},
            "ratio": min(ratios), "target": f">= {TARGET_PART:g}x naive and Captum; effects agree <= {AGREE:g}",
            "passed": min(ratios) >= TARGET_PART and diff <= AGREE,
            "details": {"ratio_naive": r_naive, "ratio_captum": r_captum, "captum": why or f"captum {captum.__version__}",
                        "max_abs_diff_vs_naive": diff,
                        "max_abs_diff_vs_captum": max_diff(store["pz"], store["captum"]) if captum is not None else None,
                        "rounds": t, "data": s["info"]}}


def row_heads_nosplit(ctx: Ctx) -> dict[str, Any]:
    """Every head with ``split=False`` (padded batches kept whole), in split order and length-sorted."""
    s = setup(ctx)
    heads = s["heads"]
    sides = {"particlize": lambda: _engine(s, heads, split=False), "naive": lambda: _engine(s, heads, fast=False),
             "particlize_sorted": lambda: _engine(s, heads, split=False, batches=s["sorted"]),
             "naive_sorted": lambda: _engine(s, heads, fast=False, batches=s["sorted"])}
    t = interleaved(ctx, sides, ctx.cfg.rounds)
    r = paired(t, "naive", "particlize")
    return {"what": "every head, split=False", "unit": "s", "particlize": med(t["particlize"]),
            "peer": {"naive": med(t["naive"])}, "ratio": r, "target": f">= {TARGET_PART:g}x naive",
            "passed": r >= TARGET_PART,
            "details": {"sorted_ratio": paired(t, "naive_sorted", "particlize_sorted"), "rounds": t}}


def sweep(ctx: Ctx, split: bool) -> dict[str, Any]:
    """Every head and neuron ablated by the engine, part by part (all heads; each layer's neurons), timed once
    each; with ``split`` also the naive loop and Captum per part (heads in full, neurons sampled)."""

    def run() -> dict[str, Any]:
        s = setup(ctx)
        pm, cfg = s["pm"], ctx.cfg
        captum, why = peer("captum") if split else (None, "not run")
        gen = torch.Generator().manual_seed(0)
        parts: dict[str, Any] = {}
        effects: dict[str, torch.Tensor] = {}
        for part in ["heads", *s["neurons"]]:
            groups = s["heads"] if part == "heads" else [part]
            sec, eff = timed(ctx, lambda: _engine(s, groups, split=split))
            effects.update(eff)
            p: dict[str, Any] = {"particlize": sec, "particles": sum(pm[g].size for g in groups)}
            if split and part == "heads":
                p["naive"] = timed(ctx, lambda: _engine(s, groups, fast=False))[0]
                if captum is not None:
                    p["captum"] = timed(ctx, lambda: [captum_effects(pm, s["batches"], h, None) for h in groups])[0]
            elif split:
                n = pm[part].size
                sample = sorted(torch.randperm(n, generator=gen)[:cfg.neuron_sample].tolist())
                fixed = timed(ctx, lambda: _engine(s, groups, fast=False, only={part: []}))[0]
                t_s = timed(ctx, lambda: _engine(s, groups, fast=False, only={part: sample}))[0]
                p["naive"] = fixed + max(0.0, t_s - fixed) / len(sample) * n
                if captum is not None:  # per batch: the sample, the rest as one id, the clean forward
                    t_c = timed(ctx, lambda: captum_effects(pm, s["batches"], part, sample))[0]
                    p["captum"] = t_c * (n + 1) / (len(sample) + 2)
            parts[part] = p
        return {"parts": parts, "effects": effects, "captum": why}

    return ctx.once(f"sweep_split={split}", run)


def _total(parts: dict[str, Any], side: str) -> float | None:
    vals = [p.get(side) for p in parts.values()]
    return None if any(v is None for v in vals) else sum(vals)


def row_all(ctx: Ctx) -> dict[str, Any]:
    """All heads and neurons: the engine's sweep against the naive loop and Captum (extrapolated per neuron)."""
    sw = sweep(ctx, True)
    parts = sw["parts"]
    pz_t, naive, captum = _total(parts, "particlize"), _total(parts, "naive"), _total(parts, "captum")
    n = sum(p["particles"] for p in parts.values())
    return {"what": f"all {n} particles (engine measured part by part; naive/Captum per-neuron extrapolated)",
            "unit": "s", "particlize": pz_t, "peer": {"naive": naive, "captum": captum}, "ratio": naive / pz_t,
            "target": f">= {TARGET_ALL:g}x naive", "passed": naive / pz_t >= TARGET_ALL,
            "details": {"ratio_captum": captum / pz_t if captum else None, "captum": sw["captum"]}}


def row_all_nosplit(ctx: Ctx) -> dict[str, Any]:
    """The engine's sweep of every particle with split=False against split=True."""
    on, off = sweep(ctx, True)["parts"], sweep(ctx, False)["parts"]
    t_on, t_off = _total(on, "particlize"), _total(off, "particlize")
    return {"what": "all particles, split=False (engine only)", "unit": "s", "particlize": t_off,
            "peer": {"split=True": t_on}, "ratio": t_off / t_on, "target": "report (ratio > 1: splitting helps)",
            "passed": None, "details": {"per_part_s": {k: off[k]["particlize"] for k in off}}}


def row_parts(ctx: Ctx) -> dict[str, Any]:
    """Every part (heads; each layer's neurons) against the naive loop and Captum: the issue's >= 3x each."""
    parts = sweep(ctx, True)["parts"]
    per = {k: {"naive": p["naive"] / p["particlize"],
               "captum": p["captum"] / p["particlize"] if "captum" in p else None} for k, p in parts.items()}
    worst = min(min(v for v in r.values() if v is not None) for r in per.values())
    return {"what": "every part (heads, each layer's neurons): slowest ratio", "unit": "x", "particlize": worst,
            "peer": {"captum_min": min((r["captum"] for r in per.values() if r["captum"]), default=None)},
            "ratio": worst, "target": f">= {TARGET_PART:g}x naive and Captum, every part", "passed": worst >= TARGET_PART,
            "details": {"ratios": per, "seconds": parts}}


def row_top(ctx: Ctx) -> dict[str, Any]:
    """``top_particles(k)`` (screen + exact verification) against the engine's full sweep of every particle."""
    import particlize as pz

    s = setup(ctx)
    sw = sweep(ctx, True)
    full = _total(sw["parts"], "particlize")
    k = ctx.cfg.top_k
    sec, top = timed(ctx, lambda: pz.top_particles(s["pm"], s["batches"], k=k, groups=s["heads"] + s["neurons"]))
    exact = sorted(((float(e.nanmean(0)[i]), g, i) for g, e in sw["effects"].items() for i in range(e.shape[1])),
                   reverse=True)[:k]
    got = set(zip(top["group"], top["index"].astype(int)))
    overlap = len(got & {(g, i) for _, g, i in exact}) / k
    return {"what": f"top_particles(k={k})", "unit": "s", "particlize": sec, "peer": {"full sweep": full},
            "ratio": full / sec, "target": f">= {TARGET_TOP:g}x the full sweep", "passed": full / sec >= TARGET_TOP,
            "details": {"overlap_with_sweep_top_k": overlap, "verified": top.attrs.get("verified")}}


def flops(fn: Any) -> int:
    """Matmul-like FLOPs ``fn`` runs (torch's ``FlopCounterMode``: mm, bmm, einsum, conv, known attention kernels)."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def engine_limit(pm: Any, batches: list[Any], groups: list[str], only: dict | None = None) -> dict[str, float]:
    """The arithmetic limit of the engine on ``groups``: FLOPs of the naive loop (one full forward per particle
    plus the clean one, per batch) / FLOPs the engine schedules (counted while it runs)."""
    from particlize.analysis._common import call
    from particlize.analysis.ablation import ablation_effects

    with torch.no_grad():
        clean = flops(lambda: [call(pm.model, b.inputs) for b in batches])
    n = sum(len(only[g]) if only else pm[g].size for g in groups)
    engine = flops(lambda: ablation_effects(pm, batches, groups=groups, only=only))
    return {"naive_flops": float(clean * (n + 1)), "engine_flops": float(engine), "limit": clean * (n + 1) / max(engine, 1)}


def row_limit(ctx: Ctx) -> dict[str, Any]:
    """Naive FLOPs / engine FLOPs for the heads and the first and last layer's neurons, beside the measured
    ratio of the sweep (how close the engine runs to its arithmetic limit)."""
    s = setup(ctx)
    parts = sweep(ctx, True)["parts"]
    out = {}
    for part in ["heads", s["neurons"][0], s["neurons"][-1]]:
        groups = s["heads"] if part == "heads" else [part]
        lim = engine_limit(s["pm"], s["batches"], groups)
        out[part] = {**lim, "measured": parts[part]["naive"] / parts[part]["particlize"]}
        out[part]["share_of_limit"] = out[part]["measured"] / lim["limit"]
    h = out["heads"]
    return {"what": "engine arithmetic limit (naive FLOPs / engine FLOPs) vs measured, heads", "unit": "x",
            "particlize": h["measured"], "peer": {"limit": h["limit"]}, "ratio": h["share_of_limit"],
            "target": "report (share of the limit reached)", "passed": None, "details": out}


ROWS = {"heads": row_heads, "heads_nosplit": row_heads_nosplit, "all": row_all, "all_nosplit": row_all_nosplit,
        "parts": row_parts, "top50": row_top, "limit": row_limit}
