"""Reweighting on removal: the readers of cut groups refit by least squares (`pm.prune(..., reweight=data)`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import particlize as pz
from conftest import hf_model, output_of, reader_output
from particlize.surgery import input_moments, linear_reader_weight

FAMILIES = ["bert", "gpt2", "llama-gqa"]


@st.composite
def one_group_removal(draw, pm: pz.ParticleMap) -> tuple[str, list[int]]:
    """A non-block group with a linear reader and particles to remove from it (never all; GQA-even)."""
    names = [g.name for g in pm.groups if linear_reader_weight(pm, g) is not None]
    g = pm[draw(st.sampled_from(names))]
    if g.balanced > 1:
        chunk = g.size // g.balanced
        drop = draw(st.lists(st.integers(0, chunk - 1), min_size=1, max_size=chunk - 1, unique=True))
        return g.name, sorted(c * chunk + i for c in range(g.balanced) for i in drop)
    return g.name, sorted(draw(st.lists(st.integers(0, g.size - 1), min_size=1, max_size=g.size - 1, unique=True)))


@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_refit_never_reconstructs_worse_than_plain_cut(family, data):
    """Least squares with a ridge: on the calibration data the refit reader's output is at least as
    close to the intact reader's as the plainly cut one (for every removal set; here one group)."""
    model, batch = hf_model(family)
    pm = pz.decompose(model)
    name, drop = data.draw(one_group_removal(pm))
    reader = pm[name].gate.module
    intact = reader_output(model, reader, batch)
    plain = reader_output(pm.prune({name: drop}), reader, batch)
    refit = reader_output(pm.prune({name: drop}, reweight=[batch]), reader, batch)
    e_plain = (plain - intact).double().pow(2).sum()
    e_refit = (refit - intact).double().pow(2).sum()
    assert e_refit <= e_plain * (1 + 1e-6) + 1e-9
    # and the model is otherwise the plainly pruned one: same shapes, same parameter count
    small = pm.prune({name: drop}, reweight=[batch])
    assert sum(p.numel() for p in small.parameters()) == pm.cost({name: drop}).params


def test_padding_is_left_out_of_the_statistics():
    """Moments over a padded batch with its attention mask equal those over the same sentences unpadded."""
    model, _ = hf_model("bert")
    pm = pz.decompose(model)
    groups = [g.name for g in pm.groups if linear_reader_weight(pm, g) is not None]
    torch.manual_seed(1)
    a, b = torch.randint(1, 97, (1, 7)), torch.randint(1, 97, (1, 4))
    padded = {"input_ids": torch.cat([a, torch.cat([b, torch.zeros(1, 3, dtype=torch.long)], 1)]),
              "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    m_pad = input_moments(pm, groups, [padded])
    parts = [{"input_ids": a, "attention_mask": torch.ones_like(a)}, {"input_ids": b, "attention_mask": torch.ones_like(b)}]
    m_sep = input_moments(pm, groups, parts)
    for n in groups:
        torch.testing.assert_close(m_pad[n], m_sep[n], atol=1e-5, rtol=1e-4)


def test_reweighted_model_saves_and_loads(tmp_path):
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    remove = {"bert.encoder.layer.0.attention.heads": [1], "bert.encoder.layer.2.intermediate.neurons": [0, 3, 7]}
    small = pm.prune(remove, reweight=[batch])
    pz.save(small, tmp_path / "m")
    again = pz.load(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(output_of(again, batch), output_of(small, batch), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(output_of(small, batch), output_of(pm.prune(remove), batch))


def test_reweight_data_that_never_reaches_the_model_is_refused():
    model, batch = hf_model("bert")
    pm = pz.decompose(model)
    with pytest.raises(pz.ParticlizeError, match="calibration data"):
        pm.prune({"bert.encoder.layer.0.attention.heads": [1]}, reweight=[])
