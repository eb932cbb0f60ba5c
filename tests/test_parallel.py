"""Particle-parallel: the shard verb, its layout, and real gloo process groups on localhost (each launch has a
timeout, so a stuck rank fails the test instead of hanging the suite)."""

from __future__ import annotations

import os
import socket

import pytest
import torch

import particlize as pz
from conftest import hf_model, output_of
from particlize.errors import CheckpointError
from particlize.parallel import ParallelError, analyze, check_rank, check_shard, launch, shard, unshard
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


def _shard_check(families: list[str]) -> dict:
    """On each rank: sharded outputs vs the whole model's, unshard vs the original weights."""
    out = {}
    for fam in families:
        model, batch = _model(fam)
        part, whole, ref, diff, exact = _round_trip(model, batch)
        with torch.no_grad():
            again = float((output_of(whole, batch) - ref).abs().max())
        try:
            pz.save(part, f"/nonexistent/{fam}")
            refused = ""
        except CheckpointError as e:
            refused = str(e)
        steps = [s for s in model_plan(part) if s.verb == "shard"]
        out[fam] = dict(diff=diff, exact=exact, again=again, refused=refused, steps=len(steps),
                        small=sum(p.numel() for p in part.parameters()) < sum(p.numel() for p in model.parameters()),
                        whole_plan=model_plan(whole).verbs())
    return out


def test_two_ranks_equal_the_whole_model_and_gather_back_exactly():
    res = launch(_shard_check, 2, ["bert", "llama-gqa", "dit"], **FORK)
    for rank in res:
        for fam, r in rank.items():
            assert r["diff"] <= 1e-5, fam
            assert r["exact"] and r["again"] == 0.0, fam
            assert r["steps"] > 0 and r["small"] and "shard" not in r["whole_plan"], fam
            assert "unshard" in r["refused"], fam


def _pruned_bert():
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    # uneven widths that do not divide 3: 4, 3, 4 heads; 48, 31, 40 neurons
    small = pm.prune({"bert.encoder.layer.1.attention.heads": [2], "bert.encoder.layer.1.intermediate.neurons": range(17),
                      "bert.encoder.layer.2.intermediate.neurons": range(8)})
    return small.eval(), batch


def _uneven() -> dict:
    model, batch = _pruned_bert()
    part, _, _, diff, exact = _round_trip(model, batch)
    return dict(diff=diff, exact=exact,
                widths={n: len(p[torch.distributed.get_rank()]) for n, p in part._particlize_shard["layout"].items()})


def test_three_ranks_on_a_pruned_model_with_uneven_widths():
    res = launch(_uneven, 3, **FORK)
    assert all(r["diff"] <= 1e-5 and r["exact"] for r in res)
    # 31 neurons over 3 ranks: 11 + 10 + 10, and every rank holds a share of every group
    widths = [r["widths"]["bert.encoder.layer.1.intermediate.neurons"] for r in res]
    assert sorted(widths) == [10, 10, 11]


def test_layout_is_balanced_by_cost_and_keeps_query_heads_with_their_kv_head():
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
    gqa = pz.decompose(hf_model("llama-gqa")[0])
    lay = layout(gqa, 2)
    heads = [n for n in lay if gqa[n].kind == "head"]
    assert heads and all(lay[n] == [[0, 1, 4, 5], [2, 3, 6, 7]] for n in heads)  # 2 query heads of each kv head
    assert all(sorted(map(len, p)) == [2, 2, 4] for n, p in layout(gqa, 3).items() if gqa[n].kind == "head")
    qwen = pz.decompose(hf_model("qwen2-gqa")[0])  # 2 query heads per kv head: not split over 3 ranks
    assert not any(qwen[n].kind == "head" for n in layout(qwen, 3)) and any(qwen[n].kind == "head" for n in layout(qwen, 2))


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
