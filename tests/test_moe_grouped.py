"""The grouped inference path of `ExpertFFN` (tokens laid out per expert, one batched matmul for all experts)
against the dense-masked reference: any shape, any routing (balanced, every token on one expert, no token),
plain and gated FFNs, with and without biases, and the same gradients when training through it."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from particlize.surgery import ExpertFFN


def _ffn(d: int, experts: int, size: int, active: int, *, gated: bool, bias: bool, seed: int = 0) -> ExpertFFN:
    torch.manual_seed(seed)
    names = {"up": "up_proj", "down": "down_proj", **({"gate": "gate_proj"} if gated else {})}
    f = ExpertFFN(d, d + 3, experts, size, active, act=nn.GELU(), names=names, gated=gated, up_bias=bias,
                  down_bias=bias, router_hidden=0)
    return f.eval()


@settings(max_examples=40, deadline=None)
@given(tokens=st.integers(0, 40), experts=st.integers(1, 6), size=st.integers(1, 5), data=st.data(),
       gated=st.booleans(), bias=st.booleans(), skew=st.booleans())
def test_grouped_equals_masked(tokens, experts, size, data, gated, bias, skew):
    active = data.draw(st.integers(1, experts))
    f = _ffn(7, experts, size, active, gated=gated, bias=bias)
    if skew:  # one expert far ahead of the others: every token picks it (one full expert, the rest sparse)
        with torch.no_grad():
            f.router.out.bias[0] = 1e3
    x = torch.randn(2, tokens, 7)
    with torch.no_grad():
        fast, ref = f.grouped(x), f.masked(x)
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


def test_training_through_the_grouped_path_gives_the_masked_gradients():
    grads = []
    for path in ("grouped", "masked"):
        f = _ffn(6, 4, 3, 2, gated=True, bias=True).train()
        x = torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(1))
        getattr(f, path)(x).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in f.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) >= {"up_proj.weight", "gate_proj.weight", "down_proj.weight"}
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n
