"""Gates, plans and checkpoints: hooks always removed, bad input always a clear ParticlizeError."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import particlize as pz
from conftest import hf_model, output_of
from particlize.particles import InputGate, ParticleGroup, ParticleMap, Slice

HEADS = "bert.encoder.layer.1.attention.heads"


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def bert():
    model, batch = hf_model("bert")
    return model, batch, pz.decompose(model)


def test_hooks_removed_after_context_and_after_exception(bert):
    model, batch, pm = bert
    before = _hooks(model)
    with pm.ablate({HEADS: [0]}):
        assert _hooks(model) > before
        output_of(model, batch)
    assert _hooks(model) == before
    with pytest.raises(RuntimeError, match="boom"):
        with pm.ablate({HEADS: [0], "bert.encoder.layer.blocks": [2]}):
            output_of(model, batch)
            raise RuntimeError("boom")
    assert _hooks(model) == before


class _TwoBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused, self.out = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.used(x)))


def test_gate_that_does_not_fire_raises():
    model = _TwoBranch()
    groups = [
        ParticleGroup("used.neurons", "neuron", 6, 0, InputGate("out"), (Slice("used.weight", 0),), (Slice("out.weight", 1),)),
        ParticleGroup("unused.neurons", "neuron", 2, 0, InputGate("unused"), (Slice("unused.weight", 1, 2),), ()),
    ]
    pm = ParticleMap(model, groups, tensor_flops={}, flops_unit="per sample")
    with pm.ablate({"used.neurons": [1]}):
        model(torch.randn(2, 4))  # fine: the gate fired
    with pytest.raises(pz.GateError, match="unused.neurons"):
        with pm.ablate({"unused.neurons": [0]}):
            model(torch.randn(2, 4))
    assert _hooks(model) == 0


def test_ablate_mutates_nothing(bert):
    model, batch, pm = bert
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pm.ablate({HEADS: [0, 1]}):
        output_of(model, batch)
    small = pm.prune({HEADS: [0, 1]})
    assert small is not model
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize(
    "remove, match",
    [
        ({HEADS: [4]}, r"has 4 particles \(indices 0..3\); got \[4\]"),
        ({HEADS: [-1]}, "got \\[-1\\]"),
        ({"bert.encoder.layer.9.attention.heads": [0]}, "no particle group named"),
        ({HEADS: [0, 1, 2, 3]}, "would leave an empty layer"),
    ],
)
def test_bad_removal_sets(bert, remove, match):
    _, _, pm = bert
    with pytest.raises(pz.PlanError, match=match):
        pm.prune(remove)


def test_unbalanced_gqa_removal_is_refused_but_can_be_ablated():
    model, batch = hf_model("llama-gqa")
    pm = pz.decompose(model)
    name = "model.layers.0.self_attn.heads"
    with pytest.raises(pz.PlanError, match="same number of query heads"):
        pm.prune({name: [0]})
    with torch.no_grad(), pm.ablate({name: [0]}):
        output_of(model, batch)


def test_unsupported_model_names_its_modules():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with pytest.raises(pz.UnsupportedModelError, match=r"0 \(Linear\).*Supported:"):
        pz.decompose(model)
    assert issubclass(pz.UnsupportedModelError, pz.ParticlizeError)


def test_gate_shape_errors(bert):
    model, batch, pm = bert
    with pytest.raises(pz.GateError, match=r"shape \[4\] or \[batch, 4\]"):
        with pm.gates({HEADS: torch.ones(5)}):
            pass
    with pytest.raises(pz.GateError, match="batch"):
        with pm.gates({HEADS: torch.ones(2, 4)}):
            output_of(model, batch)  # batch is 3
    with pytest.raises(pz.ParticlizeError, match="unknown ablation mode"):
        with pm.ablate({HEADS: [0]}, mode="bogus"):
            pass
    with pytest.raises(pz.ParticlizeError, match="needs data"):
        with pm.ablate({HEADS: [0]}, mode="mean"):
            pass


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.fixture
def saved(bert, tmp_path):
    model, batch, pm = bert
    small = pm.prune({HEADS: [1], "bert.encoder.layer.0.intermediate.neurons": [3, 4]})
    out = pz.save(small, tmp_path / "small")
    return out, small, batch


def test_save_refuses_to_overwrite(saved):
    out, small, _ = saved
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(pz.ParticlizeError, match="--force"):
        pz.save(small, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    pz.save(small, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "particlize.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_truncated_weights(saved):
    out, _, _ = saved
    w = out / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(pz.CheckpointError, match="corrupt or truncated"):
        pz.load(out)


def test_corrupt_header(saved):
    out, _, _ = saved
    w = out / "model.safetensors"
    w.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(pz.CheckpointError, match="corrupt or truncated"):
        pz.load(out)


def test_pickle_file_is_never_unpickled(tmp_path):
    f = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, f)
    with pytest.raises(pz.CheckpointError, match="never unpickled"):
        pz.load(f)
    with pytest.raises(pz.CheckpointError, match="not a particlize model folder"):
        pz.load(tmp_path)


def test_plan_that_does_not_match(saved):
    out, _, _ = saved
    meta = json.loads((out / "particlize.json").read_text())
    steps = meta["plan"]
    meta["plan"] = [{"verb": "prune", "group": "bert.encoder.layer.7.attention.heads", "args": {"keep": [0]}}, *steps]
    (out / "particlize.json").write_text(json.dumps(meta))
    with pytest.raises(pz.PlanError, match="does not have"):
        pz.load(out)
    heads = next(s for s in steps if s["group"] == HEADS)
    heads["args"]["keep"] = [0, 1, 2]  # the weights were saved with 3 heads, but different ones kept: shapes agree
    neurons = next(s for s in steps if s["group"] == "bert.encoder.layer.0.intermediate.neurons")
    neurons["args"]["keep"] = list(range(40))  # 40 != 46 kept neurons
    meta["plan"] = steps
    (out / "particlize.json").write_text(json.dumps(meta))
    with pytest.raises(pz.PlanError, match="do not match"):
        pz.load(out)


def test_corrupt_json_and_foreign_code(saved):
    out, _, _ = saved
    meta = json.loads((out / "particlize.json").read_text())
    (out / "particlize.json").write_text("{not json")
    with pytest.raises(pz.CheckpointError, match="corrupt"):
        pz.load(out)
    meta["recipe"] = {"kind": "callable", "target": "os:system", "kwargs": {}}
    (out / "particlize.json").write_text(json.dumps(meta))
    with pytest.raises(pz.CheckpointError, match="trust_code=True"):
        pz.load(out)


def test_model_without_recipe_is_loaded_onto_a_base(tmp_path):
    """A user's own class has no recipe: the folder holds weights + plan, and load needs base=."""
    model = _TwoBranch()
    pz.save(model, tmp_path / "x")
    with pytest.raises(pz.CheckpointError, match=r"cannot rebuild by itself: pass base=_TwoBranch\("):
        pz.load(tmp_path / "x")
    with pytest.raises(pz.CheckpointError, match="base= is a"):
        pz.load(tmp_path / "x", base=torch.nn.Linear(2, 2))
    again = pz.load(tmp_path / "x", base=_TwoBranch())
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
