"""The grouped inference path of `ExpertFFN` (tokens laid out per expert, one batched matmul for all experts)
against the dense-masked reference: any shape, any routing (balanced, every token on one expert, no token),
plain and gated FFNs, with and without biases, and the same gradients when training through it."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import particlize as pz
from particlize.surgery import ExpertFFN, _experts
from particlize.surgery._experts import block_layout


def _ffn(d: int, experts: int, size: int, active: int, *, gated: bool, bias: bool, seed: int = 0) -> ExpertFFN:
    torch.manual_seed(seed)
    names = {"up": "up_proj", "down": "down_proj", **({"gate": "gate_proj"} if gated else {})}
    f = ExpertFFN(d, d + 3, experts, size, active, act=nn.GELU(), names=names, gated=gated, up_bias=bias,
                  down_bias=bias, router_hidden=0)
    return f.eval()


@settings(max_examples=25, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 6), size=st.integers(1, 5), data=st.data(),
       gated=st.booleans(), bias=st.booleans(), skew=st.booleans(), small_blocks=st.booleans(),
       how=st.sampled_from([None, "blocks", "segments"]))
def test_grouped_equals_masked(tokens, experts, size, data, gated, bias, skew, small_blocks, how):
    active = data.draw(st.integers(1, experts))
    f = _ffn(7, experts, size, active, gated=gated, bias=bias)
    if skew:  # one expert far ahead of the others: every token picks it (one full expert, the rest sparse)
        with torch.no_grad():
            f.router.out.bias[0] = 1e3
    x = torch.randn(2, tokens, 7)
    # small_blocks: blocks of a few rows cost nothing extra, so busy experts are cut into several blocks
    with torch.no_grad(), mock.patch.object(_experts, "MIN_ROWS", 1 if small_blocks else _experts.MIN_ROWS), \
            mock.patch.object(_experts, "BLOCK_COST", 0 if small_blocks else _experts.BLOCK_COST):
        fast, ref = f.grouped(x, how), f.masked(x)
    assert fast.shape == ref.shape == (2, tokens, 10)
    assert torch.allclose(fast, ref, atol=1e-5, rtol=0)


def test_grouped_runs_only_the_chosen_experts():
    """Zeroing an expert's weights changes exactly the tokens that routed to it."""
    f = _ffn(8, 4, 3, 1, gated=False, bias=False)
    x = torch.randn(30, 8)
    with torch.no_grad():
        chosen = f.router(x).argmax(-1)
        before = f.grouped(x)
        f.linear("up").weight[3:6] = 0  # expert 1
        after = f.grouped(x)
    changed = (before - after).abs().amax(-1) > 0
    assert torch.equal(changed, chosen == 1) and changed.any()


@pytest.mark.parametrize("how", ["blocks", "segments"])
def test_training_through_the_grouped_path_gives_the_masked_gradients(how):
    grads = []
    for path in ("grouped", "masked"):
        f = _ffn(6, 4, 3, 2, gated=True, bias=True).train()
        x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(1))
        (f.grouped(x, how) if path == "grouped" else f.masked(x)).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in f.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) >= {"up_proj.weight", "gate_proj.weight", "down_proj.weight"}
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_block_layout_places_every_pair_once_inside_its_experts_blocks():
    counts = torch.tensor([300, 0, 20, 8, 40])  # one busy expert: one block per expert would pad 5 x 300 rows
    experts = torch.repeat_interleave(torch.arange(5), counts)
    pos, which, rows = block_layout(experts, counts)
    assert which is not None and rows < 300  # the busy expert is cut into blocks, their weights gathered
    assert len(set(pos.tolist())) == len(pos) and int(pos.max()) < len(which) * rows
    assert torch.equal(which[pos // rows], experts)  # each pair sits in a block of its own expert
    assert len(which) * rows < 5 * 300
    pos, which, rows = block_layout(experts[:68].clone(), torch.tensor([68, 0, 0, 0, 0]))
    assert which is not None and torch.equal(which, torch.zeros(len(which), dtype=torch.long))
    even = torch.tensor([40, 38, 40, 39])
    pos, which, rows = block_layout(torch.repeat_interleave(torch.arange(4), even), even)
    assert which is None and rows == 40 and torch.equal(pos // rows, torch.repeat_interleave(torch.arange(4), even))


def test_inference_cache_follows_weight_changes_and_bad_how_is_refused():
    f = _ffn(8, 4, 3, 2, gated=False, bias=True)
    x = torch.randn(40, 8)
    with torch.no_grad():
        f.grouped(x)  # fills the cache of the down projection
        f.linear("down").weight.mul_(2)  # an in-place change (an optimizer step, load_state_dict)
        for how in ("blocks", "segments"):
            assert torch.allclose(f.grouped(x, how), f.masked(x), atol=1e-5)
    with pytest.raises(pz.ParticlizeError, match="must be 'blocks' or 'segments'"):
        f.grouped(x, "dense")
