"""``taylor-norm`` (first order with the next norm exact) and the adaptive exact top-k built on it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from torch import nn

import particlize as pz
from particlize.particles import InputGate, ParticleGroup, ParticleMap, Slice


class NormBlock(nn.Module):
    """x → fc1 → GELU → fc2 (the gated reader) → (× scale) + x → norm → 2 logits: after the norm
    everything is linear, so with ``logit_diff`` the norm-exact estimate is the exact ablation effect."""

    def __init__(self, norm: nn.Module, d: int = 8, hidden: int = 12, scale: float = 1.0):
        super().__init__()
        self.fc1, self.fc2, self.norm, self.head, self.scale = nn.Linear(d, hidden), nn.Linear(hidden, d), norm, nn.Linear(d, 2), scale

    def forward(self, x):
        return self.head(self.norm(x + self.scale * self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


def _toy(norm: nn.Module, width: int, scale: float = 1.0) -> tuple[ParticleMap, list]:
    torch.manual_seed(0)
    model = NormBlock(norm, scale=scale).eval()
    with torch.no_grad():
        model.fc2.weight.mul_(4.0)  # large removals: the norm's nonlinearity matters
    n = 12 // width
    group = ParticleGroup("ffn", "neuron", n, 0, InputGate("fc2"), (Slice("fc1.weight", 0, width), Slice("fc1.bias", 0, width)),
                          (Slice("fc2.weight", 1, width),))
    pm = ParticleMap(model, [group], tensor_flops={}, flops_unit="per token")
    x = torch.randn(2, 5, 6, 8)
    data = [(x[i], torch.randint(0, 2, (5,))) for i in range(2)]
    return pm, data


def _per_example(pm, data, method, **kw):
    df = pz.analyze(pm, data, method, by="example", table=False, **kw)
    return torch.tensor(df.sort_values(["example", "index"]).score.to_numpy())


@pytest.mark.parametrize("norm", [nn.LayerNorm(8), nn.RMSNorm(8, eps=1e-6), nn.LayerNorm(8, elementwise_affine=False)],
                         ids=["layernorm", "rmsnorm", "layernorm-no-affine"])
@pytest.mark.parametrize("width", [1, 4], ids=["rank1-closed-form", "rank4-explicit"])
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_exact_when_everything_after_the_norm_is_linear(norm, width, mode):
    if isinstance(norm, nn.RMSNorm) or norm.weight is not None:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
    pm, data = _toy(norm, width)
    exact = _per_example(pm, data, "ablation", metric="logit_diff", mode=mode)
    est = _per_example(pm, data, "taylor-norm", metric="logit_diff", mode=mode)
    first = _per_example(pm, data, "taylor", metric="logit_diff", mode=mode)
    torch.testing.assert_close(est, exact, atol=2e-5, rtol=1e-4)
    assert (first - exact).abs().max() > 1e-3  # the plain first-order estimate is not exact here


def test_a_scaled_path_to_the_norm_keeps_the_first_order_score():
    """The reader's output reaches the norm scaled (as under adaLN gates): no correction is applied."""
    pm, data = _toy(nn.LayerNorm(8), 1, scale=2.0)
    est = _per_example(pm, data, "taylor-norm", metric="logit_diff")
    first = _per_example(pm, data, "taylor", metric="logit_diff")
    torch.testing.assert_close(est, first, atol=1e-7, rtol=0)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama-gqa"])
def test_real_families_move_estimates_towards_exact(family):
    """On post-LN (BERT) and pre-LN (GPT-2, Llama/RMSNorm) models the correction is applied and does not
    make the neuron estimates worse overall than plain first order."""
    from test_analysis import _data

    model, data = _data(family)
    pm = pz.decompose(model)
    neurons = [g.name for g in pm.select("neuron")]
    exact = pz.analyze(pm, data, "ablation", groups=neurons, table=False).score.to_numpy()
    est = pz.analyze(pm, data, "taylor-norm", groups=neurons, table=False).score.to_numpy()
    first = pz.analyze(pm, data, "taylor", groups=neurons, table=False).score.to_numpy()
    assert not (est == first).all()
    assert abs(est - exact).sum() <= abs(first - exact).sum() * 1.05


def test_adaptive_top_k_equals_the_exact_top_k():
    from test_analysis import _data

    model, data = _data("bert")
    pm = pz.decompose(model)
    exact = pz.analyze(pm, data, "ablation", groups=["head", "neuron"], table=False)
    for k in (5, 20):
        top = pz.top_particles(pm, data, k=k, groups=["head", "neuron"])
        want = exact.nlargest(k, "score")
        assert set(zip(top.group, top["index"])) == set(zip(want.group, want["index"]))
        assert top.attrs["particles"] == len(exact) and top.attrs["verified"] <= len(exact)
    # the error bars shrink with the confidence: fewer particles ablated
    wide = pz.top_particles(pm, data, k=5, groups=["head", "neuron"], confidence=1.0)
    narrow = pz.top_particles(pm, data, k=5, groups=["head", "neuron"], confidence=0.5)
    assert narrow.attrs["verified"] <= wide.attrs["verified"]
    with pytest.raises(pz.ParticlizeError, match="confidence"):
        pz.top_particles(pm, data, k=5, confidence=0.0)


def test_top_particles_scores_the_model_in_eval_mode_and_restores_its_mode():
    from test_analysis import _data

    model, data = _data("bert")
    pm = pz.decompose(model)
    want = pz.top_particles(pm, data, k=5, groups=["head", "neuron"])
    model.train()  # dropout on: scores would be random if top_particles did not switch it off
    got = pz.top_particles(pm, data, k=5, groups=["head", "neuron"])
    assert model.training
    assert list(zip(got.group, got["index"])) == list(zip(want.group, want["index"]))
    torch.testing.assert_close(torch.tensor(got.score.to_numpy()), torch.tensor(want.score.to_numpy()))


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["layernorm", "rmsnorm", "plain"]), d=st.integers(2, 12), n=st.integers(1, 4),
       w=st.integers(1, 3), scale=st.floats(0.01, 30.0), seed=st.integers(0, 2**16))
def test_low_rank_scales_give_the_norm_of_the_changed_input(kind, d, n, w, scale, seed):
    """N(z + C_j W_j) = r (N(z) − β) + s γ ⊙ (C_j W̄_j) + β, for every token and particle."""
    from particlize.analysis._norms import low_rank_scales, norm_params

    g = torch.Generator().manual_seed(seed)
    N = {"layernorm": nn.LayerNorm(d), "rmsnorm": nn.RMSNorm(d, eps=1e-6), "plain": nn.LayerNorm(d, elementwise_affine=False)}[kind].double()
    if N.weight is not None:
        with torch.no_grad():
            N.weight.copy_(torch.randn(d, generator=g, dtype=torch.float64))
            if getattr(N, "bias", None) is not None:
                N.bias.copy_(torch.randn(d, generator=g, dtype=torch.float64))
    z = torch.randn(5, d, generator=g, dtype=torch.float64)
    C = scale * torch.randn(5, n, w, generator=g, dtype=torch.float64)
    W = torch.randn(n, w, d, generator=g, dtype=torch.float64)
    centred, eps, gamma, beta = norm_params(N)
    r, s = low_rank_scales(centred, eps, z, C, W)
    Wc = W - W.mean(-1, keepdim=True) if centred else W
    beta = beta if beta is not None else torch.zeros(d, dtype=torch.float64)
    gamma = gamma if gamma is not None else torch.ones(d, dtype=torch.float64)
    with torch.no_grad():
        want = N(z[:, None] + torch.einsum("tnw,nwd->tnd", C, W))
        got = r[..., None] * (N(z) - beta)[:, None] + s[..., None] * gamma * torch.einsum("tnw,nwd->tnd", C, Wc) + beta
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)


def test_optimistic_values_are_infinite_until_something_calibrates_them():
    """Before any non-exhaustive particle is verified every unverified one must stay in play, a zero-width
    one included; afterwards the bound is estimate + c × width with a finite c."""
    import pandas as pd

    from particlize.analysis.validate import _optimistic

    open_ = pd.DataFrame({"group": ["g", "g"], "est": [0.1, 0.2], "width": [0.0, 0.5]})
    empty = pd.DataFrame({"group": [], "est": [], "width": [], "exact": []})
    assert _optimistic(empty, open_, 0.99).tolist() == [float("inf"), float("inf")]
    seen = pd.DataFrame({"group": ["g"], "est": [0.3], "width": [1.0], "exact": [0.5]})  # c = 0.2
    assert _optimistic(seen, open_, 0.99).tolist() == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_perturbation_sizes_are_the_squared_change_of_the_reader_output(mode, monkeypatch):
    """Σ_t ‖δ_j‖² per example equals the reader's output change measured with the particle gated off,
    padded positions left out — for FFN neurons (width 1) and attention heads (width > 1)."""
    from test_analysis import _data

    from particlize.analysis._common import as_batches, call
    from particlize.analysis.taylor_norm import _reader_weight, perturbation_sizes

    model, data = _data("bert")
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 3:] = 0
    data = [({**x, "attention_mask": mask}, y) for x, y in data]
    batches = as_batches(data)
    pm = pz.decompose(model)
    names = [pm.select("neuron")[0].name, pm.select("head")[1].name]
    sizes = perturbation_sizes(pm, batches, mode=mode, groups=names)
    patches = pm.mean_activations(names, [b.inputs for b in batches]) if mode == "mean" else {}
    for name in names:
        reader = model.get_submodule(_reader_weight(pm, name)[0])
        n = pm[name].size
        for j in (0, n - 1):
            outs: list[torch.Tensor] = []
            h = reader.register_forward_hook(lambda m, a, o: outs.append(o.detach().double()))
            gate = torch.ones(n)
            gate[j] = 0.0
            try:
                for b in batches:
                    with torch.no_grad():
                        call(model, b.inputs)
                        with pm.gates({name: gate}, {name: patches[name]} if patches else None):
                            call(model, b.inputs)
            finally:
                h.remove()
            want = torch.cat([((ab - cl).pow(2).sum(-1) * b.inputs["attention_mask"]).sum(1)
                              for cl, ab, b in zip(outs[::2], outs[1::2], batches)])
            torch.testing.assert_close(sizes[name][:, j], want, rtol=1e-4, atol=1e-8)
    assert perturbation_sizes(pm, batches, mode="resample", groups=names) == {}
    import importlib

    monkeypatch.setattr(importlib.import_module("particlize.analysis.taylor_norm"), "_CHUNK_ELEMENTS", 1)  # one particle at a time: the same sizes
    chunked = perturbation_sizes(pm, batches, mode=mode, groups=names)
    for name in names:
        torch.testing.assert_close(chunked[name], sizes[name], rtol=1e-12, atol=0)


def test_optimistic_values_take_the_tighter_error_bar():
    """Each scale gets its own calibrated c; the bound uses the smaller bar; an unknown (NaN) size leaves
    the width's bar."""
    import pandas as pd

    from particlize.analysis.validate import _optimistic

    seen = pd.DataFrame({"group": ["g"], "est": [0.3], "width": [1.0], "size": [0.1], "exact": [0.5]})  # c 0.2 and 2.0
    open_ = pd.DataFrame({"group": ["g"] * 3, "est": [0.0, 0.0, 0.0], "width": [1.0, 1.0, 1.0],
                          "size": [0.01, 1.0, float("nan")]})
    assert _optimistic(seen, open_, 0.99).tolist() == pytest.approx([0.02, 0.2, 0.2])


_STREAM_GAP = ("residual-stream channel groups (conv adapter): the exact top-5 holds stem.0.stream 0, which the "
               "taylor-norm screen's error bars leave unverified; to fix in analysis/validate.py (few, large particles)")


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "vit",
                                  pytest.param("resnet", marks=pytest.mark.xfail(strict=True, reason=_STREAM_GAP)),
                                  "lstm"])
def test_adaptive_top_k_on_other_families(case):
    """Decoder LMs (token targets), a ViT, conv channels (no linear reader: no size scale) and recurrent
    hidden units (gated through weights): the adaptive top-k is the exact top-k, in order."""
    from test_analysis import CASES

    model, data = CASES[case]()
    pm = pz.decompose(model)
    exact = pz.analyze(pm, data, "ablation", table=False)
    top = pz.top_particles(pm, data, k=5)
    want = exact.nlargest(5, "score")
    assert list(zip(top.group, top["index"])) == list(zip(want.group, want["index"]))
    torch.testing.assert_close(torch.tensor(top.score.to_numpy()), torch.tensor(want.score.to_numpy()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["zero", "mean", "resample"])
def test_adaptive_top_k_on_padded_batches(mode):
    """Padded batches are split by length once for all rounds (not for ``resample``, which patches from
    another example of the same batch): the same top-k and scores as the exact sweep of the batches as given."""
    from test_analysis import _padded

    model, batches = _padded("bert", False)
    pm = pz.decompose(model)
    exact = pz.analyze(pm, batches, "ablation", mode=mode, table=False)
    top = pz.top_particles(pm, batches, k=6, mode=mode, screen="magnitude" if mode == "resample" else "taylor-norm")
    want = exact.nlargest(6, "score")
    assert list(zip(top.group, top["index"])) == list(zip(want.group, want["index"]))
    torch.testing.assert_close(torch.tensor(top.score.to_numpy()), torch.tensor(want.score.to_numpy()), atol=1e-5, rtol=0)
