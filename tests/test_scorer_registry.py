"""The scorer registry: analyze dispatches by name, checks the declared needs first, and a new scorer is one
`register` call away from `analyze`, `importance_for` and the CLI."""

from __future__ import annotations

import pytest
import torch

import particlize as pz
from particlize.analysis import ScorerSpec, get_scorer, importance, importance_for, register, scorers
from particlize.analysis._common import as_batches
from particlize.analysis.registry import unregister
from particlize.analysis.taylor import gate_gradients
from test_analysis import _data


@pytest.fixture(scope="module")
def bert():
    model, data = _data("bert")
    return pz.decompose(model), data


def _groups(pm, spec) -> list[str]:
    """One group of each kind the scorer scores (small and quick)."""
    seen: dict[str, str] = {}
    for g in pm.groups:
        if g.kind in spec.kinds:
            seen.setdefault(g.kind, g.name)
    return list(seen.values())


def _direct(pm, data, spec, names) -> dict[str, torch.Tensor]:
    kw: dict = {"groups": names}
    if spec.metrics:
        kw["metric"] = "loss"
    if spec.modes:
        kw["mode"] = "zero"
    return spec.fn(pm, as_batches(data) if spec.data else [], **kw)


def _scores(df, names, by_example: bool = False) -> dict[str, torch.Tensor]:
    keys = ["example", "index"] if by_example else ["index"]
    return {n: torch.tensor(df[df.group == n].sort_values(keys).score.to_numpy()) for n in names}


@pytest.mark.parametrize("name", list(scorers()))
def test_every_scorer_through_analyze_equals_its_function(bert, name):
    pm, data = bert
    spec = get_scorer(name)
    names = _groups(pm, spec)
    direct = _direct(pm, data, spec, names)
    df = pz.analyze(pm, data if spec.data else None, name, groups=names, table=False)
    assert set(df.method) == {name}
    got = _scores(df, names)
    for n in names:
        s = direct[n].detach().double()
        torch.testing.assert_close(got[n], s if s.ndim == 1 else s.mean(0), rtol=0, atol=0)
    if spec.per_example:
        per = _scores(pz.analyze(pm, data, name, groups=names, by="example", table=False), names, by_example=True)
        for n in names:
            torch.testing.assert_close(per[n], direct[n].detach().double().flatten(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "method, kwargs, match",
    [
        ("bogus", {}, r"unknown method 'bogus'; use one of .*taylor-example"),
        ("magnitude", {"mode": "mean"}, "takes no mode"),
        ("activation", {"metric": "accuracy"}, "uses no metric"),
        ("taylor", {"mode": "resample"}, "supports mode zero or mean, not 'resample'; for 'resample' use method 'ablation'"),
        ("taylor-norm", {"metric": "accuracy"}, "differentiable"),
        ("fisher", {"metric": "kl"}, "zero gradient"),
        ("taylor2", {"metric": "logit_diff"}, "cross-entropy"),
        ("fisher", {"by": "class"}, "'fisher' has no per-example scores"),
        ("magnitude", {"by": "example"}, "'magnitude' has no per-example scores"),
        ("ablation", {"by": "token"}, "unknown by"),
        ("ablation", {"data": None}, "'ablation' needs data"),
        ("influence", {"groups": "neuron"}, "scores blocks only"),
        ("taylor", {"max_rows": 4}, "'taylor' has no option max_rows; its options: none"),
        ("ablation", {"sede": 1}, "has no option sede; its options: max_rows, fast, seed"),
    ],
)
def test_declared_needs_are_checked_before_anything_runs(bert, method, kwargs, match):
    pm, data = bert
    kwargs = {"data": data, **kwargs}
    calls = []
    h = pm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(pz.ParticlizeError, match=match):
            pz.analyze(pm, kwargs.pop("data"), method, **kwargs)
    finally:
        h.remove()
    assert not calls  # refused before the model ran


@pytest.mark.parametrize("name", list(scorers()))
def test_scorers_refuse_unknown_keywords(bert, name):
    pm, data = bert
    spec = get_scorer(name)
    with pytest.raises(TypeError, match="bogus"):
        spec.fn(pm, as_batches(data), groups=_groups(pm, spec), bogus=1)


def test_a_spec_must_agree_with_its_function():
    def swallows(pm, batches, *, groups, **_):
        return {}

    def no_metric(pm, batches, *, groups):
        return {}

    with pytest.raises(pz.ParticlizeError, match=r"takes \*\*kwargs"):
        ScorerSpec("x", "x", swallows)
    with pytest.raises(pz.ParticlizeError, match="lacks a 'metric' argument"):
        ScorerSpec("x", "x", no_metric, metrics=("loss",))
    with pytest.raises(pz.ParticlizeError, match="unknown metrics"):
        ScorerSpec("x", "x", no_metric, kinds=("layer",))
    with pytest.raises(pz.ParticlizeError, match="registered already"):
        register(ScorerSpec("taylor", "x", no_metric))


@pytest.fixture
def squared_taylor():
    """A custom scorer registered for one test: the per-example squared gate gradient."""

    def squared(pm, batches, *, metric: str, mode: str, groups, progress=None, scale: float = 1.0):
        grads = gate_gradients(pm, batches, metric=metric, mode=mode, groups=groups, progress=progress)
        return {n: scale * g.square() for n, g in grads.items()}

    register(ScorerSpec("test-squared", "per-example (dmetric/dgate)^2", squared, metrics=("loss", "logit_diff"),
                        modes=("zero", "mean"), per_example=True, kinds=("head", "neuron")))
    yield squared
    if "test-squared" in scorers():
        unregister("test-squared")


def test_a_registered_scorer_is_usable_by_name(bert, squared_taylor):
    pm, data = bert
    heads = pm.select("head")[0].name
    df = pz.analyze(pm, data, "test-squared", groups=[heads], by="example", mode="mean", scale=2.0, table=False)
    taylor = pz.analyze(pm, data, "taylor", groups=[heads], by="example", mode="mean", table=False)
    torch.testing.assert_close(_scores(df, [heads], True)[heads], 2.0 * _scores(taylor, [heads], True)[heads].square())
    with pytest.raises(pz.ParticlizeError, match="supports metric loss or logit_diff, not 'mse'"):
        pz.analyze(pm, data, "test-squared", metric="mse")
    with pytest.raises(pz.ParticlizeError, match="scores heads, neurons only"):
        pz.analyze(pm, data, "test-squared", groups="block")
    imp = importance_for(pm, data, "test-squared", {"head"})
    assert set(imp) == {g.name for g in pm.select("head")}
    assert "test-squared" in pz.analysis.registry.help_text()
    unregister("test-squared")
    with pytest.raises(pz.ParticlizeError, match="unknown method"):
        pz.analyze(pm, data, "test-squared")


def test_importance_reads_the_declared_sign(bert):
    pm, data = bert
    heads = [pm.select("head")[0].name]
    taylor = pz.analyze(pm, data, "taylor", metric="logit_diff", groups=heads, table=False)
    fisher = pz.analyze(pm, data, "fisher", metric="logit_diff", groups=heads, table=False)
    torch.testing.assert_close(torch.tensor(importance(taylor, "logit_diff").to_numpy()), -torch.tensor(taylor.score.to_numpy()))
    torch.testing.assert_close(torch.tensor(importance(fisher, "logit_diff").to_numpy()), torch.tensor(fisher.score.to_numpy()))
    assert (importance(fisher, "logit_diff") >= 0).all()  # an importance already: not flipped


def test_importance_for_is_what_the_loop_allocates_with(bert):
    pm, data = bert
    kinds = {"head", "neuron"}
    groups = [g.name for g in pm.groups if g.kind in kinds]
    mean = pz.analyze(pm, data, "taylor", groups=groups, table=False)
    got = importance_for(pm, data, "taylor", kinds)
    assert list(got) == groups
    for n in groups:  # |mean effect|
        torch.testing.assert_close(got[n], torch.tensor(mean[mean.group == n].sort_values("index").score.abs().to_numpy()))
    per = pz.analyze(pm, data, "taylor", groups=groups, by="example", table=False)
    want = per.assign(score=per.score.abs()).groupby(["group", "index"]).score.mean()
    got = importance_for(pm, data, "taylor-example", kinds)
    for n in groups:  # mean per-example |effect|
        torch.testing.assert_close(got[n], torch.tensor(want.loc[n].sort_index().to_numpy()), rtol=1e-12, atol=0)
    mag = importance_for(pm, None, "magnitude", kinds)
    assert set(mag) == set(groups)
    with pytest.raises(pz.ParticlizeError, match="scores blocks, not heads, neurons"):
        importance_for(pm, data, "influence", kinds)


def test_cli_help_lists_every_scorer():
    from typer.testing import CliRunner

    from particlize.cli import app

    res = CliRunner().invoke(app, ["analyze", "--help"], terminal_width=10_000, max_content_width=10_000)
    assert res.exit_code == 0
    for spec in scorers().values():
        assert f"{spec.name}: {spec.summary}" in res.output
