"""Particle-parallel: the shard verb, its layout, and real gloo process groups on localhost (each launch has a
timeout, so a stuck rank fails the test instead of hanging the suite)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
from torch.distributed.tensor import DTensor

import particlize as pz
from conftest import hf_model, output_of
from particlize.errors import CheckpointError, PlanError
from particlize.parallel import ParallelError, analyze, check_rank, check_shard, launch, local_numel, shard, unshard
from particlize.plan import model_plan
from particlize.surgery import layout, shard_model
from test_moefy import _dit

FORK = dict(start_method="fork", timeout=60)


def _model(family: str):
    return _dit() if family == "dit" else hf_model(family)


def _round_trip(model, batch):
    """On this rank: shard ``model``, the largest difference of its outputs from the whole model's, gather it
    back; ``(part, whole, reference output, diff, whether the gathered weights equal the original exactly)``."""
    with torch.no_grad():
        ref = output_of(model, batch)
        part = shard(model)
        diff = float((output_of(part, batch) - ref).abs().max())
        whole = unshard(part)
    sd, sw = model.state_dict(), whole.state_dict()
    exact = list(sd) == list(sw) and all(torch.equal(sd[k], sw[k]) for k in sd)
    return part, whole, ref, diff, exact


def _kv_rows(model) -> list[int]:
    """Rows of each layer's key projection (grouped-query models; empty for the others)."""
    return [m.k_proj.out_features for m in model.modules() if hasattr(m, "k_proj")]


def _shard_check(families: list[str]) -> dict:
    """On each rank: sharded outputs vs the whole model's, unshard vs the original weights; the same with
    DTensor's ``parallelize_module`` on the groups it fits (its outputs vs the plain collectives')."""
    out = {}
    for fam in families:
        model, batch = _model(fam)
        part, whole, ref, diff, exact = _round_trip(model, batch)
        with torch.no_grad():
            again = float((output_of(whole, batch) - ref).abs().max())
            dt = shard(model, engine="dtensor")
            dt_diff = float((output_of(dt, batch) - output_of(part, batch)).abs().max())
            dt_whole = unshard(dt)
            dt_again = float((output_of(dt_whole, batch) - ref).abs().max())
        try:
            pz.save(part, f"/nonexistent/{fam}")
            refused = ""
        except CheckpointError as e:
            refused = str(e)
        steps = [s for s in model_plan(part) if s.verb == "shard"]
        sd, sw = model.state_dict(), dt_whole.state_dict()
        out[fam] = dict(diff=diff, exact=exact, again=again, refused=refused, steps=len(steps), kv=_kv_rows(part),
                        small=sum(p.numel() for p in part.parameters()) < sum(p.numel() for p in model.parameters()),
                        whole_plan=model_plan(whole).verbs(), dt_diff=dt_diff, dt_again=dt_again,
                        dt_exact=list(sd) == list(sw) and all(torch.equal(sd[k], sw[k]) for k in sd),
                        dt_split=sum(isinstance(p, DTensor) for p in dt.parameters()), dt_params=local_numel(dt),
                        params=local_numel(part), dt_steps=len([s for s in model_plan(dt) if s.verb == "shard"]))
    return out


def test_two_ranks_equal_the_whole_model_and_gather_back_exactly():
    res = launch(_shard_check, 2, ["bert", "llama-gqa", "mistral-gqa", "qwen2-gqa", "gpt2", "dit"], **FORK)
    for rank in res:
        for fam, r in rank.items():
            assert r["diff"] <= 1e-5, fam
            assert r["exact"] and r["again"] == 0.0, fam
            assert r["steps"] > 0 and r["small"] and "shard" not in r["whole_plan"], fam
            assert "unshard" in r["refused"], fam
            # DTensor where it fits: the same outputs as plain collectives, the same weights held and gathered
            assert r["dt_diff"] <= 1e-6 and r["dt_exact"] and r["dt_again"] == 0.0, fam
            assert r["dt_params"] == r["params"] and r["dt_steps"] == r["steps"], fam
        # whole key/value groups: 4 (mistral) and 2 (llama) key/value heads of 8 rows split over 2 ranks; qwen2's 3
        # do not divide 2, so its query heads are split inside each group and its key/value rows replicated
        assert rank["mistral-gqa"]["kv"] == [16] * 3 and rank["llama-gqa"]["kv"] == [8] * 3
        assert rank["qwen2-gqa"]["kv"] == [24] * 3
        # DTensor takes q, k, v, o and the MLP's linears (weights + BERT's biases); not qwen2's split heads, not
        # GPT-2's Conv1D
        assert rank["mistral-gqa"]["dt_split"] == 3 * 7 and rank["qwen2-gqa"]["dt_split"] == 3 * 3
        assert rank["bert"]["dt_split"] == 2 * 18 and rank["gpt2"]["dt_split"] == 0


def _pruned_bert():
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    # uneven widths that do not divide 3: 4, 3, 4 heads; 48, 31, 40 neurons
    small = pm.prune({"bert.encoder.layer.1.attention.heads": [2], "bert.encoder.layer.1.intermediate.neurons": range(17),
                      "bert.encoder.layer.2.intermediate.neurons": range(8)})
    return small.eval(), batch


def _uneven() -> dict:
    out = {}
    for fam in ["pruned-bert", "mistral-gqa", "qwen2-gqa", "llama-gqa"]:
        model, batch = _pruned_bert() if fam == "pruned-bert" else hf_model(fam)
        part, _, _, diff, exact = _round_trip(model, batch)
        out[fam] = dict(diff=diff, exact=exact, kv=_kv_rows(part),
                        widths={n: len(p[torch.distributed.get_rank()]) for n, p in part._particlize_shard["layout"].items()})
    return out


def test_three_ranks_on_uneven_widths_and_key_value_groups():
    res = launch(_uneven, 3, **FORK)
    assert all(r[fam]["diff"] <= 1e-5 and r[fam]["exact"] for r in res for fam in r)
    # 31 neurons over 3 ranks: 11 + 10 + 10, and every rank holds a share of every group
    widths = [r["pruned-bert"]["widths"]["bert.encoder.layer.1.intermediate.neurons"] for r in res]
    assert sorted(widths) == [10, 10, 11]
    # mistral: 4 key/value groups of 2 query heads over 3 ranks, whole groups 2 + 1 + 1 (k rows 16 or 8 per layer)
    # with the extra group on a different rank in each layer; qwen2: 3 groups, one each
    kv = [r["mistral-gqa"]["kv"] for r in res]
    assert all(sorted(col) == [8, 8, 16] for col in zip(*kv)) and len({tuple(k) for k in kv}) == 3
    assert all(r["qwen2-gqa"]["kv"] == [8] * 3 for r in res)
    # llama: 2 key/value groups (fewer than ranks) of 4 query heads: the query heads of each group are split
    # 2 + 1 + 1 and the key/value rows (2 heads x 8) replicated
    assert all(r["llama-gqa"]["kv"] == [16] * 3 for r in res)
    assert sorted(r["llama-gqa"]["widths"]["model.layers.0.self_attn.heads"] for r in res) == [2, 2, 4]


def test_layout_is_balanced_by_cost():
    model, _ = _pruned_bert()
    pm = pz.decompose(model)
    lay = layout(pm, 3)
    assert not any(pm[n].kind == "block" for n in lay)
    for name, parts in lay.items():
        assert sorted(i for p in parts for i in p) == list(range(pm[name].size))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    # the remainders go to the ranks holding the least so far: total FLOPs per rank within one particle's cost
    load = [sum(len(parts[k]) * (pm.cost().flops - pm.cost({n: [0]}).flops) for n, parts in lay.items()) for k in range(3)]
    worst = max(pm.cost().flops - pm.cost({n: [0]}).flops for n in lay)
    assert max(load) - min(load) <= worst + 1e-6


def _head_parts(family: str, world: int) -> list:
    pm = pz.decompose(hf_model(family)[0])
    lay = layout(pm, world)
    return [lay.get(g.name) for g in pm.groups if g.kind == "head"]


def test_the_grouped_query_rule_whole_groups_when_the_world_divides_them_else_shares_of_each():
    # llama: 8 query heads, 2 key/value heads (4 query heads each)
    assert _head_parts("llama-gqa", 2) == [[[0, 1, 2, 3], [4, 5, 6, 7]]] * 3  # rule 1: whole groups
    assert _head_parts("llama-gqa", 3)[0] == [[0, 1, 4, 5], [2, 6], [3, 7]]  # rule 2: 2 + 1 + 1 of each group
    # qwen2: 6 query heads, 3 key/value heads (2 each)
    assert _head_parts("qwen2-gqa", 3) == [[[0, 1], [2, 3], [4, 5]]] * 3  # rule 1
    assert _head_parts("qwen2-gqa", 2) == [[[0, 2, 4], [1, 3, 5]]] * 3  # rule 2: 1 query head of each group
    # mistral: 8 query heads, 4 key/value heads (2 each): over 3 ranks only whole groups split (rule 3), the
    # extra group going to the rank with the least so far
    assert [sorted(map(len, p)) for p in _head_parts("mistral-gqa", 3)] == [[2, 2, 4]] * 3
    assert _head_parts("mistral-gqa", 5) == [None] * 3  # rule 4: replicated
    assert _head_parts("llama-gqa", 5) == [None] * 3


def test_whole_group_parts_need_key_value_projections_and_shares_must_be_even():
    model, _ = hf_model("llama-gqa")
    pm = pz.decompose(model)
    name = next(g.name for g in pm.groups if g.kind == "head")
    with pytest.raises(PlanError, match="same number of query heads"):
        shard_model(pm, 0, 2, {name: [[0, 1, 2], [3, 4, 5, 6, 7]]})
    attn = model.model.layers[0].self_attn  # the map still names the heads; no key/value layers beside them
    attn.k_proj, attn.v_proj = torch.nn.Identity(), torch.nn.Identity()
    with pytest.raises(PlanError, match="no key/value projections"):
        shard_model(pm, 0, 2, {name: [[0, 1, 2, 3], [4, 5, 6, 7]]})


def _analysis() -> object:
    model, batch = hf_model("bert")
    data = [(batch, torch.tensor([0, 1, 2]))]
    return analyze(model, data, "ablation", world_size=2)


def test_distributed_ablation_equals_the_single_process_table():
    model, batch = hf_model("bert")
    want = pz.analyze(model, [(batch, torch.tensor([0, 1, 2]))], "ablation")
    got = launch(_analysis, 2, **FORK)
    for df in got:
        assert list(df.columns) == list(want.columns) and list(df.group) == list(want.group)
        assert list(df["index"]) == list(want["index"])
        torch.testing.assert_close(torch.tensor(df.score.to_numpy()), torch.tensor(want.score.to_numpy()), atol=1e-6, rtol=0)


def _dies() -> None:
    if torch.distributed.get_rank() == 1:
        os._exit(3)
    torch.distributed.barrier()  # rank 0 would wait here for the dead rank


def _fine() -> int:
    return torch.distributed.get_rank()


def test_a_dead_rank_or_a_port_in_use_fails_with_one_line():
    with pytest.raises(ParallelError, match="rank 1 died"):
        launch(_dies, 2, start_method="fork", timeout=20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ParallelError) as e:
            launch(_fine, 2, port=s.getsockname()[1], start_method="fork", timeout=10)
    assert "\n" not in str(e.value)


def test_shard_needs_a_process_group_and_a_shard_cannot_be_saved(tmp_path):
    model, batch = hf_model("bert")
    with pytest.raises(ParallelError, match="process group"):
        shard(model)
    with pytest.raises(ParallelError, match="engine must be one of"):
        shard(model, engine="megatron")
    with pytest.raises(ParallelError, match="process group"):
        check_shard(model, batch)
    part = shard_model(pz.decompose(model), 1, 2).model  # rank 1 of 2: built without running it
    steps = [s for s in model_plan(part) if s.verb == "shard"]
    assert steps and all(s.args["world_size"] == 2 and s.args["rank"] == 1 for s in steps)
    assert part.bert.encoder.layer[0].attention.output.dense.bias.abs().sum() == 0  # added once, by rank 0
    with pytest.raises(CheckpointError, match="unshard"):
        pz.save(part, tmp_path / "x")
    assert not (tmp_path / "x").exists()


FACTORY = """
import torch
from transformers import BertConfig, BertModel

def small_bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=24, max_position_embeddings=16))
"""


def test_check_rank_reports_the_match_throughput_and_memory_of_each_rank(tmp_path):
    (tmp_path / "models.py").write_text(FACTORY)
    rows = launch(check_rank, 2, f"{tmp_path}/models.py:small_bert", None, 4, 16, 2, True, **FORK)
    assert [r["rank"] for r in rows] == [0, 1] and all(r["world_size"] == 2 for r in rows)
    assert all(r["max_abs_diff"] <= 1e-5 and r["examples_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert rows[0]["sharded_groups"] == 4  # 2 head groups and 2 neuron groups; blocks replicated


@pytest.mark.slow
def test_the_parallel_command_spawns_ranks_and_checks_them(tmp_path, capsys):
    from particlize.cli import main

    (tmp_path / "models.py").write_text(FACTORY)
    main(["parallel", f"{tmp_path}/models.py:small_bert", "--nproc", "2", "--trust-code", "--max-length", "16"])
    assert "outputs match the whole model" in capsys.readouterr().out
