"""MoEfication (issue #26): the expert FFN, the ``moefy`` verb, save/load, costs, expert particles,
clustering and router training, and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import particlize as pz
from conftest import hf_model, output_of
from particlize.errors import PlanError, UnsupportedModelError
from particlize.models.sora import SoraConfig, SpacetimeDiT
from particlize.moe import balanced_clusters, fit_routers, train_router
from particlize.plan import Step, model_plan
from particlize.surgery import ExpertFFN, moefy_model

DIT = dict(frames=4, size=16, patch=(1, 4, 4), dim=32, depth=2, heads=4, mlp_ratio=2.0)
FAMILIES = ["bert", "llama-gqa", "dit"]


def _dit() -> tuple[SpacetimeDiT, dict]:
    torch.manual_seed(0)
    m = SpacetimeDiT(SoraConfig(**DIT))
    with torch.no_grad():  # adaLN-Zero starts as the identity: give every weight a value so the MLPs matter
        for p in m.parameters():
            p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn((3, 1, 4, 16, 16), generator=g), "t": torch.randint(0, 1000, (3,), generator=g),
             "y": torch.tensor([0, 7, 10])}
    return m.eval(), batch


def _model(family: str):
    return _dit() if family == "dit" else hf_model(family)


def _out(model, batch):
    return output_of(model, batch) if "input_ids" in batch else model(**batch)


def _strided(pm, experts: int) -> dict[str, list[list[int]]]:
    """Expert e = neurons e, e + E, e + 2E, ... of every FFN (a partition that is not contiguous)."""
    return {g.name: [list(range(e, g.size, experts)) for e in range(experts)] for g in pm.select("neuron")}


def _ffns(model) -> list[ExpertFFN]:
    return [m for m in model.modules() if isinstance(m, ExpertFFN)]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_experts_active_is_the_original(family):
    model, batch = _model(family)
    pm = pz.decompose(model)
    moe = moefy_model(pm, _strided(pm, 4), active=4).model
    assert len(_ffns(moe)) == len(pm.select("neuron"))
    with torch.no_grad():
        assert torch.allclose(_out(moe, batch), _out(model, batch), atol=1e-5, rtol=0)
    assert model_plan(moe).verbs() == ["moefy"] * len(pm.select("neuron"))


@pytest.mark.parametrize("family", FAMILIES)
def test_grouped_path_equals_the_dense_masked_reference(family):
    model, batch = _model(family)
    pm = pz.decompose(model)
    moe = moefy_model(pm, _strided(pm, 4), active=2).model
    torch.manual_seed(3)
    for ffn in _ffns(moe):
        x = torch.randn(3, 7, ffn.linear("up").in_features)
        with torch.no_grad():
            fast, ref = ffn.grouped(x), ffn.masked(x)
            dense = ffn.linear("down")(ffn.hidden(x))
        assert torch.allclose(fast, ref, atol=1e-5, rtol=0)
        assert not torch.allclose(fast, dense, atol=1e-3)  # half the experts really are skipped
    with torch.no_grad():  # the whole model runs the grouped path
        assert not torch.allclose(_out(moe, batch), _out(model, batch), atol=1e-4)


def test_each_token_runs_its_top_k_experts():
    model, _ = hf_model("bert")
    pm = pz.decompose(model)
    ffn = _ffns(moefy_model(pm, _strided(pm, 4), active=1).model)[0]
    x = torch.randn(5, ffn.linear("up").in_features)
    with torch.no_grad():
        best = ffn.router(x).argmax(-1)
        y = ffn(x)
        for t in range(5):
            rows = slice(int(best[t]) * ffn.expert_size, (int(best[t]) + 1) * ffn.expert_size)
            h = ffn.hidden(x[t:t + 1], rows)
            want = torch.nn.functional.linear(h, ffn.linear("down").weight[:, rows], ffn.linear("down").bias)
            assert torch.allclose(y[t], want[0], atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model, batch = _model(family)
    pm = pz.decompose(model)
    moe = moefy_model(pm, _strided(pm, 4), active=2).model
    with torch.no_grad():
        for f in _ffns(moe):  # router weights that differ from a fresh init: they must come from the file
            f.router.out.weight.normal_()
    pz.save(moe, tmp_path / "m")
    back = pz.load(tmp_path / "m")
    assert [f.active for f in _ffns(back)] == [2] * len(_ffns(moe))
    with torch.no_grad():
        assert torch.equal(_out(back, batch), _out(moe, batch))
    assert model_plan(back) == model_plan(moe)


@pytest.mark.parametrize("family", FAMILIES)
def test_ffn_flops_are_k_over_e_plus_the_router(family):
    model, _ = _model(family)
    pm = pz.decompose(model)
    E, k = 4, 1
    mm = moefy_model(pm, _strided(pm, E), active=k)
    ffn_flops = sum(2.0 * g.size * sum(pm._tensor(s.name).shape[1] for s in g.writers if s.name.endswith(".weight"))
                    + 2.0 * g.size * pm._tensor(g.readers[0].name).shape[0] for g in pm.select("neuron"))
    router = sum(2.0 * f.router.out.weight.numel() for f in _ffns(mm.model))
    assert mm.cost().flops == pytest.approx(pm.cost().flops - ffn_flops * (1 - k / E) + router)
    assert mm.cost().params == pm.cost().params + sum(sum(p.numel() for p in f.router.parameters()) for f in _ffns(mm.model))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cut", [[1], [0, 2], [0, 1, 3]])
def test_cost_of_removing_experts_is_the_cost_of_the_pruned_model(family, cut):
    """Each token still runs min(k, kept) experts: removing experts saves their parameters, and FLOPs only where
    fewer than k experts are left (plus the router rows)."""
    model, _ = _model(family)
    mm = moefy_model(pz.decompose(model), _strided(pz.decompose(model), 4), active=2)
    remove = {mm.select("expert")[0].name: cut}
    predicted, actual = mm.cost(remove), pz.decompose(mm.prune(remove)).cost()
    assert predicted.params == actual.params
    assert predicted.flops == pytest.approx(actual.flops, rel=1e-9)
    saved = mm.cost().flops - predicted.flops
    ffn = _ffns(mm.model)[0]
    router_rows = 2.0 * len(cut) * ffn.router.out.weight.shape[1]
    if len(cut) <= 2:  # two or more experts left: a token runs two experts as before
        assert saved == pytest.approx(router_rows)
    else:  # one expert left: the token's FFN FLOPs halve
        expert_flops = 2.0 * sum(getattr(ffn, r).weight.numel() for r in ffn.roles.values()) / 4
        assert saved == pytest.approx(router_rows + expert_flops)


@pytest.mark.parametrize("family", FAMILIES)
def test_decompose_shows_experts_and_ablating_them_equals_pruning(family):
    model, batch = _model(family)
    pm = pz.decompose(model)
    mm = moefy_model(pm, _strided(pm, 4), active=2)
    kinds = {g.kind for g in mm.groups}
    assert "expert" in kinds and "neuron" not in kinds and "head" in kinds and "block" in kinds
    experts = mm.select("expert")
    assert [g.size for g in experts] == [4] * len(pm.select("neuron"))
    remove = {experts[0].name: [1], experts[-1].name: [0, 3]}
    with torch.no_grad():
        full = _out(mm.model, batch)
        with mm.ablate(remove):
            gated = _out(mm.model, batch)
        small = mm.prune(remove)
        assert not torch.allclose(gated, full, atol=1e-5)
        assert torch.allclose(_out(small, batch), gated, atol=1e-5, rtol=0)
    assert [f.num_experts for f in _ffns(small)][0] == 3
    assert _ffns(small)[-1].active == 2  # two of the two experts left


def test_pruned_experts_save_and_load(tmp_path):
    model, batch = hf_model("llama-gqa")
    pm = pz.decompose(model)
    mm = moefy_model(pm, _strided(pm, 4), active=2)
    small = mm.prune({mm.select("expert")[1].name: [2]})
    pz.save(small, tmp_path / "s")
    back = pz.load(tmp_path / "s")
    assert model_plan(back).verbs()[-1] == "prune"
    with torch.no_grad():
        assert torch.equal(_out(back, batch), _out(small, batch))


def test_expert_gates_per_example_and_gradients():
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    mm = moefy_model(pm, _strided(pm, 4), active=2)
    name = mm.select("expert")[0].name
    per = torch.zeros(3, 4)
    per[1, 2] = 1  # ablate expert 2 for example 1 only
    with torch.no_grad():
        full = _out(mm.model, batch)
        with mm.ablate({name: per}):
            mixed = _out(mm.model, batch)
        with mm.ablate({name: [2]}):
            all_off = _out(mm.model, batch)
    assert torch.allclose(mixed[[0, 2]], full[[0, 2]], atol=1e-6)
    assert torch.allclose(mixed[1], all_off[1], atol=1e-6)
    g = torch.ones(4, requires_grad=True)
    with mm.gates({name: g}):
        _out(mm.model, batch).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    rec = mm.record([name], [batch])[name][0]
    assert rec.shape == (3, 7, 4 * 32)


def test_bad_moefy_steps_are_refused():
    model, _ = hf_model("bert")
    pm = pz.decompose(model)
    name = pm.select("neuron")[0].name
    with pytest.raises(PlanError, match="partition"):
        moefy_model(pm, {name: [[0, 1], [2]]}, active=1)
    with pytest.raises(PlanError, match="active"):
        moefy_model(pm, {name: [list(range(0, 48, 2)), list(range(1, 48, 2))]}, active=3)
    with pytest.raises(UnsupportedModelError, match="neurons of a feed-forward"):
        pz.plan.run(pm.rebind(model), [Step("moefy", pm.select("head")[0].name, {"experts": [[0, 1, 2, 3]]})])


# ---- clustering, routers, pz.moefy ------------------------------------------------------------------


def test_balanced_clusters_recover_planted_groups_in_equal_sizes():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(4, 30))
    truth = np.repeat(np.arange(4), 6)
    # an unbalanced cloud: k-means alone would give group 0 the stragglers of group 1
    x = base[truth] + 0.05 * rng.normal(size=(24, 30))
    perm = rng.permutation(24)
    got = balanced_clusters(x[perm], 4, seed=0)
    assert sorted(len(c) for c in got) == [6, 6, 6, 6]
    assert sorted(sorted(int(perm[i]) for i in c) for c in got) == [list(range(6 * g, 6 * g + 6)) for g in range(4)]
    skew = np.concatenate([base[0] + 0.05 * rng.normal(size=(16, 30)), base[1] + 0.05 * rng.normal(size=(8, 30))])
    assert sorted(len(c) for c in balanced_clusters(skew, 4, seed=0)) == [6, 6, 6, 6]
    with pytest.raises(pz.ParticlizeError, match="divisor of 24"):
        balanced_clusters(x, 5)


def _calibration(n: int = 4, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(8, 12, dtype=torch.long)
    mask[:, 9:] = 0  # padding is left out of the statistics
    return [{"input_ids": torch.randint(0, 97, (8, 12), generator=g), "attention_mask": mask} for _ in range(n)]


def test_trained_router_predicts_the_experts_that_matter():
    model, _ = hf_model("bert")
    pm = pz.decompose(model)
    ffn = _ffns(moefy_model(pm, _strided(pm, 4), active=1, router_hidden=64).model)[0]
    torch.manual_seed(0)
    x = torch.randn(2000, 32)
    with torch.no_grad():
        norms = ffn.expert_norms(x)[1500:]

        def scores() -> tuple[float, float]:  # top-1 hits, share of the best expert's norm captured
            pick = ffn.router(x[1500:]).argmax(-1)
            hits = float((pick == norms.argmax(-1)).float().mean())
            return hits, float(norms.gather(1, pick[:, None]).sum() / norms.max(-1).values.sum())

        before = scores()
    loss = train_router(ffn, x[:1500], steps=300, seed=0)
    with torch.no_grad():
        after = scores()
    assert loss < 0.02 and after[0] > 0.6 and after[0] > before[0] + 0.3 and after[1] > 0.95


@pytest.mark.parametrize("family", ["bert", "llama-gqa"])
def test_moefy_end_to_end(family, tmp_path):
    model, batch = hf_model(family)
    data = _calibration()
    moe = pz.moefy(model, data, experts=4, active=2, router_steps=100, seed=0)
    again = pz.moefy(model, data, experts=4, active=2, router_steps=100, seed=0)
    pm = pz.decompose(moe)
    assert {g.kind for g in pm.groups} >= {"expert", "head", "block"}
    steps = list(model_plan(moe))
    assert [s.verb for s in steps] == ["moefy"] * 3 and steps == list(model_plan(again))  # deterministic
    for s in steps:
        assert sorted(i for e in s.args["experts"] for i in e) == list(range(pz.decompose(model)[s.group].size))
    with torch.no_grad():
        assert torch.equal(_out(moe, batch), _out(again, batch))
        for f in _ffns(moe):
            f.active = f.num_experts
        assert torch.allclose(_out(moe, batch), _out(model, batch), atol=1e-5, rtol=0)
        for f in _ffns(moe):
            f.active = 2
    pz.save(moe, tmp_path / "moe")
    with torch.no_grad():
        assert torch.equal(_out(pz.load(tmp_path / "moe"), batch), _out(moe, batch))


def test_moefy_clusters_beat_a_random_partition():
    """Co-activating neurons grouped, with trained routers: closer to the dense FFN than strided experts
    with the same router training."""
    model, _ = hf_model("bert")
    data = _calibration(6)
    moe = pz.moefy(model, data, experts=4, active=2, router_steps=200, seed=0)
    pm = pz.decompose(model)
    strided = moefy_model(pm, _strided(pm, 4), active=2).model
    fit_routers(strided, data, steps=200, seed=0)

    def ffn_error(m) -> float:
        err = 0.0
        for ffn in _ffns(m):
            x = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                err += float((ffn(x) - ffn.linear("down")(ffn.hidden(x))).square().mean())
        return err

    assert ffn_error(moe) < ffn_error(strided)


def test_moefy_dit_and_errors():
    model, batch = _dit()
    data = [batch, {**batch, "t": batch["t"].flip(0)}]
    moe = pz.moefy(model, data, experts=4, active=1, router_steps=50)
    assert len(_ffns(moe)) == 2
    with torch.no_grad():
        for f in _ffns(moe):
            f.active = 4
        assert torch.allclose(moe(**batch), model(**batch), atol=1e-5, rtol=0)
    with pytest.raises(pz.ParticlizeError, match="do not split into 5"):
        pz.moefy(model, data, experts=5, active=1)
    with pytest.raises(pz.ParticlizeError, match="between 1 and"):
        pz.moefy(model, data, experts=4, active=5)
    with pytest.raises(pz.ParticlizeError, match="needs task"):
        pz.moefy(model, data, experts=4, active=1, recover_epochs=1)
    with pytest.raises(pz.ParticlizeError, match="calibration batches"):
        pz.moefy(model, [], experts=4, active=1)


def test_moefy_command(tmp_path, capsys):
    """`particlize moefy` on a trained classifier folder: a saved mixture of experts that loads back, its
    FLOPs and validation quality printed; refuses a non-empty --out."""
    import json

    from loop_fixture import make
    from particlize.cli import main

    make(tmp_path)
    dense, csv = tmp_path / "dense", tmp_path / "s.csv"
    args = ["moefy", str(dense), "--task", "text-csv", "--data", str(csv), "--experts", "4", "--active", "1",
            "--calib-examples", "32", "--batch-size", "16", "--out", str(tmp_path / "moe")]
    main(args)
    printed = capsys.readouterr().out
    assert "4 experts per FFN, 1 active per token" in printed and "val quality" in printed
    meta = json.loads((tmp_path / "moe" / "particlize.json").read_text())
    assert [s["verb"] for s in meta["plan"]] == ["moefy", "moefy"] and meta["extra"]["moefy"]["flops_ratio"] < 1
    moe = pz.load(tmp_path / "moe")
    assert [f.active for f in _ffns(moe)] == [1, 1]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1 and "already exists" in capsys.readouterr().err
    main([*args, "--recover-epochs", "1", "--force"])  # distilled from the dense model, routers refitted
    recovered = pz.load(tmp_path / "moe")
    assert not torch.equal(recovered.state_dict()[next(k for k in moe.state_dict() if "router" in k)],
                           moe.state_dict()[next(k for k in moe.state_dict() if "router" in k)])
