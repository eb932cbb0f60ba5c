"""Compensation verbs (bias, merge, refit): what each promises, recorded in the plan, replayed by load."""

from __future__ import annotations

import pytest
import torch

import particlize as pz
from conftest import hf_model, output_of, reader_output
from particlize.plan import model_plan
from particlize.surgery import Merge, Refit, linear_reader_weight

FAMILIES = ["bert", "gpt2", "llama-gqa"]


def _removal(pm: pz.ParticleMap) -> dict[str, list[int]]:
    """Half of every compensable group (GQA-even), plus a block, so verbs meet every kind of step."""
    remove = {}
    for g in pm.groups:
        if linear_reader_weight(pm, g) is None or g.contains:  # key/value heads: their query heads are cut here
            continue
        chunk = g.size // g.balanced
        remove[g.name] = [c * chunk + i for c in range(g.balanced) for i in range(0, chunk, 2)]
    blocks = pm.select("block")[0]
    remove[blocks.name] = [blocks.size - 1]
    return remove


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("how", ["bias", "merge", "refit"])
def test_compensated_model_saves_loads_and_records_its_steps(family, how, tmp_path):
    model, batch = hf_model(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pm = pz.decompose(model)
    remove = _removal(pm)
    small = pm.prune(remove, compensate=how, data=[batch])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the original is untouched
    plan = model_plan(small)
    served = [s.group for s in plan if s.verb == how]
    assert served == [n for n in remove if pm[n].kind != "block"]
    assert [s.group for s in plan if s.verb == "prune"] == list(remove)
    plain = pm.prune(remove)
    with torch.no_grad():
        assert not torch.allclose(output_of(small, batch), output_of(plain, batch), atol=1e-4)
    pz.save(small, tmp_path / "m")
    again = pz.load(tmp_path / "m")
    assert model_plan(again) == plan
    with torch.no_grad():
        torch.testing.assert_close(output_of(again, batch), output_of(small, batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_bias_keeps_the_mean_reader_output(family):
    """Mean ablation made permanent: on the calibration data the cut reader's mean output is the intact one's."""
    model, batch = hf_model(family)
    pm = pz.decompose(model)
    name = next(g.name for g in pm.groups if g.kind == "neuron")
    reader = pm[name].gate.module
    drop = list(range(0, pm[name].size, 2))
    small = pm.prune({name: drop}, compensate="bias", data=[batch])
    intact = reader_output(model, reader, batch).double()
    intact = intact.reshape(-1, intact.shape[-1])
    cut = reader_output(small, reader, batch).double().reshape(intact.shape)
    torch.testing.assert_close(cut.mean(0), intact.mean(0), atol=1e-5, rtol=1e-5)
    plain = reader_output(pm.prune({name: drop}), reader, batch).double().reshape(intact.shape)
    assert (plain.mean(0) - intact.mean(0)).abs().max() > 1e-4


def test_bias_gives_a_reader_without_bias_one_and_load_rebuilds_it(tmp_path):
    model, batch = hf_model("llama-gqa")
    pm = pz.decompose(model)
    name = "model.layers.1.mlp.neurons"
    assert model.model.layers[1].mlp.down_proj.bias is None
    small = pm.prune({name: [1, 4]}, compensate="bias", data=[batch])
    assert small.model.layers[1].mlp.down_proj.bias is not None
    assert [s.args.get("adds_bias") for s in model_plan(small) if s.verb == "bias"] == [True]
    pz.save(small, tmp_path / "m")
    again = pz.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(output_of(again, batch), output_of(small, batch), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
@pytest.mark.parametrize("verb", [Merge(damp=0.0), Refit(damp=0.0)], ids=["merge", "refit"])
def test_a_removed_duplicate_is_folded_into_its_twin_exactly(family, verb):
    """A removed neuron whose activation equals a kept one's is folded into that twin (merge: scale 1 onto it;
    refit: least squares on all kept ones): the pruned model computes exactly what the intact one did."""
    model, batch = hf_model(family)
    pm = pz.decompose(model)
    name = next(g.name for g in pm.groups if g.kind == "neuron" and g.layer == 1)
    writer = pm[name].writers[0]
    w = pm._tensor(writer.name)
    b = pm._tensor(pm[name].writers[1].name)
    with torch.no_grad():  # neuron 5 becomes a copy of neuron 2
        w.index_copy_(writer.dim, torch.tensor([5]), w.index_select(writer.dim, torch.tensor([2])))
        b[5] = b[2]
    small = pm.prune({name: [5]}, compensate=verb, data=[batch])
    assert [(s.verb, s.group) for s in model_plan(small)] == [(verb.name, name), ("prune", name)]
    if verb.name == "merge":
        assert model_plan(small)[0].args["into"] == {"5": 2}
    reader = pm[name].gate.module
    intact = reader_output(model, reader, batch)
    torch.testing.assert_close(reader_output(small, reader, batch), intact, atol=1e-5, rtol=1e-5)
    assert (reader_output(pm.prune({name: [5]}), reader, batch) - intact).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(output_of(small, batch), output_of(model, batch), atol=1e-5, rtol=1e-5)


def test_merge_of_heads_uses_a_matrix_per_pair():
    """Heads are merged with a head_dim × head_dim map: a head whose output is a fixed linear map of
    another head's output is folded into it exactly."""
    model, batch = hf_model("bert")
    att = model.bert.encoder.layer[0].attention.self
    d = att.attention_head_size
    with torch.no_grad():  # head 3's values = M · head 1's values (same attention pattern: same q, k)
        M = torch.randn(d, d)
        for lin in (att.query, att.key):
            lin.weight[3 * d:4 * d] = lin.weight[d:2 * d]
            lin.bias[3 * d:4 * d] = lin.bias[d:2 * d]
        att.value.weight[3 * d:4 * d] = M @ att.value.weight[d:2 * d]
        att.value.bias[3 * d:4 * d] = M @ att.value.bias[d:2 * d]
    pm = pz.decompose(model)
    name = "bert.encoder.layer.0.attention.heads"
    small = pm.prune({name: [3]}, compensate=Merge(damp=0.0), data=[batch])
    assert [s.args["into"] for s in model_plan(small) if s.verb == "merge"] == [{"3": 1}]
    with torch.no_grad():
        torch.testing.assert_close(output_of(small, batch), output_of(model, batch), atol=1e-4, rtol=1e-4)


def test_compensation_errors():
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    remove = {"bert.encoder.layer.0.attention.heads": [1]}
    with pytest.raises(pz.PlanError, match="needs data="):
        pm.prune(remove, compensate="merge")
    with pytest.raises(pz.PlanError, match=r"unknown plan verb 'zip'.*bias, merge, moefy, prune, refit"):
        pm.prune(remove, compensate="zip", data=[batch])
    with pytest.raises(pz.PlanError, match="not a compensation verb; use one of bias, merge, refit"):
        pm.prune(remove, compensate="prune", data=[batch])
    with pytest.raises(pz.ParticlizeError, match="calibration data never reached"):
        pm.prune(remove, compensate="bias", data=[])
