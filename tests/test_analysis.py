"""Scorers: the fast exact ablation equals the naive loop; cheap scores are what they claim to be."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import particlize as pz
from conftest import hf_model, output_of
from particlize.analysis._common import as_batches
from particlize.analysis.ablation import ExecutionTrace, _linear_reader, _reader_rows, _work_batches, ablation_effects
from particlize.particles import apply_gate
from particlize.models.recurrent import RNNClassifier
from particlize.models.vision import ResNet


def _data(family: str, seed: int = 0):
    model, batch = hf_model(family)
    g = torch.Generator().manual_seed(seed)
    if family in ("gpt2", "llama-gqa"):
        ids = torch.randint(0, 97, (4, 7), generator=g)
        data = [({"input_ids": ids[:2]}, ids[:2]), ({"input_ids": ids[2:]}, ids[2:])]
    else:
        n_cls = 3 if family == "bert" else 5
        other = {k: v.flip(0) for k, v in batch.items()}
        data = [(batch, torch.randint(0, n_cls, (3,), generator=g)), (other, torch.randint(0, n_cls, (3,), generator=g))]
    return model, data


def _cnn():
    torch.manual_seed(0)
    m = ResNet(num_classes=4, in_channels=1, widths=(4, 8), blocks_per_stage=(2, 1)).eval()
    x = torch.randn(6, 1, 16, 16)
    return m, [(x[:3], torch.tensor([0, 1, 2])), (x[3:], torch.tensor([3, 1, 0]))]


def _rnn():
    torch.manual_seed(0)
    m = RNNClassifier(input_size=5, hidden_size=6, num_layers=2, num_classes=3).eval()
    x = torch.randn(4, 7, 5)
    return m, [(x, torch.tensor([0, 1, 2, 1]))]


def _fast_equals_naive(pm, batches, names, **kw) -> dict:
    """The fast engine's effects (returned), checked against the naive loop's to 1e-5."""
    fast = ablation_effects(pm, batches, groups=names, **kw)
    naive = ablation_effects(pm, batches, groups=names, fast=False, **{k: v for k, v in kw.items() if k != "max_rows"})
    for n in names:
        torch.testing.assert_close(fast[n], naive[n], atol=1e-5, rtol=0)
    return fast


CASES = {"bert": lambda: _data("bert"), "vit": lambda: _data("vit"), "gpt2": lambda: _data("gpt2"),
         "llama-gqa": lambda: _data("llama-gqa"), "resnet": _cnn, "lstm": _rnn}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("metric", ["loss", "kl"])
def test_fast_ablation_equals_naive_loop(case, metric):
    model, data = CASES[case]()
    pm = pz.decompose(model)
    batches = as_batches(data)
    names = [g.name for g in pm.groups]
    fast = _fast_equals_naive(pm, batches, names, metric=metric, max_rows=8)
    assert any(fast[n].abs().max() > 0 for n in names)


@pytest.mark.parametrize("case", ["bert", "resnet"])
@pytest.mark.parametrize("mode", ["mean", "resample"])
def test_fast_ablation_equals_naive_loop_with_patches(case, mode):
    model, data = CASES[case]()
    pm = pz.decompose(model)
    batches = as_batches(data)
    names = [g.name for g in pm.groups]
    _fast_equals_naive(pm, batches, names, mode=mode, max_rows=5)


def _padded(family: str, token_targets: bool = False, pad_target: int = -100):
    """Two right-padded batches of sequences of mixed lengths (1–7 real tokens) for ``family``."""
    model, _ = hf_model(family)
    g = torch.Generator().manual_seed(1)
    data = []
    for lens in ([7, 3, 3, 5], [2, 6, 6]):
        B, T = len(lens), max(lens)
        mask = (torch.arange(T) < torch.tensor(lens)[:, None]).long()
        ids = torch.randint(1, 97, (B, T), generator=g) * mask
        if token_targets:
            targets = ids.masked_fill(mask == 0, pad_target)
        else:
            targets = torch.randint(0, 3, (B,), generator=g)
        data.append(({"input_ids": ids, "attention_mask": mask}, targets))
    return model, as_batches(data)


@pytest.mark.parametrize("family,token_targets", [("bert", False), ("llama-gqa", True)])
def test_padded_batches_are_split_by_length_and_equal_the_naive_loop(family, token_targets):
    model, batches = _padded(family, token_targets)
    work = _work_batches(model, batches, "loss", split=True)
    assert len(work) == 5  # lengths {7, 3, 5} and {2, 6}
    assert sorted(torch.cat([pos for _, pos in work]).tolist()) == list(range(7))
    assert all(int(b.inputs["attention_mask"].sum()) == b.inputs["attention_mask"].numel() for b, _ in work)
    pm = pz.decompose(model)
    names = [g.name for g in pm.groups]
    _fast_equals_naive(pm, batches, names, max_rows=6)


def test_batches_stay_whole_when_padding_changes_the_metric():
    """Token targets on padded positions (not -100) count in the metric: cutting them would change it."""
    model, batches = _padded("llama-gqa", token_targets=True, pad_target=5)
    assert len(_work_batches(model, batches, "loss", split=True)) == 2
    pm = pz.decompose(model)
    names = [g.name for g in pm.groups if g.kind == "neuron"]
    _fast_equals_naive(pm, batches, names, max_rows=6)


def _spy_past_norm(monkeypatch) -> list:
    from particlize.analysis import ablation

    made, real = [], ablation._past_norm
    monkeypatch.setattr(ablation, "_past_norm", lambda *a: made.append(real(*a)) or made[-1])
    return made


@pytest.mark.parametrize("case,after_heads", [("bert", 1), ("llama-gqa", 2), ("vit", 1)])
def test_layers_after_the_next_norm_take_the_update_path(case, after_heads, monkeypatch):
    """The linear layers after the norm that follows a reader (Q/K/V after an FFN's down projection; the
    up projection(s) after attention's output) are updated in closed form, not rerun — same numbers."""
    made = _spy_past_norm(monkeypatch)
    model, data = CASES[case]()
    pm = pz.decompose(model)
    batches = as_batches(data)
    names = [g.name for g in pm.groups if g.kind in ("head", "neuron")]
    _fast_equals_naive(pm, batches, names, max_rows=4)
    past = [p for p in made if p is not None]
    assert all(p.ok for p in past)
    widths = sorted(len(p.layers) for p in past)  # all head groups; neurons of all but the last layer
    layers = len(names) // 2
    assert widths == sorted([after_heads] * layers + [3] * (layers - 1))


def test_a_subset_of_particles_gets_the_same_effects_and_the_rest_stays_nan(monkeypatch):
    """``only=``: the update path is built for the wanted particles alone (rows of U mapped by index)."""
    made = _spy_past_norm(monkeypatch)
    model, data = _data("bert")
    pm = pz.decompose(model)
    batches = as_batches(data)
    names = [g.name for g in pm.groups if g.kind in ("head", "neuron")]
    only = {n: [pm[n].size - 1, 1] for n in names}
    part = ablation_effects(pm, batches, groups=names, only=only, max_rows=4)
    full = ablation_effects(pm, batches, groups=names, fast=False)
    assert all(p.ok for p in made if p is not None) and any(p is not None for p in made)
    for n in names:
        torch.testing.assert_close(part[n][:, [1, pm[n].size - 1]], full[n][:, [1, pm[n].size - 1]], atol=1e-5, rtol=0)
        keep = torch.ones(pm[n].size, dtype=torch.bool)
        keep[[1, pm[n].size - 1]] = False
        assert part[n][:, keep].isnan().all()


class _Twice(torch.nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_scaled_path_to_the_norm_is_not_updated(monkeypatch):
    """A reader whose output reaches the norm scaled (not through an identity) keeps running the layers."""
    made = _spy_past_norm(monkeypatch)
    model, data = _data("bert")
    for layer in model.bert.encoder.layer:
        layer.output.dropout = _Twice()
    pm = pz.decompose(model)
    batches = as_batches(data)
    names = [g.name for g in pm.groups if g.kind == "neuron"]
    _fast_equals_naive(pm, batches, names, max_rows=4)
    assert [p.ok for p in made if p is not None] == [False, False]  # (heads: attention's output is unchanged)


def test_frontier_starts_at_the_reader():
    model, data = _data("bert")
    trace = ExecutionTrace(model, as_batches(data)[0])
    f = trace.frontier("bert.encoder.layer.1.output.dense")  # layer 1's FFN reader
    assert "bert.embeddings" in f and "bert.encoder.layer.0" in f
    assert "bert.encoder.layer.1.attention" in f and "bert.encoder.layer.1.intermediate" in f
    assert not any(p.startswith("bert.encoder.layer.2") or p == "bert.encoder.layer.1" for p in f)


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 3), S=st.integers(1, 4), n=st.integers(1, 6), w=st.integers(1, 4), O=st.integers(1, 5),
       mode=st.sampled_from(["zero", "mean", "resample"]), data=st.data())
def test_reader_update_equals_rerunning_the_gated_linear(B, S, n, w, O, mode, data):
    """Rank-``width`` update of a Linear reader == gating its input and running it again, row by row."""
    g = torch.Generator().manual_seed(B * 100 + S * 10 + n)
    lin = torch.nn.Linear(n * w, O)
    x = torch.randn(B, S, n * w, generator=g)
    chunk = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True))
    patch = {"zero": None, "mean": torch.randn(n * w, generator=g), "resample": torch.randn(B, S, n * w, generator=g)}[mode]
    with torch.no_grad():
        got = _reader_rows(lin, (x, lin(x)), n, chunk, patch)
        want = []
        for b in range(B):
            for i in chunk:
                gate = torch.ones(n)
                gate[i] = 0.0
                p = patch if patch is None or patch.ndim == 1 else patch[b : b + 1]
                want.append(lin(apply_gate(x[b : b + 1], -1, n, gate, p))[0])
    torch.testing.assert_close(got, torch.stack(want), atol=1e-5, rtol=1e-5)


def test_linear_readers_take_the_update_path():
    """BERT's head and FFN readers are plain Linears (updated, not rerun); GPT-2's Conv1D is not."""
    for family, expect in (("bert", True), ("gpt2", False)):
        model, data = _data(family)
        pm = pz.decompose(model)
        trace = ExecutionTrace(model, as_batches(data)[0])
        found = {g.kind: _linear_reader(pm, g.name, g.gate.module, trace) is not None
                 for g in pm.groups if g.kind in ("head", "neuron")}
        assert found and all(v is expect for v in found.values()), (family, found)


def test_ablation_score_contract():
    """score = metric with the particle ablated − intact metric, averaged over all examples."""
    model, data = _data("bert")
    df = pz.analyze(model, data, method="ablation", metric="loss")
    assert {"group", "index", "score", "kind", "params", "flops"} <= set(df.columns)
    pm = pz.decompose(model)
    name = "bert.encoder.layer.2.intermediate.neurons"
    with torch.no_grad():
        intact = torch.cat([F.cross_entropy(output_of(model, x), y, reduction="none") for x, y in data])
        with pm.ablate({name: [7]}):
            abl = torch.cat([F.cross_entropy(output_of(model, x), y, reduction="none") for x, y in data])
    got = df[(df.group == name) & (df["index"] == 7)].score.item()
    assert got == pytest.approx((abl - intact).mean().item(), abs=1e-6)
    assert len(df) == sum(g.size for g in pm.groups)


def test_taylor_is_minus_gate_gradient_and_fisher_its_square():
    model, data = _data("bert")
    pm = pz.decompose(model)
    name = "bert.encoder.layer.0.attention.heads"
    per_ex = pz.analyze(pm, data, method="taylor", groups=[name], by="example", table=False)
    assert all(p.grad is None for p in model.parameters())  # only gate gradients were taken
    assert len(per_ex) == 6 * 4
    grads = []
    for x, y in data:
        for b in range(3):
            g = torch.ones(4, requires_grad=True)
            with pm.gates({name: g}):
                F.cross_entropy(output_of(model, {k: v[b : b + 1] for k, v in x.items()}), y[b : b + 1]).backward()
            grads.append(g.grad)
    grads = torch.stack(grads)
    torch.testing.assert_close(torch.tensor(per_ex.sort_values(["example", "index"]).score.to_numpy()).view(6, 4).float(),
                               -grads, atol=1e-5, rtol=1e-4)
    fisher = pz.analyze(pm, data, method="fisher", groups=[name], table=False)
    torch.testing.assert_close(torch.tensor(fisher.score.to_numpy()).float(), grads.square().sum(0), atol=1e-8, rtol=1e-4)


def test_taylor2_is_the_second_order_expansion_where_logits_are_linear_in_the_gate():
    """The last conv's channels feed a linear classifier (through average pooling), so there the
    Gauss–Newton curvature is the true second derivative: ``taylor2`` must equal ``−L'(1) + ½ L''(1)``
    per example and particle, computed by double backward; the sampled-label estimate of the
    curvature converges to the exact one."""
    from particlize.models.vision import SimpleCNN

    torch.manual_seed(0)
    model = SimpleCNN(num_classes=3, in_channels=1, widths=(4, 6)).eval()
    pm = pz.decompose(model)
    name = "features.4.channels"
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 1, 0])
    data = [(x, y)]
    got = pz.analyze(pm, data, "taylor2", groups=[name], by="example", table=False).sort_values(["example", "index"])
    got = torch.tensor(got.score.to_numpy()).view(5, 6)
    want = torch.zeros(5, 6, dtype=torch.float64)
    for b in range(5):
        for j in range(6):
            s = torch.ones((), dtype=torch.float64, requires_grad=True)
            g = torch.ones(1, 6, dtype=torch.float64) + (s - 1) * F.one_hot(torch.tensor([j]), 6).double()
            with pm.gates({name: g.float()}):
                loss = F.cross_entropy(model(x[b : b + 1]).double(), y[b : b + 1])
            (d1,) = torch.autograd.grad(loss, s, create_graph=True)
            (d2,) = torch.autograd.grad(d1, s)
            want[b, j] = -d1.detach() + 0.5 * d2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    taylor = pz.analyze(pm, data, "taylor", groups=[name], by="example", table=False).sort_values(["example", "index"])
    assert (got >= torch.tensor(taylor.score.to_numpy()).view(5, 6) - 1e-7).all()  # the curvature term is >= 0
    from particlize.analysis.taylor import taylor2

    sampled = taylor2(pm, as_batches(data), groups=[name], samples=4000, exact_classes=0)[name]
    torch.testing.assert_close(sampled, got, atol=0.02, rtol=0.1)
    with pytest.raises(pz.ParticlizeError, match="class targets"):
        pz.analyze(pm, [(x, torch.randn(5, 3))], "taylor2", groups=[name])
    with pytest.raises(pz.ParticlizeError, match="cross-entropy"):
        pz.analyze(pm, data, "taylor2", metric="logit_diff", groups=[name])


def test_by_class_averages_each_class():
    model, data = _data("bert")
    ex = pz.analyze(model, data, "ablation", groups="head", by="example", table=False)
    cl = pz.analyze(model, data, "ablation", groups="head", by="class", table=False)
    targets = torch.cat([y for _, y in data])
    for c in targets.unique().tolist():
        idx = (targets == c).nonzero().flatten().tolist()
        want = ex[ex.example.isin(idx)].groupby(["group", "index"]).score.mean()
        got = cl[cl["class"] == c].set_index(["group", "index"]).score
        torch.testing.assert_close(torch.tensor(got.sort_index().to_numpy()), torch.tensor(want.sort_index().to_numpy()))


def test_magnitude_activation_influence():
    model, data = _data("bert")
    pm = pz.decompose(model)
    mag = pz.analyze(pm, None, "magnitude")
    nb = mag[mag.kind != "block"]
    torch.testing.assert_close(torch.tensor(nb.score.to_numpy()), torch.tensor((nb.writer_norm * nb.reader_norm).to_numpy()).double())
    act = pz.analyze(pm, data, "activation", groups="bert.encoder.layer.1.intermediate.neurons", table=False)
    acts = pm.record(["bert.encoder.layer.1.intermediate.neurons"], [x for x, _ in data])["bert.encoder.layer.1.intermediate.neurons"][0]
    a = acts.reshape(-1, 48).double()
    w = model.bert.encoder.layer[1].output.dense.weight.double()
    want = a.var(0, unbiased=False) * w.square().sum(0)
    torch.testing.assert_close(torch.tensor(act.score.to_numpy()), want, rtol=1e-6, atol=1e-9)
    inf = pz.analyze(pm, data, "influence", groups="block", table=False)
    assert len(inf) == 3 and inf.score.between(0, 2).all() and inf.score.gt(0).all()


def test_validate_and_top_particles():
    model, data = _data("bert")
    pm = pz.decompose(model)
    exact = pz.analyze(pm, data, "ablation", groups=["head", "neuron"], table=False)
    v = pz.validate_scores(pm, data, "taylor", k=5, groups=["head", "neuron"], exact=exact)
    assert set(v.summary.kind) == {"head", "neuron", "all"}
    assert v.summary.spearman.between(-1, 1).all() and v.summary.top_k_overlap.between(0, 1).all()
    # the numbers themselves: scipy's correlations and the top-5 overlap on the same scores (loss: higher = more)
    from scipy import stats

    summary = v.summary.set_index("kind")
    for kind, part in [*v.scores.groupby("kind"), ("all", v.scores)]:
        c, e = part.score_cheap.to_numpy(), part.score_exact.to_numpy()
        assert summary.loc[kind, "spearman"] == pytest.approx(stats.spearmanr(c, e).statistic, abs=1e-12)
        assert summary.loc[kind, "kendall"] == pytest.approx(stats.kendalltau(c, e).statistic, abs=1e-12)
        top = lambda x: set(np.argsort(-x, kind="stable")[:5].tolist())  # noqa: E731
        assert summary.loc[kind, "top_k_overlap"] == len(top(c) & top(e)) / 5
    # known data: an "exact" ranking that is the cheap one reversed correlates -1 and shares none of its top 5
    cheap = v.scores[["group", "index", "score_cheap"]].rename(columns={"score_cheap": "score"})
    flipped = pz.validate_scores(pm, data, "taylor", k=5, groups=["head", "neuron"], exact=cheap.assign(score=-cheap.score))
    assert flipped.summary.spearman.tolist() == pytest.approx([-1.0] * 3) and flipped.summary.kendall.tolist() == pytest.approx([-1.0] * 3)
    assert (flipped.summary.top_k_overlap == 0).all()
    # with a shortlist covering everything, screening returns exactly the exact top-k
    top = pz.top_particles(pm, data, k=10, shortlist=10_000, groups=["head", "neuron"])
    want = exact.nlargest(10, "score")
    assert list(zip(top.group, top["index"])) == list(zip(want.group, want["index"]))
    torch.testing.assert_close(torch.tensor(top.score.to_numpy()), torch.tensor(want.score.to_numpy()), atol=1e-6, rtol=0)
    # heads are always ablated exactly; only the neurons are left to the screen (shortlist 1 here)
    kinds = exact.group.map({g.name: g.kind for g in pm.groups})
    n_heads = int((kinds == "head").sum())
    few = pz.top_particles(pm, data, k=n_heads + 5, shortlist=1, groups=["head", "neuron"])
    assert (few.kind == "head").sum() == n_heads and (few.kind == "neuron").sum() == 1
    got = few.set_index(["group", "index"]).score
    ref = exact.set_index(["group", "index"]).score
    torch.testing.assert_close(torch.tensor(got.to_numpy()), torch.tensor(ref.loc[got.index].to_numpy()), atol=1e-6, rtol=0)
    none = pz.top_particles(pm, data, k=3, shortlist=2, exhaustive=(), groups=["head", "neuron"])
    assert len(none) == 2  # nothing exhaustive: the shortlist is all that is ablated


def test_recurrent_groups_score_per_example_by_fallback():
    model, data = _rnn()
    df = pz.analyze(model, data, "taylor", by="example", table=False)
    assert len(df) == 4 * 12
    df2 = pz.analyze(model, data, "ablation", table=False)
    assert df2.score.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"method": "bogus"}, "unknown method"),
        ({"metric": "f1"}, "unknown metric"),
        ({"mode": "noise"}, "unknown mode"),
        ({"method": "taylor", "metric": "accuracy"}, "differentiable"),
        ({"method": "taylor", "metric": "kl"}, "zero gradient"),
        ({"method": "ablation", "groups": "nope.heads"}, "no particle group"),
        ({"method": "influence", "groups": "head"}, "scores blocks"),
    ],
)
def test_bad_arguments(kwargs, match):
    model, data = _data("bert")
    with pytest.raises(pz.ParticlizeError, match=match):
        pz.analyze(model, data, **kwargs)


def test_bad_data():
    model, data = _data("bert")
    with pytest.raises(pz.ParticlizeError, match="empty"):
        pz.analyze(model, [], "ablation")
    with pytest.raises(pz.ParticlizeError, match=r"\(inputs, targets\) pairs"):
        pz.analyze(model, [data[0][0]], "ablation")
    lm, lm_data = _data("gpt2")
    with pytest.raises(pz.ParticlizeError, match="one class index per example"):
        pz.analyze(lm, lm_data, "ablation", groups="head", by="class")
