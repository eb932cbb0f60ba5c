"""Key/value heads of grouped-query attention as a prunable granularity (issue 29).

Tiny random Llama / Qwen2 models with GQA: 4 query heads over 2 key/value heads, and 8 over 2. A kv_head
particle is one key/value head with its query heads; the group sits beside the query-head group of its layer
and ``contains`` it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import particlize as pz
from particlize.allocate import AllocationConfig, allocate
from particlize.analysis import importance_for
from particlize.errors import ParticlizeError, PlanError

from conftest import _quiet, assert_masked_equals_pruned, hf_model, output_of

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FAMILIES = ["llama-4-2", "qwen2-4-2", "llama-8-2"]


def gqa_model(family: str) -> tuple[torch.nn.Module, dict]:
    """A 2-layer random-init GQA model (``<family>-<query heads>-<kv heads>``), head_dim 8, and a batch."""
    import transformers as T

    _quiet()
    torch.manual_seed(0)
    kind, n_q, n_kv = family.split("-")
    n_q, n_kv = int(n_q), int(n_kv)
    cfg = dict(vocab_size=61, hidden_size=8 * n_q, num_hidden_layers=2, num_attention_heads=n_q,
               num_key_value_heads=n_kv, intermediate_size=24, max_position_embeddings=32)
    model = T.Qwen2ForCausalLM(T.Qwen2Config(**cfg)) if kind == "qwen2" else T.LlamaForCausalLM(T.LlamaConfig(**cfg))
    return model.eval(), {"input_ids": torch.randint(0, 61, (2, 6))}


def _kv(pm) -> list:
    return pm.select("kv_head")


@st.composite
def kv_removals(draw, pm) -> dict[str, list[int]]:
    """Key/value heads to remove in some layers, at least one kept per layer."""
    out = {}
    for g in _kv(pm):
        idx = draw(st.lists(st.integers(0, g.size - 1), max_size=g.size - 1, unique=True))
        if idx:
            out[g.name] = sorted(idx)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_one_kv_head_group_per_gqa_layer(family):
    model, _ = gqa_model(family)
    pm = pz.decompose(model)
    n_q, n_kv = (int(x) for x in family.split("-")[1:])
    kv = _kv(pm)
    assert [g.name for g in kv] == [f"model.layers.{i}.self_attn.kv_heads" for i in range(2)]
    for g in kv:
        heads = pm[g.contains]
        assert (g.size, heads.size, heads.balanced, g.layer) == (n_kv, n_q, n_kv, heads.layer)
        widths = {s.name.rsplit(".", 2)[-2] + "." + s.name.rsplit(".", 1)[-1]: s.width for s in (*g.writers, *g.readers)}
        c = n_q // n_kv
        assert widths["q_proj.weight"] == c * 8 and widths["k_proj.weight"] == widths["v_proj.weight"] == 8
        assert widths["o_proj.weight"] == c * 8
        assert ("q_proj.bias" in widths) == family.startswith("qwen2")  # Qwen2 has q/k/v biases, Llama none


def test_mha_has_no_kv_head_group():
    """Under plain multi-head attention a key/value head is a head: the `heads` group already owns its k/v rows."""
    model, _ = hf_model("llama-mha")
    pm = pz.decompose(model)
    assert _kv(pm) == [] and pm.select("head")
    names = {s.name.rsplit(".", 2)[-2] for s in pm.select("head")[0].writers}
    assert names == {"q_proj", "k_proj", "v_proj"}


@pytest.mark.parametrize("family", FAMILIES)
@SETTINGS
@given(data=st.data())
def test_masked_equals_pruned_and_costs(family, data, tmp_path_factory):
    model, batch = gqa_model(family)
    pm = pz.decompose(model, seq_len=batch["input_ids"].shape[1])
    remove = data.draw(kv_removals(pm))
    small = assert_masked_equals_pruned(pm, remove, batch)
    # the attention modules record the new counts; query heads per key/value head are unchanged
    c = pm.select("head")[0].size // _kv(pm)[0].size
    for g in _kv(pm):
        attn = small.get_submodule(g.name.rpartition(".")[0])
        kept = g.size - len(remove.get(g.name, []))
        assert attn.k_proj.out_features == attn.v_proj.out_features == kept * 8
        assert attn.q_proj.out_features == attn.o_proj.in_features == kept * c * 8
        assert attn.num_key_value_groups == c
    # predicted cost == decomposed cost of the pruned model, and == the carried map's cost
    predicted, again = pm.cost(remove), pz.decompose(small, seq_len=pm.seq_len).cost()
    assert (predicted.params, predicted.flops) == (again.params, pytest.approx(again.flops, rel=1e-12))
    assert predicted.params == sum(p.numel() for p in small.parameters())
    assert pm.pruned(remove).cost().flops == pytest.approx(predicted.flops, rel=1e-12)
    # saved and loaded: the same outputs
    out = tmp_path_factory.mktemp("kv")
    pz.save(small, out, force=True)
    with torch.no_grad():
        torch.testing.assert_close(output_of(pz.load(out), batch), output_of(small, batch), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama-4-2", "qwen2-4-2"])
def test_generation_with_cache_after_kv_cut(family):
    """Decoding with a key/value cache runs on the cut model and matches the gated one, token for token."""
    model, batch = gqa_model(family)
    pm = pz.decompose(model)
    remove = {_kv(pm)[1].name: [0]}
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad(), pm.ablate(remove) as gated:
        expected = gated.generate(**batch, **kw)
    small = pm.prune(remove)
    assert torch.equal(small.generate(**batch, **kw), expected)


def test_unit_costs_are_marginal_costs():
    """The table's cost of one key/value head = what removing it alone saves (its query heads' attention too)."""
    model, _ = gqa_model("llama-8-2")
    pm = pz.decompose(model)
    df, full = pm.table(), pm.cost()
    for g in _kv(pm):
        row = df[(df.group == g.name) & (df["index"] == 1)].iloc[0]
        alone = pm.cost({g.name: [1]})
        assert row.params == full.params - alone.params
        assert row.flops == pytest.approx(full.flops - alone.flops)
        # = its 4 query heads removed + its own key/value rows
        heads = pm.cost({g.contains: [4, 5, 6, 7]})
        assert full.params - alone.params == full.params - heads.params + 2 * 8 * model.config.hidden_size


def test_removing_every_kv_head_of_a_layer_is_refused():
    model, _ = gqa_model("llama-4-2")
    pm = pz.decompose(model)
    with pytest.raises(PlanError, match="would leave an empty layer; keep at least one"):
        pm.prune({"model.layers.0.self_attn.kv_heads": [0, 1]})


def test_kv_heads_and_their_query_heads_are_cut_in_two_calls():
    model, batch = gqa_model("llama-8-2")
    pm = pz.decompose(model, seq_len=6)
    kv, heads = "model.layers.1.self_attn.kv_heads", "model.layers.1.self_attn.heads"
    with pytest.raises(PlanError, match="in two prune calls"):
        pm.prune({kv: [0], heads: [4, 5]})
    with pytest.raises(PlanError, match="in one prune"):  # a plan run directly is refused too
        pz.plan.run(pm.rebind(pm.prune({})), pz.Plan.prune({kv: [1], heads: [0, 1, 4, 5]}, {kv: "kv_head", heads: "head"}))
    # other layers' query heads may go with it
    assert_masked_equals_pruned(pm, {kv: [0], "model.layers.0.self_attn.heads": [0, 4]}, batch)
    # the carried map re-indexes the query heads: key/value head 1 is now 0, its query heads 0..3
    first = pm.pruned({kv: [0]})
    assert (first[heads].size, first[heads].balanced, first[kv].size) == (4, 1, 1)
    fresh = pz.decompose(first.model, seq_len=6)
    for name in (kv, heads):
        assert first[name].size == fresh[name].size
        assert first[name].writers == fresh[name].writers and first[name].readers == fresh[name].readers
        assert first[name].flops_ctx == fresh[name].flops_ctx
    assert first.cost({heads: [1, 2]}) == fresh.cost({heads: [1, 2]})
    assert_masked_equals_pruned(first, {heads: [1, 2]}, batch)
    # and the other way round: query heads cut evenly first, then whole key/value groups
    second = pm.pruned({heads: [0, 4]})  # 3 query heads per key/value head
    assert second[kv].readers[0].width == 3 * 8 and second[kv].flops_ctx == 3 * 4.0 * 8
    assert second.cost({kv: [1]}) == pz.decompose(second.model, seq_len=6).cost({kv: [1]})
    assert_masked_equals_pruned(second, {kv: [1]}, batch)


def test_granularity_kv_heads_allocates_whole_groups():
    model, batch = gqa_model("llama-8-2")
    pm = pz.decompose(model, seq_len=6)
    cfg = AllocationConfig(granularity=("kv_heads",), scorer="magnitude", min_width=0.0)
    cfg.check()
    assert cfg.kinds == {"kv_head"} and "kv_head" not in AllocationConfig(granularity=("all",)).kinds
    imp = importance_for(pm, [batch], "magnitude", cfg.kinds)
    assert set(imp) == {g.name for g in _kv(pm)}
    goal = 0.3 * (pm.cost().flops - pm.cost({g.name: [0] for g in _kv(pm)}).flops)
    remove = allocate(pm, imp, goal, cfg, seq_len=6)
    assert remove and set(remove) <= set(imp)
    assert_masked_equals_pruned(pm, remove, batch)
    for both in (("heads", "kv_heads"), ("all", "kv_heads")):
        with pytest.raises(ParticlizeError, match="cut the same weights: pick one"):
            AllocationConfig(granularity=both).check()


@pytest.mark.parametrize("how", ["bias", "refit"])
def test_compensated_kv_cut_saves_and_loads(how, tmp_path):
    model, batch = gqa_model("qwen2-4-2")
    pm = pz.decompose(model)
    remove = {g.name: [1] for g in _kv(pm)}
    small = pm.prune(remove, compensate=how, data=[batch])
    with torch.no_grad():
        assert not torch.allclose(output_of(small, batch), output_of(pm.prune(remove), batch), atol=1e-4)
        pz.save(small, tmp_path / "m")
        torch.testing.assert_close(output_of(pz.load(tmp_path / "m"), batch), output_of(small, batch), atol=1e-6, rtol=0)
