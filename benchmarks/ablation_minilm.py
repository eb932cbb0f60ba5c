"""Exact zero-ablation of every MiniLM particle: particlize's engine vs the naive loop (issue 4's headline).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ablation_minilm.py [--examples 512] [--batch-size 64]
        [--neurons-per-layer 32] [--rounds 2] [--max-rows N] [--no-sort] [--naive loop|captum]

Model: the MiniLM sentiment classifier (``out/minilm-vader``, ``particlize train minilm --task
vader-sentiment --out out/minilm-vader``); data: the first ``--examples`` test sentences in batches of
``--batch-size``, sorted by token length (the naive loop's best case: least padding; ``--no-sort`` keeps
the split order). Both sides get the very same batches. Metric: loss; mode: zero.

- naive (``--naive loop``): ``ablation_effects(fast=False)``, one full forward of the model per particle
  (what TransformerLens' run_with_hooks loop and Captum's FeatureAblation do);
- naive (``--naive captum``): Captum 0.9's ``LayerFeatureAblation`` itself, ablating the reader's input
  (``attribute_to_layer_input=True``, the same tensor particlize gates) with a layer mask of one feature
  id per particle (the neurons left out of the sample share one extra id: one extra forward per batch,
  included in Captum's fixed cost), ``perturbations_per_eval=--captum-ppe`` (Captum's default 1);
- particlize: ``ablation_effects()`` with its defaults (start at the reader, per-row masks, padding cut,
  the Q/K/V after the next norm updated in closed form, rows per forward for this device).

All 72 heads run on both sides. FFN neurons: a seeded random sample per layer runs on both sides (the
per-particle cost is the same for every neuron of a layer: the same work on the same rows), timed per
layer; the full 9,216-neuron times are the per-layer costs × 1,536 plus each side's fixed cost, which is
measured on its own (a call with no particle: particlize's clean forwards and length check). Rounds are
interleaved (which side runs first alternates); medians and paired ratios; a matmul probe before and
after (../shared/BENCHMARKING.md). Every effect computed on both sides is compared (bound: 1e-4).

**Arithmetic limit** (issue 29): after the timed rounds, one untimed pass of the engine over the same work (all
heads; each layer's sample and a call with no particle) runs under torch's ``FlopCounterMode``, which counts the
FLOPs the engine actually schedules (matmuls, einsums, attention kernels it knows). The naive loop's FLOPs are
one clean forward of every batch per particle plus the clean one (counted once the same way). Extrapolated like
the times, naive FLOPs / engine FLOPs is the speedup the engine would reach if time followed FLOPs; it is
printed per part and for all particles beside the measured ratio, with the share of the limit reached. (On a
CPU torch has no FLOP formula for its fused attention kernel: the attention core, about 1% of MiniLM's FLOPs at
these lengths, is left out on both sides.) ``--no-limit`` skips the pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import _common as C
import torch
from analysis_minilm import make_batches, max_diff, tokens


def log(*a: Any) -> None:
    print(*a, flush=True)


def captum_effects(pm: Any, batches: list[Any], group: str, particles: list[int] | None, ppe: int) -> torch.Tensor:
    """``[examples, n]`` zero-ablation effects on the per-example loss by Captum's ``LayerFeatureAblation``
    on the input of the group's reader (NaN for particles not asked for). Captum attributes
    ``f(clean) − f(ablated)``; the effect is its negative."""
    from captum.attr import LayerFeatureAblation

    model, g = pm.model, pm[group]
    reader = model.get_submodule(g.gate.module)
    width = reader.in_features // g.size
    wanted = list(range(g.size)) if particles is None else list(particles)
    ids = torch.full((g.size,), len(wanted), dtype=torch.long)  # the rest: one extra feature group
    ids[torch.tensor(wanted, dtype=torch.long)] = torch.arange(len(wanted))
    mask = ids.repeat_interleave(width).view(1, 1, -1)

    def loss(input_ids: torch.Tensor, attention_mask: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(input_ids=input_ids, attention_mask=attention_mask), y, reduction="none")

    ablator = LayerFeatureAblation(loss, reader)
    out = []
    for b in batches:
        with torch.no_grad():
            attr = ablator.attribute(b.inputs["input_ids"], additional_forward_args=(b.inputs["attention_mask"], b.targets),
                                     layer_mask=mask, attribute_to_layer_input=True, perturbations_per_eval=ppe)
        eff = torch.full((b.size, g.size), float("nan"), dtype=torch.float64)
        eff[:, wanted] = -attr[:, 0, torch.tensor(wanted, dtype=torch.long) * width].double()
        out.append(eff)
    return torch.cat(out)


def limit_table(pm: Any, batches: list[Any], heads: list[str], neurons: list[str], sample: dict[str, list[int]],
                med: dict, per_particle: Any, full: dict[bool, float]) -> None:
    """Print naive FLOPs / engine FLOPs (the engine's arithmetic limit) beside the measured naive / particlize
    ratio, per part and for all particles (extrapolated from the samples as the times are)."""
    from _gpu_ablation import flops

    from particlize.analysis._common import call
    from particlize.analysis.ablation import ablation_effects

    with torch.no_grad():
        clean = flops(lambda: [call(pm.model, b.inputs) for b in batches])  # one forward of every batch
    count = lambda g, only=None: flops(lambda: ablation_effects(pm, batches, groups=g, only=only))  # noqa: E731
    e_fixed = count(neurons[:1], {neurons[0]: []})
    e_heads = count(heads)
    n_heads = sum(pm[h].size for h in heads)
    rows = [["72 heads (all)", f"{med[(False, 'heads')] / med[(True, 'heads')]:.2f}×",
             f"{clean * (n_heads + 1) / e_heads:.2f}×"]]
    e_all, n_all = e_heads, clean * (n_heads + 1)
    for i, g in enumerate(neurons):
        per = max(0.0, (count([g], {g: sample[g]}) - e_fixed) / len(sample[g]))
        e_all += per * pm[g].size
        n_all += clean * pm[g].size
        n_per, f_per = per_particle(med, False, g), per_particle(med, True, g)
        rows.append([f"layer {i} neurons (per neuron)", f"{n_per / f_per:.2f}×" if f_per else "—",
                     f"{clean / per:.3g}×" if per else "∞ (no FLOPs beyond the fixed cost)"])
    rows.append(["**all particles**", f"{full[False] / full[True]:.2f}×", f"{n_all / e_all:.2f}×"])
    for r in rows:
        try:
            r.append(f"{float(r[1].strip('*×')) / float(r[2].strip('*×')):.0%}")
        except ValueError:
            r.append("—")
    log(f"FLOPs of one clean forward of all {len(batches)} batches: {clean / 1e9:.2f} GFLOP; engine fixed cost per call "
        f"{e_fixed / 1e9:.2f} GFLOP")
    C.print_table(["part", "measured naive / particlize", "arithmetic limit (naive / engine FLOPs)", "share of the limit"],
                  rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(C.ROOT / "out" / "minilm-vader"))
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--neurons-per-layer", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-rows", type=int, default=None, help="particlize rows per forward (default: the engine's)")
    ap.add_argument("--no-sort", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--naive", choices=["loop", "captum"], default="loop", help="the one-forward-per-particle side")
    ap.add_argument("--captum-ppe", type=int, default=1, help="Captum's perturbations_per_eval")
    ap.add_argument("--no-limit", action="store_true", help="skip the FLOP count (the arithmetic-limit column)")
    args = ap.parse_args()

    from particlize.analysis.ablation import ablation_effects, default_rows
    from particlize.tasks import get_task

    C.setup_threads()
    log("ablation_minilm:", C.machine_line())
    log("command:", " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]))
    model, tok, pm, heads, neurons = C.classifier_and_particles(args.model)
    texts, labels = get_task("vader-sentiment").split("test")
    texts, labels = texts[:args.examples], labels[:args.examples]
    batches = make_batches(tok, texts, labels, args.batch_size, not args.no_sort)
    pad, real = tokens(batches)
    rows = args.max_rows or default_rows(model)
    if args.naive == "captum":
        import captum

        log(f"naive side: Captum {captum.__version__} LayerFeatureAblation, perturbations_per_eval={args.captum_ppe}")
    log(f"{len(texts)} sentences, {len(batches)} batches of {args.batch_size} "
        f"({'split order' if args.no_sort else 'sorted by length'}): {pad} padded tokens for {real} real "
        f"({pad / real:.2f}x); particlize rows per forward {rows}")

    def timed(fast: bool, groups: list[str], only: dict[str, list[int]] | None = None) -> tuple[float, dict]:
        t = time.perf_counter()
        if fast or args.naive == "loop":
            eff = ablation_effects(pm, batches, groups=groups, only=only, fast=fast, max_rows=args.max_rows)
        else:
            eff = {g: captum_effects(pm, batches, g, only[g] if only else None, args.captum_ppe) for g in groups}
        return time.perf_counter() - t, eff

    gen = torch.Generator().manual_seed(args.seed)
    sample = {g: sorted(torch.randperm(pm[g].size, generator=gen)[:args.neurons_per_layer].tolist()) for g in neurons}
    timed(True, heads[:1], {heads[0]: [0]})  # warm-up
    timed(False, heads[:1], {heads[0]: [0]})
    probe0 = C.matmul_probe()
    log(f"matmul probe before: {probe0:.0f} GFLOP/s")

    T: dict[tuple[bool, str], list[float]] = {}  # (fast, part) -> seconds per round
    worst = 0.0
    for r in range(args.rounds):
        for fast in ([True, False] if r % 2 == 0 else [False, True]):
            side = "particlize" if fast else "naive"
            t0, _ = timed(fast, neurons[:1], {neurons[0]: []})
            T.setdefault((fast, "fixed"), []).append(t0)
            t, eff_h = timed(fast, heads)
            T.setdefault((fast, "heads"), []).append(t)
            msg = [f"fixed {t0:.1f} s", f"72 heads {t:.1f} s"]
            effs = {"heads": eff_h}
            for i, g in enumerate(neurons):
                t, effs[g] = timed(fast, [g], {g: sample[g]})
                T.setdefault((fast, g), []).append(t)
                msg.append(f"L{i} {t:.1f} s")
            log(f"round {r + 1} {side}: " + ", ".join(msg))
            if fast:
                mine = effs
            else:
                other = effs
        worst = max(worst, max(max_diff(mine[k], other[k])[1] for k in mine))
    probe1 = C.matmul_probe()
    log(f"matmul probe after: {probe1:.0f} GFLOP/s")
    log(f"identical scores: max |Δ per-example effect| over every particle run on both sides = {worst:.2e} "
        f"({'PASS' if worst <= 1e-4 else 'FAIL'} at 1e-4)")

    med = {k: statistics.median(v) for k, v in T.items()}
    s = args.neurons_per_layer

    def per_particle(times: dict, fast: bool, g: str) -> float:
        # a layer whose sample ran faster than the separately measured fixed cost (the last layer's neurons
        # cost almost nothing) counts as free: the difference is the fixed cost's noise, not a negative cost
        return max(0.0, (times[(fast, g)] - times[(fast, "fixed")]) / s)

    full: dict[bool, float] = {}
    table = []
    for fast in (False, True):
        total = med[(fast, "heads")]  # its fixed cost included: paid once by a sweep of everything
        for g in neurons:
            total += per_particle(med, fast, g) * pm[g].size
        full[fast] = total
    for i, g in enumerate(neurons):
        n_per, f_per = per_particle(med, False, g), per_particle(med, True, g)
        table.append([f"layer {i} neurons", f"{n_per:.3f}", f"{f_per:.3f}", f"{n_per / f_per:.2f}×" if f_per else "(within the fixed cost's noise)"])
    table.append(["72 heads (all, measured)", f"{med[(False, 'heads')]:.1f} s", f"{med[(True, 'heads')]:.1f} s",
                  f"{med[(False, 'heads')] / med[(True, 'heads')]:.2f}×"])
    table.append(["fixed cost per call", f"{med[(False, 'fixed')]:.1f} s", f"{med[(True, 'fixed')]:.1f} s", ""])
    table.append(["**all 9,288 particles** (heads measured, neurons per layer × 1,536)",
                  f"{full[False] / 3600:.2f} h", f"{full[True] / 3600:.2f} h", f"**{full[False] / full[True]:.2f}×**"])
    C.print_table(["what (s per particle unless said)", "naive loop", "particlize", "naive / particlize"], table)
    if not args.no_limit:
        limit_table(pm, batches, heads, neurons, sample, med, per_particle, full)
    paired = []
    for r in range(args.rounds):
        tot = {}
        for fast in (False, True):
            one = {k: v[r] for k, v in T.items()}
            tot[fast] = one[(fast, "heads")] + sum(per_particle(one, fast, g) * pm[g].size for g in neurons)
        paired.append(tot[False] / tot[True])
    log(f"paired ratio per round (all 9,288): {', '.join(f'{x:.2f}×' for x in paired)}")
    if worst > 1e-4:  # the speed above means nothing if the two sides disagree: fail the run
        log(f"FAIL: the two sides' effects differ by {worst:.2e} > 1e-4")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
