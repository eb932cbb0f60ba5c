"""All pairwise interactions of the MiniLM classifier's 72 heads (2,556 pairs): the exact engine vs a
naive loop, the gate-Hessian estimate vs exact, and where joint removal departs from the sum (issue 31).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/interactions_minilm.py [--examples 512] [--batch-size 64]
        [--naive-pairs 48] [--max-rows 128] [--out benchmarks/results/interactions-minilm.json]

512 sentences are hours of one CPU core; split them over processes and sessions (each batch is kept once done):

    ... interactions_minilm.py --stage-dir bench-out/pairs512 --only-batches 0 2 4 6 &   # one core
    ... interactions_minilm.py --stage-dir bench-out/pairs512 --only-batches 1 3 5 7     # the other
    ... interactions_minilm.py --stage-dir bench-out/pairs512          # combine, then naive sample, curve, report

Model: the MiniLM sentiment classifier (``out/minilm-vader``); data: the first ``--examples`` test sentences
sorted by length, in batches of ``--batch-size``; metric loss, zero ablation. Sections:

1. exact: ``pz.interactions(pm, batches, "head")`` (single effects + all 2,556 pair effects), timed whole;
2. naive: one forward of the whole model per pair and batch (``pair_effects(fast=False)``, the batches as
   given) on a seeded random sample of pairs, half timed before section 1 and half after; its time per
   pair × 2,556 against section 1's pair time, and the largest difference of any per-example joint
   effect on the sample (bound 1e-4);
3. hessian: ``method="hessian"`` on the same pairs, timed; Spearman / Kendall / top-50 overlap with exact;
4. joint vs sum (Michel et al. 2019): remove the k heads with the smallest exact single effect jointly,
   k = 1..72, one forward per k; the joint loss change against the sum of the k single effects and against
   the sum corrected by the exact pairwise interactions within the set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common as C
import pandas as pd
import torch
from analysis_minilm import make_batches, tokens

import particlize as pz
from particlize.analysis import as_matrix, redundant_clusters, synergistic_pairs, validate_interactions
from particlize.analysis._common import call, per_example_metric
from particlize.analysis._pairs import pair_effects
from particlize.tasks import get_task


def log(*a: Any) -> None:
    print(*a, flush=True)


def short(group: str, i: int) -> str:
    """``L3h5`` for head 5 of ``...layer.3.attention.heads``."""
    return f"L{group.split('.')[-3]}h{i}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(C.ROOT / "out" / "minilm-vader"))
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--naive-pairs", type=int, default=48, help="seeded random pairs run by the naive loop")
    ap.add_argument("--max-rows", type=int, default=None, help="rows per forward of the exact engine (default: the device's)")
    ap.add_argument("--block", type=int, default=None, help="Hessian rows per HVP pass (default: 64 // batch size)")
    ap.add_argument("--out", default=str(C.ROOT / "benchmarks" / "results" / "interactions-minilm.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage-dir", default=None,
                    help="compute the exact and Hessian interactions batch by batch and keep each batch's result here "
                         "(a stopped run resumes; several processes may share the folder with --only-batches)")
    ap.add_argument("--only-batches", type=int, nargs="+", default=None,
                    help="with --stage-dir: compute these batches (0-based) and stop; a run without it combines them")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on the loaded 2-core machine one MiniLM forward ran 6x faster than with 2)")
    args = ap.parse_args()

    C.start()
    torch.set_num_threads(args.threads)
    log(f"torch threads: {args.threads}")
    T0 = time.perf_counter()
    model, tok, pm, heads, _ = C.classifier_and_particles(args.model)
    task = get_task("vader-sentiment")
    texts, labels = task.split("test")
    texts, labels = texts[:args.examples], labels[:args.examples]
    batches = make_batches(tok, texts, labels, args.batch_size, True)
    pad, real = tokens(batches)
    log(f"data: first {len(texts)} vader-sentiment test sentences, {len(batches)} batches of <= {args.batch_size} "
        f"sorted by length, {real} real tokens ({pad} padded)")
    probe0 = C.matmul_probe()
    log(f"matmul probe before: {probe0:.0f} GFLOP/s")
    parts = [(h, i) for h in heads for i in range(pm[h].size)]
    all_pairs = [(parts[a], parts[b]) for a in range(len(parts)) for b in range(a + 1, len(parts))]
    rng = random.Random(args.seed)
    sample = rng.sample(all_pairs, min(args.naive_pairs, len(all_pairs)))
    half = len(sample) // 2
    res: dict[str, Any] = {"examples": len(texts), "batch_size": args.batch_size, "pairs": len(all_pairs),
                           "machine": C.machine_line().replace(f"torch threads {C.THREADS}", f"torch threads {args.threads}"), "command": " ".join(sys.argv)}

    def save() -> None:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1, default=str)
        os.replace(tmp, args.out)

    if args.stage_dir:
        staged = stage_batches(pm, batches, args)
        if staged is None:
            return 0
    pair_effects(pm, batches[:1], all_pairs[:2], max_rows=args.max_rows)  # warm-up of both paths
    pair_effects(pm, batches[:1], all_pairs[:1], fast=False)

    def naive(ps: list) -> tuple[float, torch.Tensor]:
        t = time.perf_counter()
        e = pair_effects(pm, batches, ps, fast=False)
        return time.perf_counter() - t, e

    tn1, en1 = naive(sample[:half])
    log(f"naive (first half of the sample): {half} pairs in {tn1:.1f} s = {tn1 / half:.3f} s per pair")

    stage: dict[str, float] = {}
    t = time.perf_counter()
    last = [t]

    def progress(done: int, total: int, what: str) -> None:
        now = time.perf_counter()
        stage[what] = stage.get(what, 0.0) + now - last[0]
        last[0] = now

    pm.model.eval()
    if args.stage_dir:  # per batch, possibly over several sessions: the pair engine's time is the sum of the batches'
        exact, t_exact, t_pairs, est, t_h = staged
        stage = {"batches": t_pairs}
    else:
        exact = pz.interactions(pm, batches, "head", "ablation", progress=progress)
        t_exact = time.perf_counter() - t
        t_pairs = sum(stage.values())
    log(f"exact: all {len(exact)} pairs + 72 single effects in {t_exact:.1f} s "
        f"(pair engine {t_pairs:.1f} s: {', '.join(f'{k} {v:.1f} s' for k, v in stage.items())})")

    tn2, en2 = naive(sample[half:])
    log(f"naive (second half): {len(sample) - half} pairs in {tn2:.1f} s = {tn2 / (len(sample) - half):.3f} s per pair")
    fast_sample = pair_effects(pm, batches, sample, max_rows=args.max_rows)
    diff = float((fast_sample - torch.cat([en1, en2], 1)).abs().max())
    if args.stage_dir:  # the batches' combined joint effects against the sample run on all the data at once
        joint = exact.set_index(["group_a", "index_a", "group_b", "index_b"])["joint"]
        combined = torch.tensor([float(joint[(*a, *b)]) for a, b in sample], dtype=torch.float64)
        res["staged_max_abs_diff"] = float((combined - fast_sample.double().mean(0)).abs().max())
        log(f"staged batches vs all at once, mean joint effect of the sampled pairs: max |diff| {res['staged_max_abs_diff']:.2e}")
    per_pair = [tn1 / half, tn2 / (len(sample) - half)]
    naive_total = [p * len(all_pairs) for p in per_pair]
    ratios = [n / t_pairs for n in naive_total]
    log(f"naive extrapolated to {len(all_pairs)} pairs: {naive_total[0]:.0f} s / {naive_total[1]:.0f} s -> "
        f"exact pair engine {min(ratios):.2f}-{max(ratios):.2f}x faster (median per-pair naive: "
        f"{statistics.median(per_pair):.3f} s); max |diff| of a per-example joint effect on the sample: {diff:.2e}")
    res.update(exact_s=t_exact, exact_pairs_s=t_pairs, naive_per_pair_s=per_pair, naive_extrapolated_s=naive_total,
               ratio=ratios, max_abs_diff=diff, naive_sample=len(sample))
    save()

    # where joint removal departs from the sum of single costs
    single: dict[tuple[str, int], float] = {}
    for _, r in exact.iterrows():
        single[(r.group_a, r.index_a)] = r.effect_a
        single[(r.group_b, r.index_b)] = r.effect_b
    order = sorted(single, key=lambda p: single[p])
    inter = {(r.group_a, r.index_a, r.group_b, r.index_b): r.interaction for r in exact.itertuples()}
    at = {p: k for k, p in enumerate(parts)}
    curve = []
    with torch.no_grad():
        base = [per_example_metric("loss", call(model, b.inputs), b.targets) for b in batches]
        acc0 = sum(float((call(model, b.inputs).argmax(-1) == b.targets).sum()) for b in batches) / len(texts)
        pair_sum = 0.0
        for k in range(1, len(order) + 1):
            new = order[k - 1]
            for old in order[:k - 1]:
                a, b = sorted([new, old], key=lambda p: at[p])
                pair_sum += inter[(*a, *b)]
            remove: dict[str, list[int]] = {}
            for g, i in order[:k]:
                remove.setdefault(g, []).append(i)
            loss, acc = 0.0, 0.0
            with pm.ablate(remove):
                for b, b0 in zip(batches, base):
                    out = call(model, b.inputs)
                    loss += float((per_example_metric("loss", out, b.targets) - b0).sum())
                    acc += float((out.argmax(-1) == b.targets).sum())
            s1 = sum(single[p] for p in order[:k])
            curve.append({"k": k, "joint": loss / len(texts), "sum_single": s1, "sum_single_plus_pairs": s1 + pair_sum,
                          "accuracy": acc / len(texts)})
    res["curve"] = curve
    res["accuracy_intact"] = acc0
    depart = next((c["k"] for c in curve if abs(c["joint"] - c["sum_single"]) > max(0.1 * abs(c["joint"]), 0.01)), None)
    depart_p = next((c["k"] for c in curve if abs(c["joint"] - c["sum_single_plus_pairs"]) > max(0.1 * abs(c["joint"]), 0.01)), None)
    res.update(departs_at=depart, pairs_depart_at=depart_p)
    log(f"joint vs sum (k least important heads removed together; intact accuracy {acc0:.3f}):")
    log("   k   joint Δloss   Σ single   Σ single + Σ pairs   accuracy")
    for c in curve:
        if c["k"] in (1, 2, 4, 6, 8, 12, 18, 24, 30, 36, 42, 48, 54, 60, 66, 72) or c["k"] in (depart, depart_p):
            log(f"  {c['k']:2d}   {c['joint']:+.4f}     {c['sum_single']:+.4f}   {c['sum_single_plus_pairs']:+.4f}"
                f"            {c['accuracy']:.3f}")
    log(f"the sum of single effects is off by >10% (and >0.01) from k = {depart}; with the pairwise terms from k = {depart_p}")

    save()
    if not args.stage_dir:
        t = time.perf_counter()
        est = pz.interactions(pm, batches, "head", "hessian", block=args.block)
        t_h = time.perf_counter() - t
    val = validate_interactions(pm, batches, exact=exact, estimate=est, k=50)
    s = val.summary.iloc[0]
    log(f"hessian: {t_h:.1f} s ({t_pairs / t_h:.1f}x less than the exact pair engine); vs exact: Spearman "
        f"{s.spearman:.3f}, Kendall {s.kendall:.3f}, top-50 overlap {s.top_k_overlap:.2f}, sign agreement {s.sign_agreement:.2f}")
    res.update(hessian_s=t_h, hessian=val.summary.iloc[0].to_dict())

    save()
    clusters = redundant_clusters(exact)
    syn = synergistic_pairs(exact, k=5)
    top = clusters.groupby("cluster").head(50).groupby("cluster").agg(size=("size", "first"), strength=("strength", "first"))
    log(f"redundant clusters (edges above the 95th percentile of |I|): {len(top)}; largest 3:")
    for c in list(top.index)[:3]:
        m = clusters[clusters.cluster == c]
        log(f"  cluster {c}: {', '.join(short(g, i) for g, i in zip(m.group, m['index']))} (strength {top.loc[c, 'strength']:.4f})")
    log("most synergistic pairs: " + "; ".join(
        f"{short(r.group_a, r.index_a)}+{short(r.group_b, r.index_b)} I={r.interaction:+.4f} "
        f"(singles {r.effect_a:+.4f}, {r.effect_b:+.4f})" for r in syn.itertuples()))
    diag = [float(as_matrix(exact, h).abs().stack().mean()) for h in heads]
    log("mean |I| within each layer: " + ", ".join(f"{d:.4f}" for d in diag))
    res.update(clusters=int(len(top)), within_layer_mean_abs=diag, top_pairs=exact.reindex(
        exact.interaction.abs().sort_values(ascending=False).index).head(10).to_dict("records"))
    probe1 = C.matmul_probe()
    log(f"matmul probe after: {probe1:.0f} GFLOP/s (before {probe0:.0f}); total {time.perf_counter() - T0:.0f} s")
    res.update(probe_before=probe0, probe_after=probe1)
    save()
    log("wrote", args.out)
    return 0


def stage_batches(pm: Any, batches: list, args: argparse.Namespace) -> tuple | None:
    """The exact and Hessian interactions batch by batch, each kept in ``--stage-dir`` (``batch{i}.csv`` and its
    seconds in ``batch{i}.json``) and skipped when already there. With ``--only-batches`` those are computed and
    None is returned; otherwise, once every batch is there, ``(exact, exact s, pair-engine s, hessian, hessian s)``
    combined over the batches (each frame is a mean over its examples: weighted by the batch's size)."""
    folder = Path(args.stage_dir)
    folder.mkdir(parents=True, exist_ok=True)
    todo = args.only_batches if args.only_batches is not None else range(len(batches))
    for i in todo:
        if (folder / f"batch{i}.json").is_file():
            continue
        frames, secs = {}, {}
        for method in ("ablation", "hessian"):
            t = time.perf_counter()
            frames[method] = pz.interactions(pm, [batches[i]], "head", method, max_rows=args.max_rows if method == "ablation"
                                             else None, block=args.block if method == "hessian" else None)
            secs[method] = time.perf_counter() - t
        both = frames["ablation"].assign(hessian=frames["hessian"]["interaction"].to_numpy())
        both.to_csv(folder / f"batch{i}.csv", index=False)
        C.write_json(folder / f"batch{i}.json", {"batch": i, "examples": batches[i].size, "seconds": secs,
                                                 "machine": C.machine_line(), "threads": args.threads})
        log(f"batch {i}: {batches[i].size} examples, exact {secs['ablation']:.0f} s, hessian {secs['hessian']:.0f} s")
    if args.only_batches is not None:
        return None
    metas = [json.loads((folder / f"batch{i}.json").read_text()) for i in range(len(batches))]
    frames = [pd.read_csv(folder / f"batch{i}.csv") for i in range(len(batches))]
    w = torch.tensor([m["examples"] for m in metas], dtype=torch.float64)
    keys = ["group_a", "index_a", "group_b", "index_b"]
    exact = frames[0][[*keys, "method"]].copy()
    for col in ("interaction", "joint", "effect_a", "effect_b", "hessian"):
        vals = torch.tensor(pd.concat([f[col] for f in frames], axis=1).to_numpy(), dtype=torch.float64)
        exact[col] = (vals * w).sum(1).numpy() / float(w.sum())
    est = exact[[*keys]].assign(interaction=exact.pop("hessian"), method="hessian")
    t_exact = sum(m["seconds"]["ablation"] for m in metas)
    t_h = sum(m["seconds"]["hessian"] for m in metas)
    log(f"combined {len(batches)} staged batches from {folder}: exact {t_exact:.0f} s, hessian {t_h:.0f} s in all")
    return exact, t_exact, t_exact, est, t_h


if __name__ == "__main__":
    sys.exit(main())
