"""Exact ablation and screening on the MiniLM sentiment classifier (issue 4).

    .venv/bin/python benchmarks/analysis_minilm.py [--examples 512] [--rounds 2] [--neurons-per-layer 16]
        [--max-rows 1024] [--batch-size 64] [--sweep 256x64,4096x64,1024x32,1024x128]
        [--topk 50] [--topk-layers 2] [--topk-examples 128] [--taylor-rounds 3]

The model is the MiniLM (all-MiniLM-L6-v2) classifier fine-tuned on VADER movie-review sentences
(``--model out/minilm-vader``), scored on the first ``--examples`` sentences of the held-out test split;
metric = mean cross-entropy (``loss``), mode = ``zero``. Sentences are sorted by token length before
batching (less padding; ``--no-sort`` to turn it off) and BOTH sides of every comparison get the very
same batches. 2 threads, no_grad/inference_mode, interleaved rounds, medians and paired ratios, a matmul
probe before and after (../shared/BENCHMARKING.md).

1. Heads: exact zero-ablation of all 72 heads, particlize's fast engine (``fast=True``) vs the naive
   loop (``fast=False``: one full forward per particle, what TransformerLens / Captum FeatureAblation do);
   identical-scores check; a sweep of ``max_rows`` and batch sizes for the fast engine.
2. Neurons: a fixed seeded random sample of FFN neurons per layer, both sides, identical-scores check;
   full 9,216-neuron sweep times EXTRAPOLATED from it (per layer for the fast engine).
3. Top-k screening: on all heads + the neurons of the last ``--topk-layers`` layers (on the first
   ``--topk-examples`` test sentences): full exact sweep (fast engine) vs ``top_particles(screen="taylor")``.
4. Taylor (attribution patching) vs exact ablation: Spearman / Kendall per kind; time of ``taylor``
   relative to a plain forward+backward over the same batches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import _common as C
import pandas as pd
import torch
import torch.nn.functional as F

ROW_FMT = "{:.3f}"


def log(*a: Any) -> None:
    print(*a, flush=True)


# ---- data ----------------------------------------------------------------------------------------


def make_batches(tok: Any, texts: list[str], labels: torch.Tensor, batch_size: int, sort: bool) -> list[Any]:
    """``Batch`` objects (padding to the longest of each batch, max 64 tokens, as ``Task.batches``);
    sentences sorted by token length first when ``sort``."""
    from particlize.analysis._common import as_batches

    n = len(texts)
    order = list(range(n))
    if sort:
        lens = [len(tok(t, truncation=True, max_length=64)["input_ids"]) for t in texts]
        order.sort(key=lambda i: (lens[i], i))
    out = []
    for s in range(0, n, batch_size):
        idx = order[s:s + batch_size]
        enc = tok([texts[i] for i in idx], padding="longest", truncation=True, max_length=64, return_tensors="pt")
        out.append(({"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()},
                    labels[torch.tensor(idx)]))
    return as_batches(out)


def tokens(batches: list[Any]) -> tuple[int, int]:
    """(padded tokens, real tokens) over ``batches``."""
    pad = sum(int(b.inputs["input_ids"].numel()) for b in batches)
    real = sum(int(b.inputs["attention_mask"].sum()) for b in batches)
    return pad, real


def forward_time(model: torch.nn.Module, batches: list[Any]) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for b in batches:
            model(**b.inputs)
    return time.perf_counter() - t


# ---- scores --------------------------------------------------------------------------------------


class GroupTimer:
    """A ``progress`` callback: wall time between consecutive callbacks, charged to the group named."""

    def __init__(self) -> None:
        self.per: dict[str, float] = {}
        self.t = time.perf_counter()

    def start(self) -> None:
        self.per, self.t = {}, time.perf_counter()

    def __call__(self, done: int, total: int, name: str) -> None:
        now = time.perf_counter()
        self.per[name] = self.per.get(name, 0.0) + now - self.t
        self.t = now


def effects_frame(eff: dict[str, torch.Tensor], method: str = "ablation") -> pd.DataFrame:
    """Long frame ``group, index, method, score`` (mean over examples) of the particles that were run."""
    rows = []
    for g, e in eff.items():
        m = e.mean(0)
        for i in torch.nonzero(~torch.isnan(m)).flatten().tolist():
            rows.append((g, i, method, float(m[i])))
    return pd.DataFrame(rows, columns=["group", "index", "method", "score"])


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float, bool]:
    """(max |Δ| of the per-particle mean effect, max |Δ| per example, same NaN pattern)."""
    dm, de, same = 0.0, 0.0, True
    for g in a:
        x, y = a[g], b[g]
        same &= bool(torch.equal(torch.isnan(x), torch.isnan(y)))
        ok = ~torch.isnan(x.mean(0))
        if ok.any():
            dm = max(dm, float((x.mean(0)[ok] - y.mean(0)[ok]).abs().max()))
            de = max(de, float((x[:, ok] - y[:, ok]).abs().max()))
    return dm, de, same


def ratio_summary(num: list[float], den: list[float]) -> str:
    r = [a / b for a, b in zip(num, den)]
    return f"{statistics.median(r):.2f}× ({min(r):.2f}–{max(r):.2f})"


# ---- main ----------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(C.ROOT / "out" / "minilm-vader"))
    ap.add_argument("--examples", type=int, default=512, help="test sentences (first N of the split)")
    ap.add_argument("--batch-size", type=int, default=64, help="sentences per batch for the main comparisons")
    ap.add_argument("--max-rows", type=int, default=1024, help="fast engine rows per ablation forward (main runs)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the head comparison")
    ap.add_argument("--neurons-per-layer", type=int, default=16, help="seeded random FFN neurons per layer (section 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-sort", action="store_true", help="do not sort sentences by length before batching")
    ap.add_argument("--sweep", default="256x64,4096x64,1024x32,1024x128",
                    help="extra fast-engine configs max_rows x batch_size on the 72 heads ('' to skip)")
    ap.add_argument("--topk", type=int, default=50)
    ap.add_argument("--topk-layers", type=int, default=2, help="neurons of the last N layers join the heads in section 3")
    ap.add_argument("--topk-examples", type=int, default=128)
    ap.add_argument("--taylor-rounds", type=int, default=3)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: heads,sweep,neurons,topk,taylor")
    ap.add_argument("--threads", type=int, default=C.THREADS, help="torch threads (both sides)")
    ap.add_argument("--sweep-csv", default=None, help="write section 3's full exact sweep (with taylor scores) here")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import particlize as pz
    from particlize.analysis.ablation import ablation_effects
    from particlize.tasks import get_task

    torch.set_num_threads(args.threads)
    T0 = time.perf_counter()
    log("analysis_minilm:", C.machine_line())
    log("command:", " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]))
    model, tok, pm, heads, neurons = C.classifier_and_particles(args.model)
    log(f"model {args.model}: {type(model).__name__}, {C.n_params(model) / 1e6:.2f}M params; "
        f"{len(heads)} head groups x {pm[heads[0]].size} = {sum(pm[g].size for g in heads)} heads, "
        f"{len(neurons)} neuron groups x {pm[neurons[0]].size} = {sum(pm[g].size for g in neurons)} neurons "
        f"(e.g. {heads[0]!r}, {neurons[0]!r})")
    task = get_task("vader-sentiment")
    texts, labels = task.split("test")
    texts, labels = texts[:args.examples], labels[:args.examples]
    sort = not args.no_sort
    batches = make_batches(tok, texts, labels, args.batch_size, sort)
    unsorted = make_batches(tok, texts, labels, args.batch_size, False)
    with torch.inference_mode():
        ev = task.evaluate(model, "test", tokenizer=tok, limit=args.examples)
    pad, real = tokens(batches)
    upad, _ = tokens(unsorted)
    log(f"data: first {len(texts)} sentences of the vader-sentiment test split (label balance "
        f"{float(labels.float().mean()):.3f}); model accuracy {ev['accuracy']:.4f}, loss {ev['loss']:.4f} on them")
    forward_time(model, batches)  # warm-up
    f_sorted = statistics.median(forward_time(model, batches) for _ in range(3))
    f_unsorted = statistics.median(forward_time(model, unsorted) for _ in range(3))
    log(f"batches: {len(batches)} x {args.batch_size} sentences, {'sorted by length' if sort else 'split order'}: "
        f"{pad} padded tokens for {real} real ({pad / real:.2f}x) vs {upad} unsorted ({upad / real:.2f}x); "
        f"one inference forward over all {len(texts)}: {f_sorted:.2f} s sorted, {f_unsorted:.2f} s unsorted (median of 3)")

    probe0 = C.matmul_probe()
    log(f"matmul probe before: {probe0:.0f} GFLOP/s")
    results: dict[str, Any] = {}
    gtimer = GroupTimer()

    def run(fast: bool, groups: list[str], bs: list[Any], max_rows: int = args.max_rows,
            only: dict[str, list[int]] | None = None, timer: GroupTimer | None = None) -> tuple[float, dict]:
        if timer is not None:
            timer.start()
        t = time.perf_counter()
        eff = ablation_effects(pm, bs, metric="loss", mode="zero", groups=groups, max_rows=max_rows,
                               fast=fast, only=only, progress=timer)
        return time.perf_counter() - t, eff

    # warm-up of both engines (one batch, two heads of one layer)
    run(True, heads[:1], batches[:1], only={heads[0]: [0, 1]})
    run(False, heads[:1], batches[:1], only={heads[0]: [0, 1]})

    # ---- 1. heads ------------------------------------------------------------------------------
    failed: list[str] = []  # equality checks that did not hold: the run exits 1
    exact_heads = None
    if "heads" not in skip:
        log(f"\n## 1. all {sum(pm[g].size for g in heads)} heads, exact zero-ablation, {len(texts)} sentences, "
            f"batch {args.batch_size}, max_rows {args.max_rows}; {args.rounds} interleaved rounds")
        tf, tn, diffs = [], [], []
        for r in range(args.rounds):
            order = [True, False] if r % 2 == 0 else [False, True]
            res = {}
            for fast in order:
                t, eff = run(fast, heads, batches)
                res[fast] = eff
                (tf if fast else tn).append(t)
                log(f"  round {r + 1}: {'fast ' if fast else 'naive'} {t:.1f} s")
            diffs.append(max_diff(res[True], res[False]))
            exact_heads = res[True]
        dm = max(d[0] for d in diffs)
        de = max(d[1] for d in diffs)
        log(f"identical scores: max |Δ mean effect| = {dm:.2e}, max |Δ per-example effect| = {de:.2e} "
            f"({'PASS' if dm <= 1e-4 else 'FAIL'} at 1e-4)")
        if dm > 1e-4:
            failed.append(f"heads: fast and naive mean effects differ by {dm:.2e}")
        rows = [["naive loop (fast=False): 1 full forward per head", f"{statistics.median(tn):.1f}",
                 f"{min(tn):.1f}–{max(tn):.1f}", f"{statistics.median(tn) / 72:.2f}", "1.00×"],
                ["particlize fast engine (fast=True)", f"{statistics.median(tf):.1f}", f"{min(tf):.1f}–{max(tf):.1f}",
                 f"{statistics.median(tf) / 72:.2f}", ratio_summary(tn, tf)]]
        results["heads_table"] = C.print_table(
            ["side", "median s (72 heads)", "min–max s", "s / head", "paired speedup naive/fast: median (min–max)"], rows)
        faster = sum(n > f for n, f in zip(tn, tf))
        log(f"fast faster in {faster}/{len(tf)} rounds; per-example max |Δ| {de:.1e}")

    # ---- 1b. sweep of max_rows and batch size (fast engine) -------------------------------------
    if "sweep" not in skip and args.sweep:
        log(f"\n## 1b. fast engine on the 72 heads: max_rows x batch size (one run each; same {len(texts)} sentences, "
            f"{'sorted' if sort else 'unsorted'}); the naive loop's cost at each batch size ~ 72 x one forward")
        configs = [(args.max_rows, args.batch_size)] + [tuple(int(v) for v in c.split("x")) for c in args.sweep.split(",")]
        cache_b = {args.batch_size: batches}
        rows = []
        for mr, bsz in configs:
            bs = cache_b.setdefault(bsz, make_batches(tok, texts, labels, bsz, sort))
            fwd = statistics.median(forward_time(model, bs) for _ in range(2))
            if (mr, bsz) == (args.max_rows, args.batch_size) and "heads" not in skip:
                t = statistics.median(tf)
                note = f"median of section 1 ({args.rounds} runs)"
            else:
                t, _ = run(True, heads, bs, max_rows=mr)
                note = "1 run"
            rows.append([mr, bsz, min(max(1, mr // bsz), pm[heads[0]].size), f"{t:.1f}", f"{fwd:.2f}", f"{72 * fwd:.0f}",
                         f"{72 * fwd / t:.2f}×", note])
            log(f"  max_rows {mr} batch {bsz}: {t:.1f} s")
        results["sweep_table"] = C.print_table(
            ["max_rows", "batch", "heads per ablation forward", "fast s (72 heads)", "1 forward s (all sentences)",
             "naive est. s (72 x fwd)", "est. naive/fast", "timing"], rows)

    # ---- 2. neurons ---------------------------------------------------------------------------------
    exact_neurons = None
    if "neurons" not in skip:
        gen = torch.Generator().manual_seed(args.seed)
        npl = args.neurons_per_layer
        sample = {g: sorted(torch.randperm(pm[g].size, generator=gen)[:npl].tolist()) for g in neurons}
        ns = sum(len(v) for v in sample.values())
        log(f"\n## 2. FFN neurons: seeded random sample of {npl} per layer (torch.randperm, seed {args.seed}) = {ns} "
            f"neurons, exact zero-ablation, {len(texts)} sentences, batch {args.batch_size}, max_rows {args.max_rows}")
        log("  sample: " + "; ".join(f"L{i}: {v[:4]}..." for i, v in enumerate(sample.values())))
        tn_t, eff_n = run(False, neurons, batches, only=sample)
        log(f"  naive {tn_t:.1f} s")
        tf_t, eff_f = run(True, neurons, batches, only=sample, timer=gtimer)
        per_layer = dict(gtimer.per)
        log(f"  fast  {tf_t:.1f} s")
        dm, de, same = max_diff(eff_f, eff_n)
        log(f"identical scores: max |Δ mean effect| = {dm:.2e}, per-example {de:.2e}, same particles run: {same} "
            f"({'PASS' if dm <= 1e-4 and same else 'FAIL'} at 1e-4)")
        if not (dm <= 1e-4 and same):
            failed.append(f"neurons: fast and naive mean effects differ by {dm:.2e} (same particles run: {same})")
        exact_neurons = eff_f
        # extrapolation to all 9,216 neurons
        clean = f_sorted  # one clean forward over the batches: done once per call by both engines
        naive_per = (tn_t - clean) / ns
        naive_full = clean + naive_per * sum(pm[g].size for g in neurons)
        fast_full = clean * (1 + 1 / len(batches))
        rows = []
        for i, g in enumerate(neurons):
            # the first job's time also holds the trace forward (batch 0) and every batch's clean forward
            t_g = per_layer.get(g, 0.0) - ((clean + clean / len(batches)) if i == 0 else 0.0)
            per = max(t_g, 0.0) / len(sample[g])
            fast_full += per * pm[g].size
            rows.append([f"layer {i}", len(sample[g]), f"{per_layer.get(g, 0.0):.1f}", f"{per:.3f}",
                         f"{per * pm[g].size / 60:.1f}", f"{naive_per * pm[g].size / 60:.1f}"])
        results["neuron_layer_table"] = C.print_table(
            ["layer", "sampled", "fast s (measured)", "fast s / neuron", "fast min, all 1536 (extrap.)",
             "naive min, all 1536 (extrap.)"], rows)
        log("(layer 0's measured time includes the trace forward and the clean forward of every batch; one inference "
            "forward over all sentences (+1/batches for the trace) is subtracted for its per-neuron figure)")
        rows = [["naive loop (fast=False)", f"{tn_t:.1f}", f"{naive_per:.3f}", f"{naive_full / 60:.0f} min ({naive_full / 3600:.1f} h)"],
                ["particlize fast engine", f"{tf_t:.1f}", f"{(tf_t - clean) / ns:.3f}", f"{fast_full / 60:.0f} min ({fast_full / 3600:.1f} h)"],
                ["ratio naive/fast", f"{tn_t / tf_t:.2f}×", "", f"{naive_full / fast_full:.2f}×"]]
        results["neuron_table"] = C.print_table(
            [f"side ({ns} sampled neurons, 1 run each)", "measured s", "s / neuron", "full 9,216-neuron sweep: EXTRAPOLATED"], rows)

    # ---- 3. top-k screening ---------------------------------------------------------------------------
    top_df = full_df = None
    if "topk" not in skip:
        L = len(neurons)
        sub = heads + neurons[L - args.topk_layers:]
        n_sub = sum(pm[g].size for g in sub)
        tb = make_batches(tok, texts[:args.topk_examples], labels[:args.topk_examples], args.batch_size, sort)
        log(f"\n## 3. top-{args.topk} screening on {n_sub} particles (all heads + the neurons of layers "
            f"{', '.join(str(i) for i in range(L - args.topk_layers, L))}), first {args.topk_examples} test sentences, "
            f"batch {args.batch_size}, max_rows {args.max_rows}")
        t_full, eff_full = run(True, sub, tb, timer=gtimer)
        per_group = dict(gtimer.per)
        log(f"  full exact sweep (fast engine): {t_full:.1f} s; by group: " +
            ", ".join(f"{g.replace('encoder.encoder.layer.', 'L')} {t:.0f}s" for g, t in per_group.items()))
        full_df = effects_frame(eff_full)
        full_df["kind"] = full_df.group.map({g.name: g.kind for g in pm.groups})
        exact_top = full_df.nlargest(args.topk, "score").reset_index(drop=True)
        exact_keys = list(zip(exact_top.group, exact_top["index"]))
        # how long a shortlist taylor needs to contain the exact top-k
        t = time.perf_counter()
        tay = pz.analyze(pm, tb, "taylor", "loss", "zero", groups=sub, table=False)
        t_tay = time.perf_counter() - t
        tay["rank"] = tay["score"].rank(ascending=False, method="first").astype(int)
        if args.sweep_csv:
            full_df.merge(tay[["group", "index", "score"]].rename(columns={"score": "taylor"}), on=["group", "index"]) \
                .assign(seconds_full_sweep=t_full).to_csv(args.sweep_csv, index=False)
        trank = {(g, i): r for g, i, r in zip(tay.group, tay["index"], tay["rank"])}
        # top_particles ablates every head exactly (exhaustive kinds) and screens the neurons: the
        # shortlist it needs is the worst taylor rank, among neurons, of the exact top-k neurons
        neu = tay[tay.group.isin(neurons)].copy()
        neu["nrank"] = neu["score"].rank(ascending=False, method="first").astype(int)
        nrank = {(g, i): r for g, i, r in zip(neu.group, neu["index"], neu["nrank"])}
        need = max([nrank[k] for k in exact_keys if k in nrank], default=0)
        log(f"  taylor screen alone: {t_tay:.2f} s; the exact top-{args.topk} sit at taylor ranks up to "
            f"{max(trank[k] for k in exact_keys)} of all {n_sub}; its neurons at neuron-taylor ranks up to {need} "
            f"(the neuron shortlist needed); kinds in the exact top-{args.topk}: {exact_top.kind.value_counts().to_dict()}")
        rows = []
        shortlists = [None] + ([need] if need > 4 * args.topk else [])
        for sl in shortlists:
            t = time.perf_counter()
            top = pz.top_particles(pm, tb, k=args.topk, screen="taylor", shortlist=sl, groups=sub, max_rows=args.max_rows)
            t_top = time.perf_counter() - t
            keys = list(zip(top.group, top["index"]))
            same_set = set(keys) == set(exact_keys)
            same_order = keys == exact_keys
            overlap = len(set(keys) & set(exact_keys))
            sdiff = max(abs(s - float(full_df.set_index(["group", "index"]).loc[k, "score"])) for k, s in zip(keys, top.score))
            rows.append([f"{sl or f'{4 * args.topk} (default 4k)'} neurons + all {sum(pm[g].size for g in heads)} heads", f"{t_top:.1f}", f"{t_full / t_top:.1f}×",
                         f"{overlap}/{args.topk}", same_set, same_order, f"{sdiff:.1e}"])
            log(f"  top_particles(shortlist={sl}): {t_top:.1f} s, overlap {overlap}/{args.topk}, same order {same_order}")
            if sl is None:
                top_df = top
        rows.insert(0, [f"full sweep ({n_sub})", f"{t_full:.1f}", "1.0×", f"{args.topk}/{args.topk}", True, True, "0"])
        results["topk_table"] = C.print_table(
            ["exact ablations (shortlist)", "s", "speedup vs full sweep", "top-k overlap", "same set", "same order",
             "max |Δ score|"], rows)
        if top_df is not None:
            missed = [k for k in exact_keys if k not in set(zip(top_df.group, top_df["index"]))]
            if missed:
                log(f"  missed by the default shortlist (taylor rank): " +
                    ", ".join(f"{g.replace('encoder.encoder.layer.', 'L')}[{i}] ({trank[(g, i)]})" for g, i in missed))
        log(f"  exact top-10: " + ", ".join(f"{g.replace('encoder.encoder.layer.', 'L')}[{i}] {s:+.4f} (taylor rank {trank[(g, i)]})"
                                           for g, i, s in zip(exact_top.group[:10], exact_top["index"][:10], exact_top.score[:10])))

    # ---- 4. taylor vs exact ------------------------------------------------------------------------------
    if "taylor" not in skip:
        log(f"\n## 4. taylor (attribution patching) vs exact ablation, metric loss, mode zero")
        rows = []
        if exact_heads is not None:
            v = pz.validate_scores(pm, batches, "taylor", k=10, groups=heads, exact=effects_frame(exact_heads))
            s = v.summary[v.summary.kind == "head"].iloc[0]
            rows.append([f"heads, all 72 ({len(texts)} sentences)", int(s.particles), f"{s.spearman:.3f}", f"{s.kendall:.3f}",
                         f"{s.top_k_overlap:.2f} (k=10)"])
        if exact_neurons is not None:
            v = pz.validate_scores(pm, batches, "taylor", k=10, groups=neurons, exact=effects_frame(exact_neurons))
            s = v.summary[v.summary.kind == "neuron"].iloc[0]
            rows.append([f"neurons, sampled ({len(texts)} sentences)", int(s.particles), f"{s.spearman:.3f}", f"{s.kendall:.3f}",
                         f"{s.top_k_overlap:.2f} (k=10)"])
            for i, g in enumerate(neurons):
                p = v.scores[v.scores.group == g]
                rows.append([f"  layer {i} sample", len(p), f"{p.score_cheap.corr(p.score_exact, method='spearman'):.3f}",
                             f"{p.score_cheap.corr(p.score_exact, method='kendall'):.3f}", ""])
        if full_df is not None:
            tb = make_batches(tok, texts[:args.topk_examples], labels[:args.topk_examples], args.batch_size, sort)
            sub = sorted(set(full_df.group), key=[g.name for g in pm.groups].index)
            v = pz.validate_scores(pm, tb, "taylor", k=args.topk, groups=sub, exact=full_df.drop(columns="kind"))
            for _, s in v.summary.iterrows():
                rows.append([f"section 3 sub-problem, {s.kind} ({args.topk_examples} sentences)", int(s.particles),
                             f"{s.spearman:.3f}", f"{s.kendall:.3f}", f"{s.top_k_overlap:.2f} (k={int(s.k)})"])
            for g in sub:
                if pm[g].kind == "neuron":
                    p = v.scores[v.scores.group == g]
                    rows.append([f"  {g.replace('encoder.encoder.layer.', 'layer ').split('.')[0]} all neurons", len(p),
                                 f"{p.score_cheap.corr(p.score_exact, method='spearman'):.3f}",
                                 f"{p.score_cheap.corr(p.score_exact, method='kendall'):.3f}", ""])
        if rows:
            results["corr_table"] = C.print_table(["particles", "n", "Spearman", "Kendall", "top-k overlap"], rows)

        # time of taylor vs one forward+backward over the same batches
        params = [p for p in model.parameters()]

        def fwd_bwd() -> float:
            t = time.perf_counter()
            for b in batches:
                F.cross_entropy(model(**b.inputs), b.targets, reduction="sum").backward()
            dt = time.perf_counter() - t
            model.zero_grad(set_to_none=True)
            return dt

        def tay_all() -> tuple[float, pd.DataFrame]:
            t = time.perf_counter()
            df = pz.analyze(pm, batches, "taylor", "loss", "zero", table=False)
            return time.perf_counter() - t, df

        def tay_frozen() -> tuple[float, pd.DataFrame]:
            flags = [p.requires_grad for p in params]
            for p in params:
                p.requires_grad_(False)
            try:
                return tay_all()
            finally:
                for p, f in zip(params, flags):
                    p.requires_grad_(f)

        model.eval()
        model.zero_grad(set_to_none=True)
        _, d0 = tay_all()
        polluted = sum(p.grad is not None for p in params)
        model.zero_grad(set_to_none=True)
        _, d1 = tay_frozen()
        same = float((d0.score - d1.score).abs().max())
        fwd_bwd()
        tt, tb_, tfz, fo = [], [], [], []
        for r in range(args.taylor_rounds):
            sides = [("fb", fwd_bwd), ("tay", lambda: tay_all()[0]), ("frz", lambda: tay_frozen()[0]),
                     ("fwd", lambda: forward_time(model, batches))]
            k = r % len(sides)
            for name, fn in sides[k:] + sides[:k]:
                dt = fn()
                {"fb": tb_, "tay": tt, "frz": tfz, "fwd": fo}[name].append(dt)
            model.zero_grad(set_to_none=True)
        rows = [["inference forward (reference)", f"{statistics.median(fo):.2f}", ratio_summary(fo, tb_)],
                ["plain forward + backward (loss.backward, parameter grads)", f"{statistics.median(tb_):.2f}", "1.00×"],
                [f"pz.analyze(method='taylor'), all {sum(g.size for g in pm.groups)} particles", f"{statistics.median(tt):.2f}",
                 ratio_summary(tt, tb_)],
                ["same, parameters requires_grad=False (gate grads only)", f"{statistics.median(tfz):.2f}", ratio_summary(tfz, tb_)]]
        results["taylor_time"] = C.print_table(
            [f"{len(texts)} sentences, {len(batches)} batches; {args.taylor_rounds} interleaved rounds", "median s",
             "paired ratio to forward+backward: median (min–max)"], rows)
        log(f"taylor with frozen parameters gives the same scores (max |Δ| {same:.1e}); after pz.analyze('taylor') "
            f"{polluted}/{len(params)} parameters were left with a populated .grad")

    probe1 = C.matmul_probe()
    drift = abs(probe1 - probe0) / max(probe0, 1e-9)
    log(f"\nmatmul probe: {probe0:.0f} → {probe1:.0f} GFLOP/s ({'moved ' + format(drift, '.0%') if drift > 0.25 else 'stable within 25%'}); "
        f"total wall {(time.perf_counter() - T0) / 60:.1f} min")
    for f in failed:
        log(f"FAIL: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
