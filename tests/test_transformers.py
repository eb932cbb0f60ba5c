"""The masked ≡ pruned invariant and its companions for every Hugging Face family we support."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import particlize as pz
from conftest import HF_FAMILIES, hf_model, output_of
from strategies import removal_sets

SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _flops(model, batch) -> int:
    with FlopCounterMode(display=False) as fc:
        output_of(model, batch)
    return fc.get_total_flops()


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_groups_found(family):
    model, _ = hf_model(family)
    pm = pz.decompose(model)
    kinds = {g.kind for g in pm.groups}
    gqa = {"llama-gqa": 4, "qwen2-gqa": 2, "mistral-gqa": 2}.get(family, 1)
    assert kinds == {"head", "neuron", "block"} | ({"kv_head"} if gqa > 1 else set())  # kv heads: tests/test_kv_heads.py
    heads = pm.select("head")
    assert len(heads) == (2 if family == "llama-mha" else 3)  # one head group per layer
    assert all(g.name.endswith(".heads") for g in heads)
    assert all(g.balanced == (heads[0].size // gqa if gqa > 1 else 1) for g in heads)


@pytest.mark.parametrize("family", HF_FAMILIES)
@SETTINGS
@given(data=st.data())
def test_masked_equals_pruned(family, data, tmp_path_factory):
    model, batch = hf_model(family)
    pm = pz.decompose(model, seq_len=batch.get("input_ids", torch.zeros(1, 17)).shape[1])
    remove = data.draw(removal_sets(pm))
    with torch.no_grad():
        dense = output_of(model, batch)
        with pm.ablate(remove):
            masked = output_of(model, batch)
        small = pm.prune(remove)
        pruned = output_of(small, batch)
        torch.testing.assert_close(pruned, masked, atol=1e-5, rtol=0)
        # the original is untouched and no hook is left behind
        torch.testing.assert_close(output_of(model, batch), dense, atol=0, rtol=0)
        assert _params(small) == pm.cost(remove).params
        out = tmp_path_factory.mktemp("saved")
        pz.save(small, out, force=True)
        again = pz.load(out)
        torch.testing.assert_close(output_of(again, batch), pruned, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama-gqa", "mistral-gqa", "vit"])
@SETTINGS
@given(data=st.data())
def test_flops_match_costs(family, data):
    model, batch = hf_model(family)
    model.set_attn_implementation("eager")  # the FLOP counter has no formula for CPU fused attention
    tokens = 3 * (7 if "input_ids" in batch else 17)
    pm = pz.decompose(model, seq_len=tokens // 3)
    remove = data.draw(removal_sets(pm))
    small = pm.prune(remove)
    saved = _flops(model, batch) - _flops(small, batch)
    expected = (pm.cost().flops - pm.cost(remove).flops) * tokens
    assert saved == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("family", ["bert", "llama-gqa"])
def test_table_costs_are_marginal_costs(family):
    model, _ = hf_model(family)
    pm = pz.decompose(model)
    df = pm.table()
    assert {"group", "kind", "layer", "index", "params", "flops", "writer_norm", "reader_norm"} <= set(df.columns)
    assert len(df) == sum(g.size for g in pm.groups)
    full = pm.cost()
    for g in pm.groups:
        row = df[(df.group == g.name) & (df["index"] == 0)].iloc[0]
        alone = pm.cost({g.name: [0]})
        assert row.params == full.params - alone.params
        assert row.flops == pytest.approx(full.flops - alone.flops)
        assert row.writer_norm > 0


def test_head_norms_are_the_weight_slices():
    model, _ = hf_model("bert")
    pm = pz.decompose(model)
    g = pm["bert.encoder.layer.1.attention.heads"]
    df = pm.table().set_index(["group", "index"])
    att = model.bert.encoder.layer[1].attention
    d = 8
    w = torch.cat([getattr(att.self, k).weight[d:2 * d].flatten() for k in ("query", "key", "value")]
                  + [getattr(att.self, k).bias[d:2 * d] for k in ("query", "key", "value")])
    assert df.loc[(g.name, 1), "writer_norm"] == pytest.approx(w.norm().item(), rel=1e-5)
    assert df.loc[(g.name, 1), "reader_norm"] == pytest.approx(att.output.dense.weight[:, d:2 * d].norm().item(), rel=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama-gqa"])
def test_per_example_gates_equal_one_run_per_example(family):
    model, batch = hf_model(family)
    pm = pz.decompose(model)
    heads, neurons = pm.select("head")[1], pm.select("neuron")[0]
    mask_h = torch.zeros(3, heads.size)
    mask_h[0, 0] = mask_h[2, [1, 2]] = 1
    mask_n = torch.zeros(3, neurons.size)
    mask_n[1, 3] = mask_n[2, 0] = 1
    blocks = pm.select("block")[0]
    mask_b = torch.zeros(3, blocks.size)
    mask_b[1, 2] = 1
    with torch.no_grad(), pm.ablate({heads.name: mask_h, neurons.name: mask_n, blocks.name: mask_b}):
        batched = output_of(model, batch)
    for b in range(3):
        one = {k: v[b : b + 1] for k, v in batch.items()}
        rem = {heads.name: mask_h[b].nonzero().flatten().tolist(), neurons.name: mask_n[b].nonzero().flatten().tolist(),
               blocks.name: mask_b[b].nonzero().flatten().tolist()}
        with torch.no_grad(), pm.ablate(rem):
            torch.testing.assert_close(batched[b : b + 1], output_of(model, one), atol=1e-5, rtol=1e-5)


def test_gate_gradients_are_first_order_effects():
    """dL/dg at g = 1 exists for every particle of every gated group (one backward)."""
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    gates = {g.name: torch.ones(g.size, requires_grad=True) for g in pm.groups}
    with pm.gates(gates):
        output_of(model, batch).logsumexp(-1).sum().backward()
    for name, g in gates.items():
        assert g.grad is not None and g.grad.shape == (pm[name].size,) and g.grad.abs().sum() > 0


def test_resample_with_own_activations_is_identity_and_mean_patch_reaches_reader():
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    name = "bert.encoder.layer.0.intermediate.neurons"
    with torch.no_grad():
        dense = output_of(model, batch)
        with pm.ablate({name: list(range(48))}, mode="resample", data=batch):
            torch.testing.assert_close(output_of(model, batch), dense, atol=1e-6, rtol=0)
        other = {"input_ids": torch.randint(0, 97, (3, 7))}
        with pm.ablate({name: list(range(48))}, mode="resample", data=other):
            assert not torch.allclose(output_of(model, batch), dense, atol=1e-4)
        mean = pm.mean_activations([name], [batch])[name][0]
        seen = []
        with pm.ablate({name: [0, 5]}, mode="mean", data=[batch]), pm.capture([name], lambda n, i, a: seen.append(a)):
            output_of(model, batch)
    # capture hooks run after the gate hook was registered, so they see the gated activation
    a = seen[0].reshape(-1, 48)
    torch.testing.assert_close(a[:, 0], mean[0].expand(a.shape[0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(a[:, 5], mean[5].expand(a.shape[0]), atol=1e-6, rtol=0)


def test_mean_activations_leave_padding_out():
    """The mean patch is the mean over real tokens: padded positions (attention_mask 0) do not count."""
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    name = "bert.encoder.layer.1.intermediate.neurons"
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] * 5 + [0] * 2])
    padded = {**batch, "attention_mask": mask}
    seen = []
    with torch.no_grad(), pm.capture([name], lambda n, i, a: seen.append(a)):
        output_of(model, padded)
    want = seen[0][mask.bool()].double().mean(0).float()
    got = pm.mean_activations([name], [padded])[name][0]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(got, seen[0].reshape(-1, 48).mean(0), atol=1e-4)


def test_two_rounds_compose_and_reload(tmp_path):
    model, batch = hf_model("llama-gqa")
    pm = pz.decompose(model)
    r1 = {"model.layers.0.self_attn.heads": [0, 4], "model.layers.blocks": [1], "model.layers.2.mlp.neurons": [0, 1]}
    small = pm.prune(r1)
    pm2 = pz.decompose(small)
    assert [g.name for g in pm2.select("head")] == ["model.layers.0.self_attn.heads", "model.layers.1.self_attn.heads"]
    assert pm2["model.layers.1.mlp.neurons"].size == 38  # old layer 2, renumbered
    r2 = {"model.layers.0.self_attn.heads": [1, 5], "model.layers.1.mlp.neurons": [7]}
    smaller = pm2.prune(r2)
    with torch.no_grad():
        with pm2.ablate(r2):
            masked = output_of(small, batch)
        torch.testing.assert_close(output_of(smaller, batch), masked, atol=1e-5, rtol=0)
        pz.save(smaller, tmp_path / "m")
        torch.testing.assert_close(output_of(pz.load(tmp_path / "m"), batch), masked, atol=1e-5, rtol=0)
    assert smaller.model.layers[0].self_attn.num_key_value_groups == 2
    assert smaller.config.num_hidden_layers == 2


@pytest.mark.slow
def test_real_minilm_half_pruned(tmp_path):
    from particlize.sources import load_model

    model = load_model("minilm")
    pm = pz.decompose(model)
    gen = torch.Generator().manual_seed(0)
    remove = {g.name: torch.randperm(g.size, generator=gen)[: g.size // 2].tolist()
              for g in pm.groups if g.kind in ("head", "neuron")}
    batch = {"input_ids": torch.randint(1000, 20000, (4, 16), generator=gen), "attention_mask": torch.ones(4, 16, dtype=torch.long)}
    with torch.no_grad():
        with pm.ablate(remove):
            masked = output_of(model, batch)
        small = pm.prune(remove)
        torch.testing.assert_close(output_of(small, batch), masked, atol=1e-5, rtol=0)
        assert sum(p.numel() for p in small.parameters()) == pm.cost(remove).params
        pz.save(small, tmp_path / "m")
        torch.testing.assert_close(output_of(pz.load(tmp_path / "m"), batch), masked, atol=1e-5, rtol=0)
