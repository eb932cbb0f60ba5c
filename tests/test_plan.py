"""The Plan of verbs: serialisation, replay, carrying the particle map, user classes loaded onto base=."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import particlize as pz
from conftest import HF_FAMILIES, hf_model, output_of
from particlize.plan import FORMAT, Plan, Step, model_plan


# ---- models a user defines in their own script (no recipe: loaded with base=) ------------------------


class ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.Sequential(*[self._block() for _ in range(2)])
        self.mid = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Linear(12, 4)

    @staticmethod
    def _block() -> nn.Module:
        return _Res(nn.Sequential(nn.Conv2d(8, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
                                  nn.Conv2d(10, 8, 3, padding=1), nn.BatchNorm2d(8)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mid(self.blocks(self.stem(x))).mean((2, 3)))


class _Res(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.body(x))


class RNNNet(nn.Module):
    def __init__(self, cell: str = "LSTM", layers: int = 3) -> None:
        super().__init__()
        self.rnn = getattr(nn, cell)(5, 9, num_layers=layers, batch_first=True)
        self.head = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def _user_cases() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    cnn = ResidualCNN()
    for m in cnn.modules():  # non-trivial BatchNorm statistics, so a cut shows in the outputs
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return {
        "residual-cnn": (cnn.eval(), torch.randn(2, 3, 8, 8)),
        "lstm-3": (RNNNet("LSTM", 3).eval(), torch.randn(2, 6, 5)),
        "gru-2": (RNNNet("GRU", 2).eval(), torch.randn(2, 6, 5)),
    }


def _fresh(name: str) -> nn.Module:
    torch.manual_seed(123)  # other weights than the saved ones: load must overwrite every tensor
    return {"residual-cnn": ResidualCNN, "lstm-3": lambda: RNNNet("LSTM", 3), "gru-2": lambda: RNNNet("GRU", 2)}[name]()


def _drop_some(pm: pz.ParticleMap, seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(seed)
    remove = {}
    for grp in pm.groups:
        if grp.kind == "block" or grp.size < 2:
            continue
        k = int(torch.randint(1, grp.size, (1,), generator=g))
        remove[grp.name] = sorted(torch.randperm(grp.size, generator=g)[:k].tolist())
    return remove


@pytest.mark.parametrize("name", ["residual-cnn", "lstm-3", "gru-2"])
def test_user_class_saves_plan_and_loads_onto_base(name, tmp_path):
    model, x = _user_cases()[name]
    pm = pz.decompose(model, example_inputs=x[:1])
    small = pm.prune(_drop_some(pm, 0))
    pm2 = pz.decompose(small, example_inputs=x[:1])
    smaller = pm2.prune(_drop_some(pm2, 1))  # two operations: the plan grows
    assert len(model_plan(smaller)) > len(model_plan(small)) > 0
    pz.save(smaller, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "particlize.json").read_text())
    assert meta["recipe"] is None and meta["base_class"].endswith(type(model).__qualname__)
    assert meta["format"] == FORMAT and meta["particlize"] == pz.__version__
    with pytest.raises(pz.CheckpointError, match=f"pass base={type(model).__name__}"):
        pz.load(tmp_path / "m")
    again = pz.load(tmp_path / "m", base=_fresh(name))
    with torch.no_grad():
        torch.testing.assert_close(again(x), smaller(x), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(smaller(x), model(x), atol=1e-3)
    assert model_plan(again) == model_plan(smaller)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in smaller.parameters())


def test_base_that_was_already_changed_is_refused(tmp_path):
    model, x = _user_cases()["gru-2"]
    pm = pz.decompose(model)
    small = pm.prune(_drop_some(pm, 0))
    pz.save(small, tmp_path / "m")
    with pytest.raises(pz.CheckpointError, match="freshly built"):
        pz.load(tmp_path / "m", base=small)


# ---- the carried map equals a fresh decompose ---------------------------------------------------------


def _signature(pm: pz.ParticleMap) -> list:
    return [(g.name, g.kind, g.size, g.writers, g.readers, g.balanced, getattr(g.gate, "readers", None))
            for g in pm.groups]


@pytest.mark.parametrize("family", HF_FAMILIES)
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000))
def test_carried_map_equals_fresh_decompose(family, seed):
    model, batch = hf_model(family)
    pm = pz.decompose(model)
    remove = {}
    g = torch.Generator().manual_seed(seed)
    for grp in pm.groups:
        if grp.kind == "block" or torch.rand(1, generator=g) < 0.3 or grp.contains in remove:  # not both kv and q heads
            continue
        chunk = grp.size // grp.balanced
        drop = torch.randperm(chunk, generator=g)[: int(torch.randint(1, chunk, (1,), generator=g))].tolist()
        remove[grp.name] = [c * chunk + i for c in range(grp.balanced) for i in drop]
    keep = {n: [i for i in range(pm[n].size) if i not in set(r)] for n, r in remove.items()}
    small = pm.prune({})  # an unchanged copy to cut in place
    carried = pz.plan.run(pm.rebind(small), Plan.prune(keep, {n: pm[n].kind for n in keep}))
    fresh = pz.decompose(small)
    assert _signature(carried) == _signature(fresh)
    assert carried.cost() == fresh.cost() == pm.cost(remove)


@pytest.mark.parametrize("name", ["lstm-3", "residual-cnn"])
def test_carry_through_the_prune_verb(name):
    """`run` hands on a map for the changed model that a fresh decompose agrees with (also where an
    adapter rebuilds modules: an LSTM of uneven widths becomes a stack of single-layer ones)."""
    model, x = _user_cases()[name]
    pm = pz.decompose(model, example_inputs=x[:1])
    remove = _drop_some(pm, 3)
    keep = {n: [i for i in range(pm[n].size) if i not in set(r)] for n, r in remove.items()}
    copy = pm.prune({})  # an unchanged copy to cut in place
    out = pz.plan.run(pm.rebind(copy), Plan.prune(keep, {n: pm[n].kind for n in keep}))
    assert _signature(out) == _signature(pz.decompose(copy, example_inputs=x[:1]))
    with torch.no_grad(), pm.ablate(remove) as gated:
        torch.testing.assert_close(copy(x), gated(x), atol=1e-5, rtol=1e-5)


# ---- serialisation ------------------------------------------------------------------------------------


def test_plan_json_round_trip_and_format_1():
    plan = Plan((Step("merge", "a.neurons", {"removed": [1], "into": {"1": 0}}), Step("prune", "a.neurons", {"keep": [0, 2]})))
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    assert plan[1:] == Plan(plan.steps[1:]) and (plan[:1] + plan[1:]) == plan and plan.startswith(plan[:1])
    old = [{"x.blocks": [0], "x.0.heads": [1, 2]}]  # format 1: rounds of {group: kept}, blocks applied last
    assert Plan.from_json(old, format=1).to_json() == [
        {"verb": "prune", "group": "x.0.heads", "args": {"keep": [1, 2]}},
        {"verb": "prune", "group": "x.blocks", "args": {"keep": [0]}},
    ]
    with pytest.raises(pz.PlanError, match="verb"):
        Plan.from_json([{"group": "x"}])


@pytest.fixture
def saved_bert(tmp_path):
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    small = pm.prune({"bert.encoder.layer.1.attention.heads": [0], "bert.encoder.layer.blocks": [2]})
    pz.save(small, tmp_path / "m")
    return tmp_path / "m", small, batch


def test_format_1_folders_still_load(saved_bert):
    out, small, batch = saved_bert
    meta = json.loads((out / "particlize.json").read_text())
    rnd = {s["group"]: s["args"]["keep"] for s in meta["plan"]}
    meta.update(format=1, plan=[rnd])
    del meta["particlize"]
    (out / "particlize.json").write_text(json.dumps(meta))
    with torch.no_grad():
        torch.testing.assert_close(output_of(pz.load(out), batch), output_of(small, batch))


def test_unknown_verb_and_newer_format_name_the_writer(saved_bert):
    out, _, _ = saved_bert
    meta = json.loads((out / "particlize.json").read_text())
    meta["plan"].insert(0, {"verb": "teleport", "group": "bert.encoder.layer.0.attention.heads", "args": {}})
    meta["particlize"] = "9.9.0"
    (out / "particlize.json").write_text(json.dumps(meta))
    with pytest.raises(pz.PlanError, match=r"unknown plan verb 'teleport' \(the plan was written by particlize 9\.9\.0\)"):
        pz.load(out)
    meta["format"] = FORMAT + 1
    (out / "particlize.json").write_text(json.dumps(meta))
    with pytest.raises(pz.CheckpointError, match=rf"written by particlize 9\.9\.0 in format {FORMAT + 1}.*upgrade"):
        pz.load(out)
