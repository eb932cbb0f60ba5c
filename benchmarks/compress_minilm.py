"""particlize compress vs Torch-Pruning on the MiniLM sentiment classifier (VADER movie sentences).

For each FLOPs budget (fraction of the encoder's FLOPs kept, embeddings excluded) and seed, one run each of:

- ``pz-loop``      particlize's default: iterative rounds (≤1/3 of the remaining FLOPs each), Taylor scores,
                   global allocation by importance per FLOP, distillation recovery of ``--epochs`` per round;
- ``pz-oneshot``   particlize with the same total recovery budget as Torch-Pruning: one round, ``--epochs``
                   (its default recovery: distillation of outputs and, since session 8, of every block's
                   output at weight 5, lr 1.5e-4);
- ``pz-oneshot-latency``  the same, particles priced by their measured latency on this machine (``cost="latency"``)
                   instead of their FLOPs;
- ``pz-oneshot-blocks[-latency]``  one round with whole blocks competing beside heads and neurons (priced by
                   FLOPs, or by measured latency);
- ``pz-iter3``      the same total recovery budget split over 3 rounds: each removes the same share of what is
                   left (``1 - budget^(1/3)``) and recovers for ``--epochs / 3``;
- ``pz-steps3``, ``pz-steps8``  the cut made in 3 or 8 steps of the same share of what is left, rescored after
                   each step with no recovery between, then the whole ``--epochs`` of recovery;
- ``pz-oneshot-learned``  one round ranked by hard-concrete gates learned under the FLOPs budget with the
                   weights frozen (``--gate-steps`` steps over ``--calib`` training sentences; ``_learned.py``);
- ``pz-oneshot-hp50`` / ``-hp25`` / ``-hp200``  one round with heads priced at 50% / 25% / 200% of their FLOPs
                   in the global allocation (more or fewer heads kept than fisher per FLOP gives);
- ``pz-oneshot-uniform``  one round, the same fraction of every layer (as Torch-Pruning cuts), particlize's scores;
- ``pz-oneshot[-blocks]-hd``  the same with the layer-wise weight set by ``--hidden-weight`` (``0``: outputs only,
                   the default before session 8);
- ``...-rw``       any particlize variant with the cut readers refit by least squares on the calibration data
                   (``reweight=True``) before recovery, e.g. ``pz-oneshot-rw``, ``pz-oneshot-hd-rw``;
- ``tp-<imp>-ft``  Torch-Pruning 1.6.1 (GroupTaylor or GroupMagnitude importance, heads + FFN neurons pruned
                   uniformly per layer) then plain fine-tuning, as its users do;
- ``tp-<imp>-kd``  the same pruning then particlize's distillation recovery (separates scorer/allocation
                   from recovery); ``tp-<imp>-kdhd`` adds the layer-wise term (``--hidden-weight``), i.e. the
                   whole of particlize's recovery recipe on Torch-Pruning's cut.

Printed per run and summarised (mean ± std over seeds): params, encoder FLOPs kept, test accuracy before and
after recovery, CPU latency (batch 32 × 64 tokens, median of interleaved repetitions) and speedup vs dense.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/compress_minilm.py --model out/minilm-vader \
        --budgets 0.5 0.25 0.125 --seeds 0 1 2 --epochs 1

The full grid is many hours on a 2-core CPU; ``--limit N`` trains on the first N sentences (say so when
quoting), ``--variants`` picks a subset.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_line, matmul_probe, setup_threads  # noqa: E402
from _learned import learned_scorer  # noqa: E402

import particlize as pz  # noqa: E402
from particlize.allocate import allocate  # noqa: E402
from particlize.loop import CompressConfig, compress  # noqa: E402
from particlize.measure import latency_inputs, measure_latency  # noqa: E402
from particlize.recover import RECOVER_LR, RecoveryConfig, recover, train_classifier  # noqa: E402
from particlize.tasks import get_task  # noqa: E402
from particlize.tasks.base import logits_of  # noqa: E402

VARIANTS = ("pz-loop", "pz-oneshot", "pz-oneshot-latency", "pz-oneshot-blocks", "pz-oneshot-blocks-latency",
            "pz-oneshot-hd", "pz-oneshot-blocks-hd", "pz-oneshot-uniform", "pz-iter3", "pz-steps3", "pz-steps8", "pz-oneshot-rw", "pz-oneshot-hd-rw",
            "pz-iter3-rw", "pz-oneshot-learned", "pz-oneshot-hp50", "pz-oneshot-hp25", "pz-oneshot-hp200", "tp-taylor-ft", "tp-magnitude-ft", "tp-taylor-kd", "tp-magnitude-kd", "tp-taylor-kdhd",
            "tp-magnitude-kdhd")


def encoder_flops(model) -> float:
    """Encoder FLOPs per token at 64 tokens, as particlize counts them (transformer layers only)."""
    return pz.decompose(model, seq_len=64).cost().flops


def tp_prune(model, task, tok, fraction: float, importance: str, calib: int, seed: int):
    """Torch-Pruning 1.6.1 on the classifier's encoder: ``fraction`` of heads and FFN neurons per layer."""
    import torch_pruning as tp

    enc = model.encoder
    num_heads, ignored = {}, [model.classifier]
    for layer in enc.encoder.layer:
        sa = layer.attention.self
        for m in (sa.query, sa.key, sa.value):
            num_heads[m] = sa.num_attention_heads
        ignored += [layer.attention.output.dense, layer.output.dense]
    example = {k: v[:2, :8] for k, v in task.batches("train", tokenizer=tok, batch_size=2, limit=2)[0][0].items()}
    imp = tp.importance.GroupTaylorImportance() if importance == "taylor" else tp.importance.GroupMagnitudeImportance(p=2)
    pruner = tp.pruner.BasePruner(
        model, example, importance=imp, pruning_ratio=fraction, ignored_layers=ignored, global_pruning=False,
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=fraction,
        output_transform=lambda o: o.sum(),
    )
    if importance == "taylor":
        model.zero_grad()
        for inputs, y in task.batches("train", tokenizer=tok, batch_size=32, limit=calib, shuffle=True, seed=seed):
            torch.nn.functional.cross_entropy(logits_of(model, inputs), y).backward()
    pruner.step()
    for layer in enc.encoder.layer:  # what Torch-Pruning leaves to its users
        sa = layer.attention.self
        sa.num_attention_heads = sa.query.out_features // sa.attention_head_size
        sa.all_head_size = sa.query.out_features
    model.zero_grad(set_to_none=True)
    heads = [layer.attention.self.num_attention_heads for layer in enc.encoder.layer]
    if all(h == 12 for h in heads) and fraction > 0:
        raise RuntimeError("Torch-Pruning silently kept every head (attention channel ratio 0?)")
    return model.eval(), heads


def run(variant: str, dense, task, tok, budget: float, seed: int, args) -> dict:
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    # one learning rate for every tool: particlize's recovery default unless --lr says otherwise
    opts = dict(batch_size=32, max_length=64, limit=args.limit, seed=seed, lr=args.lr or RECOVER_LR["text"])
    if variant.startswith("pz-steps"):  # k cuts, rescored after each, no recovery between; then the whole budget
        k = int(variant.removeprefix("pz-steps"))
        cfg = CompressConfig.from_options(target_flops=budget, recover_epochs=0, min_quality=0.0, calib_examples=args.calib,
                             max_fraction=1 - budget ** (1 / k) + 0.01, round_to=args.round_to, min_width=args.min_width,
                             **opts)
        before = compress(copy.deepcopy(dense), task, tokenizer=tok, config=cfg).model
        model = copy.deepcopy(before)
        recover(model, dense, task, RecoveryConfig(epochs=args.epochs, lr=opts["lr"], kd_alpha=args.kd_alpha,
                                                   temperature=args.temperature, val_every=args.val_every,
                                                   patience=args.patience),
                tokenizer=tok, batch_size=32, max_length=64, seed=seed, limit=args.limit)
        extra = {"rounds": k, "epochs": args.epochs}
    elif variant.startswith("pz"):
        reweight = variant.endswith("-rw")
        variant_core = variant.removesuffix("-rw")
        iters = 3 if variant_core == "pz-iter3" else 1
        fraction = 1.0 if "oneshot" in variant else (1 - budget ** (1 / 3) + 0.01 if iters == 3 else 1 / 3)
        cfg = CompressConfig.from_options(target_flops=budget, recover_epochs=args.epochs / iters, min_quality=0.0,
                             calib_examples=args.calib, max_fraction=fraction, round_to=args.round_to,
                             min_width=args.min_width,
                             cost="latency" if variant_core.endswith("-latency") else "flops",
                             granularity=("heads", "neurons", "blocks") if "blocks" in variant else ("heads", "neurons"),
                             hidden_weight=args.hidden_weight if variant_core.endswith("-hd") else None,
                             allocation="uniform" if variant_core.endswith("-uniform") else "global", reweight=reweight,
                             kd_alpha=args.kd_alpha, temperature=args.temperature, val_every=args.val_every,
                             patience=args.patience, **opts)
        learned = variant_core.endswith("-learned")
        hp = variant_core.removeprefix("pz-oneshot-hp") if variant_core.startswith("pz-oneshot-hp") else None
        scorer = learned_scorer(budget, args.gate_steps, cfg.max_length) if learned else None
        allocator = head_price(int(hp) / 100) if hp else None
        before_cfg = copy.deepcopy(cfg)
        before_cfg.recovery.epochs = 0
        before = compress(copy.deepcopy(dense), task, tokenizer=tok, config=before_cfg, scorer=scorer, allocator=allocator).model
        res = compress(dense, task, tokenizer=tok, config=cfg, scorer=scorer, allocator=allocator)
        model, rounds = res.model, res.history[-1]["round"]
        extra = {"rounds": rounds, "epochs": sum(e.get("recovery", {}).get("epochs", 0) for e in res.history)}
    else:
        _, imp, rec = variant.split("-")
        model, heads = tp_prune(copy.deepcopy(dense), task, tok, 1 - budget, imp, args.calib, seed)
        before = copy.deepcopy(model)
        train_classifier(model, task, tokenizer=tok, epochs=args.epochs, teacher=dense if rec.startswith("kd") else None,
                         kd_alpha=args.kd_alpha, temperature=args.temperature,
                         hidden_weight=args.hidden_weight if rec == "kdhd" else 0.0,
                         **{k: v for k, v in opts.items() if k != "seed"}, seed=seed)
        extra = {"heads_per_layer": heads, "epochs": args.epochs}
    acc_before = task.evaluate(before, "test", tokenizer=tok)["accuracy"]
    acc = task.evaluate(model, "test", tokenizer=tok)["accuracy"]
    return {"variant": variant, "budget": budget, "seed": seed, "params": sum(p.numel() for p in model.parameters()),
            "flops": encoder_flops(model), "acc_before": acc_before, "acc": acc, "seconds": time.perf_counter() - t0,
            "widths": layer_widths(model), "model": model, **extra}


def head_price(factor: float):
    """A compress allocator: global allocation pricing a head at ``factor`` × its FLOPs (neurons at theirs), so
    heads are removed later (``factor`` < 1) or sooner than fisher-per-FLOP says."""

    def allocator(pm, importance, flops_to_remove, cfg, seq_len, prices=None, base_sizes=None):
        table = pm.table(seq_len=seq_len)
        per = table.groupby("kind").flops.median()
        prices = {"head": float(per["head"]) * factor, "neuron": float(per["neuron"])}
        return allocate(pm, importance, flops_to_remove, cfg, seq_len, prices, base_sizes)

    return allocator


def layer_widths(model) -> list[list[int]]:
    """``[[heads, FFN neurons], ...]`` per remaining layer: all that the latency of the architecture
    depends on (``latency_allocation.py --widths`` rebuilds and times it in a quiet run)."""
    pm = pz.decompose(model)
    return [[h.size, n.size] for h, n in zip(pm.select("head"), pm.select("neuron"))]


def latency_table(models: dict, inputs, rounds: int) -> dict[str, float]:
    """Median ms per model, measured interleaved (dense, a, b, dense, a, b, …)."""
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for name, m in models.items():
            times[name].append(measure_latency(m, inputs, warmup=1, reps=3))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="out/minilm-vader")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--epochs", type=float, default=1, help="recovery epochs (fractional: part of a pass)")
    ap.add_argument("--lr", type=float, default=None, help="recovery learning rate of every variant (default: particlize's, 1.5e-4)")
    ap.add_argument("--limit", type=int, default=None, help="train on the first N sentences only")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--gate-steps", type=int, default=200, help="pz-oneshot-learned: gate-learning steps (batch 32)")
    ap.add_argument("--round-to", type=int, default=None, help="particlize: keep widths multiples of this many features")
    ap.add_argument("--min-width", type=float, default=0.1, help="particlize: the smallest share of a layer's heads / neurons kept")
    ap.add_argument("--val-every", type=float, default=None,
                    help="particlize variants: validate every this fraction of an epoch in recovery (early stopping)")
    ap.add_argument("--patience", type=int, default=1, help="particlize variants: validations without improvement before recovery stops")
    ap.add_argument("--hidden-weight", type=float, default=5.0, help="layer-wise distillation weight of the -hd and -kdhd variants")
    ap.add_argument("--kd-alpha", type=float, default=0.5, help="distillation weight (particlize and the -kd variants)")
    ap.add_argument("--temperature", type=float, default=2.0, help="distillation temperature")
    ap.add_argument("--latency-rounds", type=int, default=5, help="0: no timing here (time the widths later)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    setup_threads()
    if not (Path(args.model) / "particlize.json").is_file():
        print(f"no classifier at {args.model}: run `particlize train minilm --task vader-sentiment --out {args.model}`")
        return 2
    print(machine_line(), f"matmul probe {matmul_probe():.0f} GFLOP/s", sep="\n")
    from transformers import AutoTokenizer

    dense = pz.load(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    task = get_task("vader-sentiment")
    dense_acc = task.evaluate(dense, "test", tokenizer=tok)["accuracy"]
    dense_flops = encoder_flops(dense)
    print(f"dense: test accuracy {dense_acc:.4f}, {sum(p.numel() for p in dense.parameters()):,} params")
    rows, models = [], {"dense": dense}
    for budget in args.budgets:
        for seed in args.seeds:
            for v in args.variants:
                r = run(v, dense, task, tok, budget, seed, args)
                models[f"{v}@{budget}/{seed}"] = r.pop("model")
                r["flops_kept"] = r["flops"] / dense_flops
                rows.append(r)
                print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()}), flush=True)
    if args.latency_rounds:
        lat = latency_table(models, latency_inputs(task, tok, 32, 64), args.latency_rounds)
    else:  # timed later, from the widths, in a quiet run
        lat = {k: float("nan") for k in models}
    for r in rows:
        r["latency_ms"] = lat[f"{r['variant']}@{r['budget']}/{r['seed']}"]
        r["speedup"] = lat["dense"] / r["latency_ms"]
    print(f"\nmatmul probe after: {matmul_probe():.0f} GFLOP/s; dense latency {lat['dense']:.1f} ms")
    print(f"\n{'budget':>6} {'variant':<17} {'FLOPs kept':>10} {'params':>11} {'acc before':>16} {'acc after':>16} "
          f"{'speedup':>8} {'epochs':>6}")
    for budget in args.budgets:
        for v in args.variants:
            part = [r for r in rows if r["budget"] == budget and r["variant"] == v]

            def ms(key):
                xs = [r[key] for r in part]
                return f"{statistics.mean(xs):.4f}±{statistics.stdev(xs) if len(xs) > 1 else 0:.4f}"

            print(f"{budget:>6} {v:<17} {statistics.mean(r['flops_kept'] for r in part):>10.3f} "
                  f"{statistics.mean(r['params'] for r in part):>11,.0f} {ms('acc_before'):>16} {ms('acc'):>16} "
                  f"{statistics.mean(r['speedup'] for r in part):>7.2f}× {part[0]['epochs']:>6}")
    print(f"dense test accuracy {dense_acc:.4f}; seeds {args.seeds}; limit {args.limit}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
