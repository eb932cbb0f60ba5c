"""How close exact ablation runs to its arithmetic limit, per model (issue 29): measured naive / engine time beside
naive FLOPs / engine FLOPs, for every kind of model particlize ships an adapter for.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/ablation_limit.py [--models minilm llama sora-tiny resnet-small]
        [--per-group 8] [--rounds 2]

For each model, ``--per-group`` particles of every head / neuron / channel group are ablated (seeded sample; all of
a group if it has fewer) on a small batch of its own kind:
- ``minilm``: the trained MiniLM classifier (``out/minilm-vader``; MiniLM with a fresh head if it is missing), the first
  32 VADER test sentences sorted by length, in one padded batch;
- ``llama``: a 4-layer, hidden-512 GQA Llama (8 query heads in 2 key/value groups, 1,408 FFN neurons, a 4,096-word
  vocabulary: its output head is about 15% of its FLOPs, TinyLlama-1.1B's 6%; 32k words would make it half), random weights,
  8 × 64 random tokens, next-token loss;
- ``sora-tiny``: the shipped video DiT, 16 noised training videos at seeded steps (`moving-digits` calibration), ε-MSE;
- ``resnet-small``: the small residual CNN, 32 random 28 × 28 images with random labels.

The engine (``ablation_effects()``) and the naive loop (``fast=False``: one full forward per particle) get the same
particles, in interleaved rounds (the first call of each side is a warm-up). Each side's fixed cost (a call with no
particle) is measured the same way and subtracted, so the ratio is per particle, as in a sweep of every particle.
The limit counts FLOPs with torch's ``FlopCounterMode`` (matmuls, convolutions, the attention kernels it knows):
the naive loop's are one clean forward per particle; the engine's are what it schedules for the sample beyond its
fixed cost. Effects are compared on both sides (bound 1e-4).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import _common as C
import torch

MODELS = ("minilm", "llama", "sora-tiny", "resnet-small")


def _minilm() -> tuple[Any, list, str]:
    from analysis_minilm import make_batches

    import particlize as pz
    from particlize.tasks import get_task

    path = C.ROOT / "out" / "minilm-vader"
    if path.is_dir():
        model, tok, *_ = C.classifier_and_particles(str(path))
    else:
        from transformers import AutoTokenizer

        from particlize.models.text import TextClassifier
        from particlize.sources import minilm_path

        torch.manual_seed(0)
        model, tok = TextClassifier.from_pretrained_encoder(minilm_path(), 2).eval(), AutoTokenizer.from_pretrained(str(minilm_path()))
    texts, labels = get_task("vader-sentiment").split("test")
    return model, pz.analysis.as_batches(make_batches(tok, texts[:32], labels[:32], 32, True)), "loss"


def _llama() -> tuple[Any, list, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    import particlize as pz

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                      intermediate_size=1408, vocab_size=4096, max_position_embeddings=256, use_cache=False)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (8, 65), generator=torch.Generator().manual_seed(1))
    return model, pz.analysis.as_batches([(ids[:, :-1], ids[:, 1:])]), "loss"


def _sora() -> tuple[Any, list, str]:
    import particlize as pz
    from particlize.tasks import get_task

    model = pz.load("sora-tiny").eval()
    calib = get_task("moving-digits").calibration(model, limit=16, batch_size=16, seed=0)
    return model, pz.analysis.as_batches(calib), "mse"


def _resnet() -> tuple[Any, list, str]:
    import particlize as pz
    from particlize.sources import NEW_MODELS

    torch.manual_seed(0)
    model = NEW_MODELS["resnet-small"]().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    return model, pz.analysis.as_batches([(x, y)]), "loss"


BUILD = {"minilm": _minilm, "llama": _llama, "sora-tiny": _sora, "resnet-small": _resnet}


def measure(name: str, per_group: int, rounds: int) -> dict[str, Any]:
    """Per-particle times and FLOPs of both sides for one model (see the module docstring)."""
    import particlize as pz
    from _gpu_ablation import flops

    from particlize.analysis._common import call
    from particlize.analysis.ablation import ablation_effects

    model, batches, metric = BUILD[name]()
    pm = pz.decompose(model)
    groups = [g.name for g in pm.groups if g.kind in ("head", "neuron", "channel", "kv_head", "unit")]
    gen = torch.Generator().manual_seed(0)
    only = {g: sorted(torch.randperm(pm[g].size, generator=gen)[:per_group].tolist()) for g in groups}
    n = sum(len(v) for v in only.values())
    none = {groups[0]: []}

    def run(fast: bool, which: dict) -> tuple[float, dict]:
        t = time.perf_counter()
        eff = ablation_effects(pm, batches, metric=metric, groups=list(which), only=which, fast=fast)
        return time.perf_counter() - t, eff

    run(True, only), run(False, none)  # warm-up
    T: dict[tuple[bool, str], list[float]] = {}
    worst = 0.0
    for r in range(rounds):
        got = {}
        for fast in ([True, False] if r % 2 == 0 else [False, True]):
            T.setdefault((fast, "fixed"), []).append(run(fast, none)[0])
            t, got[fast] = run(fast, only)
            T.setdefault((fast, "all"), []).append(t)
        worst = max(worst, max(float((got[True][g] - got[False][g]).nan_to_num().abs().max()) for g in groups))
    per = {fast: max(1e-9, statistics.median(T[(fast, "all")]) - statistics.median(T[(fast, "fixed")])) / n
           for fast in (True, False)}
    with torch.no_grad():
        clean = flops(lambda: [call(model, b.inputs) for b in batches])
    e_fixed = flops(lambda: ablation_effects(pm, batches, metric=metric, groups=list(none), only=none))
    e_all = flops(lambda: ablation_effects(pm, batches, metric=metric, groups=groups, only=only))
    limit = clean * n / max(1, e_all - e_fixed)
    return {"model": name, "particles": n, "groups": len(groups), "naive_s": per[False], "engine_s": per[True],
            "measured": per[False] / per[True], "limit": limit, "share": per[False] / per[True] / limit,
            "max_diff": worst}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--per-group", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    C.start()
    rows, bad = [], []
    for name in args.models:
        r = measure(name, args.per_group, args.rounds)
        print(f"{name}: {r}", flush=True)
        rows.append([name, f"{r['particles']} in {r['groups']} groups", f"{r['naive_s'] * 1e3:.2f}", f"{r['engine_s'] * 1e3:.2f}",
                     f"{r['measured']:.2f}×", f"{r['limit']:.2f}×", f"{r['share']:.0%}", f"{r['max_diff']:.1e}"])
        if r["max_diff"] > 1e-4:
            bad.append(name)
    C.print_table(["model", "particles ablated", "naive ms / particle", "engine ms / particle", "measured",
                   "arithmetic limit", "share of the limit", "max |Δ effect|"], rows)
    if bad:
        print(f"FAIL: the engine and the naive loop disagree on {', '.join(bad)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
