"""A model built on ``meta`` and sharded before it has any storage: each rank materialises only its share, and
that share is exactly the shard of the whole model materialised with the same seed."""

from __future__ import annotations

import copy

import pytest
import torch

import particlize as pz
from conftest import hf_model, output_of
from particlize.errors import ParticlizeError
from particlize.parallel import empty_parameters, launch, materialize, shard, unshard
from particlize.surgery import on_meta
from particlize.surgery import shard_model

FAMILIES = ["bert", "llama-gqa", "qwen2-gqa", "gpt2", "vit"]


def _meta(family: str):
    with empty_parameters():
        return hf_model(family)


def _same(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    """Names of the tensors that differ (or are missing) between two state dicts."""
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(set(sa) ^ set(sb)) + [k for k in sa if k in sb and not torch.equal(sa[k], sb[k])]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("block", [1 << 20, 40])  # 40 elements: every tensor drawn in many blocks of rows
def test_a_materialised_shard_is_the_shard_of_the_materialised_whole_model(family, block, monkeypatch):
    monkeypatch.setattr(on_meta, "BLOCK", block)
    model, _ = _meta(family)
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    whole = materialize(copy.deepcopy(model), seed=3)
    assert not any(p.is_meta for p in whole.parameters())
    pm, wpm = pz.decompose(model), pz.decompose(whole)
    for world in (2, 3):  # 3: widths and key/value heads that do not divide
        for rank in range(world):
            part = materialize(shard_model(pm, rank, world).model, seed=3)
            assert _same(part, shard_model(wpm, rank, world).model) == [], (family, world, rank)


def test_materialize_is_seeded_keeps_ties_and_refuses_meta_buffers():
    model, _ = _meta("gpt2")
    a, b, c = (materialize(copy.deepcopy(model), seed=s) for s in (0, 0, 1))
    assert _same(a, b) == [] and _same(a, c) != []
    assert a.lm_head.weight is a.transformer.wte.weight  # tied before, tied after
    ln = a.transformer.h[0].ln_1
    assert torch.equal(ln.weight, torch.ones_like(ln.weight)) and torch.equal(ln.bias, torch.zeros_like(ln.bias))
    with torch.device("meta"):  # buffers on meta too: rotary frequencies cannot be re-derived
        llama, _ = hf_model("llama-gqa")
    with pytest.raises(ParticlizeError, match="empty_parameters"):
        materialize(llama)


def _sharded_on_meta(families: list[str]) -> dict:
    """On each rank: shard the meta model, materialise the share; its outputs vs the whole model materialised
    with the same seed, and the gathered weights vs that model's."""
    out = {}
    for fam in families:
        model, batch = _meta(fam)
        part = materialize(shard(model), seed=5)
        whole = materialize(model, seed=5)
        with torch.no_grad():
            diff = float((output_of(part, batch) - output_of(whole, batch)).abs().max())
        out[fam] = dict(diff=diff, gathered=_same(unshard(part), whole),
                        smaller=sum(p.numel() for p in part.parameters()) < sum(p.numel() for p in whole.parameters()))
    return out


def test_two_ranks_materialise_their_shares_only_and_match_the_whole_model():
    for rank in launch(_sharded_on_meta, 2, ["bert", "llama-gqa", "gpt2"], start_method="fork", timeout=60):
        for fam, r in rank.items():
            assert r["diff"] <= 1e-5 and r["gathered"] == [] and r["smaller"], (fam, r)
