"""The compress loop's other options run to the end and do what they say: every named scorer decides the cut,
uniform allocation, params and latency targets, the int8 report; and the measurements they rest on."""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch
from torch import nn

import particlize as pz
from conftest import output_of
from loop_fixture import OPTIONS
from particlize import measure
from particlize.allocate import allocate
from particlize.analysis import importance, importance_for, scorers
from particlize.loop import CompressConfig, compress
from particlize.surgery import provenance

ONE_ROUND = {**OPTIONS, "recover_epochs": 0, "min_quality": 0.0, "max_rounds": 1, "max_fraction": 0.2}


def _removed(model, pm) -> dict[str, list[int]]:
    """{group: removed indices} of a model pruned once from the model of ``pm``, read from its plan."""
    out = {}
    for step in provenance(model)["plan"]:
        assert step.verb == "prune"
        keep = set(step.args["keep"])
        out[step.group] = [i for i in range(pm[step.group].size) if i not in keep]
    return out


def _by_hand(model, task, tok, scorer: str) -> dict[str, list[int]]:
    """Round 1 of `compress(..., **ONE_ROUND)` done by hand: its calibration batches, the scorer's importance, the
    FLOPs goal (max_fraction of the model) and the default allocator."""
    cfg = CompressConfig.from_options(**ONE_ROUND)
    pm = pz.decompose(model, seq_len=cfg.max_length)
    calib = task.calibration(model, tok, batch_size=cfg.batch_size, max_length=cfg.max_length,
                             limit=cfg.calib_examples, seed=cfg.seed * 1000 + 1)
    imp = importance_for(pm, calib, scorer, cfg.allocation.kinds)
    plan = allocate(pm, imp, cfg.allocation.max_fraction * pm.cost().flops, cfg.allocation, cfg.max_length)
    return {g: sorted(i) for g, i in plan.items()}


@pytest.mark.parametrize("scorer", sorted(set(scorers()) - {"fisher", "influence"}))
def test_every_named_scorer_decides_the_cut(trained_text, scorer):
    """Each registered scorer (fisher, the default, is covered by the other loop tests; influence scores only
    blocks) runs a round to the end, and the round cuts what that scorer's importance asks for, not fisher's."""
    work, model, task, tok = trained_text
    res = compress(model, task, tokenizer=tok, scorer=scorer, **ONE_ROUND)
    want = _by_hand(model, task, tok, scorer)
    assert {g: v for g, v in _removed(res.model, pz.decompose(model)).items() if v} == want
    assert res.history[1]["removed"] == {g: len(v) for g, v in want.items()}
    assert want != _by_hand(model, task, tok, "fisher")


def test_uniform_allocation_cuts_every_layer_alike(trained_text):
    """With layer 1 far less important than layer 0, global allocation takes layer 1 down to its floor first;
    uniform allocation takes the same share of every group, each time its least important particles."""
    work, model, task, tok = trained_text
    pm = pz.decompose(model)

    def scorer(pm, batches, kinds):  # importance grows with the index; layer 1 is 100x less important
        return {g.name: torch.arange(1.0, g.size + 1) * (0.01 if ".layer.1." in g.name else 1.0)
                for g in pm.groups if g.kind in kinds}

    opts = {**ONE_ROUND, "max_fraction": 0.3, "min_width": 0.25}
    uniform = compress(model, task, tokenizer=tok, scorer=scorer, allocation="uniform", **opts)
    glob = compress(model, task, tokenizer=tok, scorer=scorer, **opts)
    u, gl = _removed(uniform.model, pm), _removed(glob.model, pm)
    for g, idx in u.items():
        assert idx == list(range(len(idx))), g  # the least important of each group
    neurons, heads = ([g.name for g in pm.select(kind)] for kind in ("neuron", "head"))
    for same_size in (neurons, heads):  # the same share of each layer (the groups of a kind are equally wide here)
        assert len({len(u[g]) for g in same_size}) == 1 and len(u[same_size[0]]) > 0
    layer0 = next(g for g in neurons if ".layer.0." in g)
    head1 = next(g for g in heads if ".layer.1." in g)
    assert not gl.get(layer0) and pm[head1].size - len(gl[head1]) == math.ceil(0.25 * pm[head1].size)


def test_a_params_target_is_met(trained_text, tmp_path):
    """target_params alone drives the rounds: they stop at the first round whose prunable params are within it."""
    work, model, task, tok = trained_text
    opts = {**OPTIONS, "target_flops": None, "target_params": 0.6, "recover_epochs": 0, "min_quality": 0.0,
            "max_fraction": 0.25}
    res = compress(model, task, tokenizer=tok, out=tmp_path / "run", **opts)
    h = res.history
    assert res.reason == "target met" and res.outcome.target_met and res.outcome.returned_round == len(h) - 1
    assert h[-1]["params_ratio"] <= 0.6 and all(e["params_ratio"] > 0.6 for e in h[:-1]) and len(h) >= 3
    assert sum(p.numel() for p in pz.load(tmp_path / "run").parameters()) == h[-1]["params"]


def test_a_latency_target_is_met_alongside_a_flops_target(trained_text):
    """Every given target must be met: a latency target any model meets leaves the FLOPs target to drive the rounds,
    and the outcome counts both (a latency target that itself drives the cuts would make this a timed test)."""
    work, model, task, tok = trained_text
    opts = {**OPTIONS, "recover_epochs": 0, "min_quality": 0.0, "target_flops": 0.6, "target_latency_ms": 1e6}
    res = compress(model, task, tokenizer=tok, **opts)
    flops_only = compress(model, task, tokenizer=tok, **{**opts, "target_latency_ms": None})
    assert res.reason == "target met" and res.outcome.target_met
    assert [e["removed"] for e in res.history] == [e["removed"] for e in flops_only.history]
    assert all(0 < e["latency_ms"] <= 1e6 for e in res.history)
    alone = compress(model, task, tokenizer=tok, **{**opts, "target_flops": None})  # the dense model meets it
    assert alone.reason == "target met" and len(alone.history) == 1 and alone.outcome.returned_round == 0


def test_quantize_int8_reports_the_quantised_model(trained_text, tmp_path):
    """`quantize="int8"` saves, beside the fp32 model, the test quality of its dynamic-int8 copy: the same number
    as quantising the returned model by hand; the fp32 model itself is not changed."""
    from torch.ao.quantization import quantize_dynamic

    work, model, task, tok = trained_text
    opts = {**OPTIONS, "recover_epochs": 0, "min_quality": 0.0, "target_flops": 0.6, "quantize": "int8"}
    res = compress(model, task, tokenizer=tok, out=tmp_path / "run", **opts)
    rep = res.extra["compress"]["int8"]
    q = quantize_dynamic(copy.deepcopy(res.model), {nn.Linear}, dtype=torch.qint8)
    cfg = CompressConfig.from_options(**opts)
    want = task.quality(q, "test", tokenizer=tok, batch_size=64, max_length=cfg.max_length)
    assert rep["test"] == want and rep["latency_ms"] > 0 and rep["fp32_latency_ms"] > 0
    assert pz.io.read_meta(tmp_path / "run")["extra"]["compress"]["int8"] == rep
    assert all(type(m) is not torch.ao.nn.quantized.dynamic.Linear for m in pz.load(tmp_path / "run").modules())
    assert res.extra["compress"]["test"] == task.quality(res.model, "test", tokenizer=tok, batch_size=64,
                                                         max_length=cfg.max_length)


def test_measure_latency_is_the_median_of_the_timed_forwards(monkeypatch):
    """On a clock that the model itself advances by known amounts: warm-up calls are not timed, the result is the
    median of ``reps`` forwards in milliseconds, and the model's training mode is restored."""
    now = [0.0]
    seen = []

    class Clocked(nn.Module):
        def __init__(self, durations):
            super().__init__()
            self.durations = list(durations)

        def forward(self, x):
            seen.append(self.training)
            now[0] += self.durations.pop(0)
            return x

    monkeypatch.setattr(measure, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    m = Clocked([100.0, 100.0, 0.005, 0.001, 0.009, 0.003, 0.007]).train()  # 2 warm-ups, then 5 timed (seconds)
    assert measure.measure_latency(m, torch.zeros(1)) == pytest.approx(5.0)
    assert seen == [False] * 7 and m.training and m.durations == []
    m = Clocked([0.0, 0.002, 0.004]).eval()
    assert measure.measure_latency(m, torch.zeros(1), warmup=1, reps=2) == pytest.approx(3.0) and not m.training


@pytest.mark.parametrize("metric", ["accuracy", "logit_diff"])
def test_importance_is_positive_for_particles_whose_removal_lowers_the_metric(trained_text, metric):
    """For metrics where higher is better, ablation scores (metric ablated - intact) turn into importances that are
    the drop the removal causes, measured here by hand one particle at a time: positive exactly when removing
    the particle lowers the metric."""
    from particlize.analysis._common import per_example_metric

    work, model, task, tok = trained_text
    pm = pz.decompose(model)
    # the first 64 training sentences: a set on which some removals lower accuracy (what the check below needs)
    batches = task.batches("train", tokenizer=tok, batch_size=16, max_length=64, limit=64, shuffle=True, seed=0)
    df = pz.analyze(pm, batches, "ablation", metric=metric, groups=["head", "neuron"], table=False)
    imp = importance(df, metric)

    def mean_metric():
        with torch.no_grad():
            return torch.cat([per_example_metric(metric, output_of(model, x), y) for x, y in batches]).double().mean()

    intact = mean_metric()
    drops = []
    for g, i in zip(df.group, df["index"]):
        with pm.ablate({g: [int(i)]}):
            drops.append(float(intact - mean_metric()))
    drops = torch.tensor(drops, dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(imp.to_numpy(), dtype=torch.float64), drops, atol=1e-5, rtol=1e-4)
    assert (drops > 1e-4).any()  # what this test needs: particles whose removal lowers the metric
    clear = drops.abs() > 1e-4
    assert torch.equal(torch.tensor(imp.to_numpy())[clear] > 0, drops[clear] > 0)
