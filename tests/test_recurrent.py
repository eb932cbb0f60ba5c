"""The recurrent adapter: LSTM/GRU hidden units, weight-mask gates, surgery to StackedRNN, save/load."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import pack_padded_sequence

import particlize as pz
from conftest import assert_masked_equals_pruned
from particlize.adapters.recurrent import StackedRNN
from particlize.models.recurrent import RNNClassifier, SpeakerEncoder

H, LAYERS, IN = 12, 3, 5
ATOL = 1e-5


def _classifier(cell: str, seed: int = 0) -> RNNClassifier:
    torch.manual_seed(seed)
    return RNNClassifier(input_size=IN, hidden_size=H, num_layers=LAYERS, num_classes=4, cell=cell).eval()


def _x(batch: int = 3, steps: int = 6, size: int = IN, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, steps, size, generator=torch.Generator().manual_seed(seed))


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _no_parametrizations(model: nn.Module) -> bool:
    return not any(parametrize.is_parametrized(m) for m in model.modules())


def _removal(draw_sets: list[set[int]], prefix: str = "rnn") -> dict[str, list[int]]:
    return {f"{prefix}.l{l}.units": sorted(s) for l, s in enumerate(draw_sets) if s}


def _check_invariant(pm: pz.ParticleMap, remove: dict, x: torch.Tensor) -> nn.Module:
    """ablate(remove) == prune(remove), params == cost; returns the pruned model."""
    small = assert_masked_equals_pruned(pm, remove, x, ATOL)
    assert _no_parametrizations(pm.model)
    assert _n_params(small) == pm.cost(remove).params
    return small


# --------------------------------------------------------------------------------------------------
# Decomposition


@pytest.mark.parametrize("cell,gates", [("lstm", 4), ("gru", 3)])
def test_groups_writers_readers(cell: str, gates: int) -> None:
    pm = pz.decompose(_classifier(cell))
    assert pm.adapter == "recurrent" and pm.flops_unit == "per time step"
    assert [g.name for g in pm] == [f"rnn.l{l}.units" for l in range(LAYERS)]
    for l, g in enumerate(pm):
        assert (g.kind, g.size, g.layer, g.per_example) == ("unit", H, l, False)
        assert {(s.name, s.dim, s.repeat, s.stride) for s in g.writers} == {
            (f"rnn.{k}_l{l}", 0, gates, H) for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        }
        nxt = f"rnn.weight_ih_l{l + 1}" if l + 1 < LAYERS else "head.weight"
        assert {(s.name, s.dim) for s in g.readers} == {(f"rnn.weight_hh_l{l}", 1), (nxt, 1)}
    # 2 FLOPs per element of the recurrent weights and the head, per time step
    weights = [p for n, p in pm.model.named_parameters() if "weight" in n]
    assert pm.cost().flops == pytest.approx(2.0 * sum(p.numel() for p in weights))
    assert pm.cost().params == _n_params(pm.model)


def test_speaker_encoder_groups() -> None:
    pm = pz.decompose(SpeakerEncoder())
    assert [(g.name, g.size) for g in pm] == [(f"lstm.l{l}.units", 256) for l in range(3)]
    assert {s.name for s in pm["lstm.l2.units"].readers} == {"lstm.weight_hh_l2", "linear.weight"}


# --------------------------------------------------------------------------------------------------
# The invariant: masked == pruned, save/load, cost


def _layer_sets(size: int = H, layers: int = LAYERS) -> st.SearchStrategy[list[set[int]]]:
    return st.lists(st.sets(st.integers(0, size - 1), max_size=size - 1), min_size=layers, max_size=layers)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@settings(max_examples=10, deadline=None)
@given(sets=_layer_sets())
def test_ablate_equals_prune_and_roundtrips(cell: str, sets: list[set[int]], tmp_path_factory) -> None:
    model = _classifier(cell)
    pm = pz.decompose(model)
    remove = _removal(sets)
    x = _x()
    with torch.no_grad():
        y0 = model(x)
    small = _check_invariant(pm, remove, x)
    widths = [H - len(s) for s in sets]
    if len(set(widths)) == 1:  # equal widths: the original module, resized
        assert isinstance(small.rnn, nn.RNNBase) and small.rnn.hidden_size == widths[0]
    else:
        assert isinstance(small.rnn, StackedRNN) and list(small.rnn.hidden_sizes) == widths
    assert small.head.in_features == widths[-1]
    folder = pz.save(small, tmp_path_factory.mktemp("saved") / "m")
    again = pz.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(again(x), small(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)  # the original is untouched
    assert type(again.rnn) is type(small.rnn)


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), fracs=st.lists(st.floats(0.0, 0.9), min_size=3, max_size=3))
def test_speaker_encoder_invariant(seed: int, fracs: list[float]) -> None:
    torch.manual_seed(0)
    model = SpeakerEncoder().eval()
    pm = pz.decompose(model)
    g = torch.Generator().manual_seed(seed)
    remove = {f"lstm.l{l}.units": torch.randperm(256, generator=g)[: int(f * 256)] for l, f in enumerate(fracs)}
    x = torch.rand(2, 8, 40, generator=g)
    small = _check_invariant(pm, remove, x)
    with torch.no_grad():
        torch.testing.assert_close(small(x).norm(dim=1), torch.ones(2))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@settings(max_examples=4, deadline=None)
@given(first=_layer_sets(), second=_layer_sets(H // 2, LAYERS))
def test_two_rounds(cell: str, first: list[set[int]], second: list[set[int]], tmp_path_factory) -> None:
    model = _classifier(cell)
    x = _x()
    small = _check_invariant(pz.decompose(model), _removal(first), x)
    pm2 = pz.decompose(small)
    assert [g.size for g in pm2] == [H - len(s) for s in first]
    # indices refer to the pruned model; keep at least one unit per layer
    remove2 = {n: [i for i in r if i < pm2[n].size - 1] for n, r in _removal(second).items()}
    smaller = _check_invariant(pm2, remove2, x)
    again = pz.load(pz.save(smaller, tmp_path_factory.mktemp("two") / "m"))
    with torch.no_grad():
        torch.testing.assert_close(again(x), smaller(x), rtol=0, atol=0)


def test_even_then_uneven_rounds() -> None:
    model = _classifier("lstm")
    x = _x()
    small = _check_invariant(pz.decompose(model), {f"rnn.l{l}.units": [l, 7] for l in range(LAYERS)}, x)
    assert type(small.rnn) is nn.LSTM and small.rnn.hidden_size == H - 2
    smaller = _check_invariant(pz.decompose(small), {"rnn.l1.units": [0, 1, 2]}, x)
    assert isinstance(smaller.rnn, StackedRNN) and smaller.rnn.hidden_sizes == (10, 7, 10)


class _Variant(nn.Module):
    """Other shapes of recurrent model: nn.RNN, no biases, sequence-first, heads on h_n[-1] / c_n[-1]."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "rnn_relu_seq_first":
            self.rnn = nn.RNN(IN, 9, 3, nonlinearity="relu")
        elif kind == "gru_no_bias_hn":
            self.rnn = nn.GRU(IN, 9, 3, bias=False, batch_first=True)
        else:  # "lstm_cn_dropout"
            self.rnn = nn.LSTM(IN, 9, 3, batch_first=True, dropout=0.3)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(9, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rnn_relu_seq_first":
            out, _ = self.rnn(x.transpose(0, 1), None)
            return self.head(out[-1])
        if self.kind == "gru_no_bias_hn":
            _, h = self.rnn(x)
            return self.head(h[-1])
        _, (h, c) = self.rnn(x)
        return self.head(self.drop(c[-1][:, None, :].select(1, 0)))


@pytest.mark.parametrize("kind", ["rnn_relu_seq_first", "gru_no_bias_hn", "lstm_cn_dropout"])
def test_variants(kind: str) -> None:
    torch.manual_seed(0)
    model = _Variant(kind).eval()
    pm = pz.decompose(model, recipe={"kind": "callable", "target": "x:y", "kwargs": {}})
    assert [g.name for g in pm] == [f"rnn.l{l}.units" for l in range(3)]
    remove = {"rnn.l0.units": [0, 8], "rnn.l1.units": [1, 2, 3], "rnn.l2.units": [4]}
    small = _check_invariant(pm, remove, _x())
    assert isinstance(small.rnn, StackedRNN) and small.rnn.hidden_sizes == (7, 6, 8)
    _check_invariant(pz.decompose(small, recipe=pm.recipe), {"rnn.l2.units": [0, 1]}, _x())


# --------------------------------------------------------------------------------------------------
# Gates: shared, zero mode only; cleaned up


def test_per_example_gates_raise() -> None:
    pm = pz.decompose(_classifier("lstm"))
    mask = torch.zeros(3, H)
    mask[0, 1] = 1
    with pytest.raises(pz.GateError, match="per-example"):
        with pm.ablate({"rnn.l0.units": [2], "rnn.l1.units": mask}):
            pass
    assert _no_parametrizations(pm.model)


def test_mean_and_resample_modes_raise() -> None:
    model = _classifier("gru")
    pm = pz.decompose(model)
    with pytest.raises(pz.ParticlizeError, match="mode='zero'"):
        with pm.ablate({"rnn.l0.units": [1]}, mode="mean", data=[_x()]):
            pass
    with pytest.raises(pz.ParticlizeError, match="mode='zero'"):
        with pm.ablate({"rnn.l0.units": [1]}, mode="resample", data=_x()):
            pass
    assert _no_parametrizations(model)


def test_gates_removed_after_exception() -> None:
    model = _classifier("lstm")
    pm = pz.decompose(model)
    x = _x()
    with torch.no_grad():
        y0 = model(x)
        with pytest.raises(RuntimeError, match="boom"):
            with pm.ablate({"rnn.l0.units": [0, 1], "rnn.l2.units": [3]}) as gated:
                assert parametrize.is_parametrized(model.rnn) and parametrize.is_parametrized(model.head)
                assert not torch.allclose(gated(x), y0)
                raise RuntimeError("boom")
        assert _no_parametrizations(model)
        assert type(model.rnn) is nn.LSTM and type(model.head) is nn.Linear
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
        with pm.ablate({"rnn.l1.units": [4]}):
            pass
        assert _no_parametrizations(model)
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# StackedRNN


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_stacked_rnn_matches_multilayer_module(mode: str) -> None:
    torch.manual_seed(0)
    rnn = (nn.LSTM if mode == "LSTM" else nn.GRU)(IN, 6, 3, batch_first=True).eval()
    st_ = StackedRNN.from_rnn(rnn).eval()
    assert [n for n, _ in st_.named_parameters()][:4] == [
        "layers.0.weight_ih_l0", "layers.0.weight_hh_l0", "layers.0.bias_ih_l0", "layers.0.bias_hh_l0",
    ]
    x = _x()
    with torch.no_grad():
        out, state = rnn(x)
        out2, state2 = st_(x)
        torch.testing.assert_close(out2, out)
        hs = [state[0], state[1]] if mode == "LSTM" else [state]
        hs2 = [state2[0], state2[1]] if mode == "LSTM" else [state2]
        for h, h2 in zip(hs, hs2):
            assert isinstance(h2, tuple) and len(h2) == 3
            torch.testing.assert_close(torch.stack(h2), h)
        # initial state: a stacked [L, B, H] tensor or a tuple of per-layer [B, H] tensors
        h0 = torch.randn(3, 3, 6)
        hx = (h0, torch.randn(3, 3, 6)) if mode == "LSTM" else h0
        ref_out, _ = rnn(x, hx)
        torch.testing.assert_close(st_(x, hx)[0], ref_out)
        per_layer = (tuple(hx[0]), tuple(hx[1])) if mode == "LSTM" else tuple(h0)
        torch.testing.assert_close(st_(x, per_layer)[0], ref_out)
        # unbatched input: per-layer states of shape [H_l]
        out_u, state_u = st_(x[0])
        torch.testing.assert_close(out_u, rnn(x[0])[0])
        h_u = state_u[0] if mode == "LSTM" else state_u
        assert [t.shape for t in h_u] == [(6,)] * 3
        # packed input
        packed = pack_padded_sequence(x, torch.tensor([6, 4, 2]), batch_first=True, enforce_sorted=False)
        p_ref, s_ref = rnn(packed)
        p_got, s_got = st_(packed)
        torch.testing.assert_close(p_got.data, p_ref.data)
        h_ref = s_ref[0] if mode == "LSTM" else s_ref
        h_got = s_got[0] if mode == "LSTM" else s_got
        torch.testing.assert_close(torch.stack(h_got), h_ref)
    st_.train()
    st_.dropout = 0.5
    assert st_(x)[0].shape == (3, 6, 6)


def test_stacked_rnn_uneven_and_hidden_conventions() -> None:
    torch.manual_seed(0)
    st_ = StackedRNN("LSTM", IN, [7, 5, 3], batch_first=True)
    out, (h, c) = st_(_x())
    assert out.shape == (3, 6, 3) and st_.hidden_size == 3 and st_.num_layers == 3
    assert [t.shape for t in h] == [(3, 7), (3, 5), (3, 3)] == [t.shape for t in c]
    torch.testing.assert_close(h[-1], out[:, -1])  # both idioms read the last layer
    with pytest.raises(ValueError, match="layers"):
        st_(_x(), ([torch.zeros(3, 7)], [torch.zeros(3, 7)]))


# --------------------------------------------------------------------------------------------------
# What the adapter refuses or leaves out


class _MeanPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(IN, 8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out.mean(1))


class _ReadsFirstLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(IN, 8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(x)
        return self.head(h[-1].contiguous()) + h[0].sum(-1, keepdim=True)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(IN, 8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:  # data-dependent control flow: fx cannot trace it
            x = x * 0
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.filterwarnings("ignore:recurrent adapter")
@pytest.mark.parametrize(
    "cls,kept,why",
    [(_MeanPool, ["rnn.l0.units"], "mean"), (_ReadsFirstLayer, ["lstm.l1.units"], "layer 0"),
     (_Untraceable, ["rnn.l0.units"], "traced")],
)
def test_unconfirmed_layers_are_left_out(cls: type[nn.Module], kept: list[str], why: str) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    with pytest.warns(UserWarning, match=why):
        pm = pz.decompose(model, recipe={"kind": "callable", "target": "x:y", "kwargs": {}})
    assert [g.name for g in pm] == kept
    _check_invariant(pm, {kept[0]: [1, 4, 6]}, _x())


def test_unsupported_modules() -> None:
    class Bi(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(IN, 8, 2, batch_first=True, bidirectional=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    with pytest.raises(pz.UnsupportedModelError, match="bidirectional"):
        pz.decompose(Bi())
    bi = Bi()
    bi.rnn = nn.LSTM(IN, 8, 2, batch_first=True, proj_size=4)
    with pytest.raises(pz.UnsupportedModelError, match="proj_size"):
        pz.decompose(bi)
    with pytest.raises(pz.UnsupportedModelError, match="bare recurrent module"):
        pz.decompose(nn.GRU(IN, 8, 2))


def test_no_warning_for_supported_models() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pz.decompose(_classifier("lstm"))
        pz.decompose(SpeakerEncoder())


# --------------------------------------------------------------------------------------------------
# The real pretrained Resemblyzer encoder


@pytest.mark.slow
def test_resemblyzer_half_units(tmp_path) -> None:
    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("resemblyzer is not installed")
    from particlize.models.recurrent import load_resemblyzer_encoder

    model = load_resemblyzer_encoder()
    pm = pz.decompose(model)
    g = torch.Generator().manual_seed(0)
    remove = {grp.name: torch.randperm(grp.size, generator=g)[: grp.size // 2] for grp in pm}
    mels = torch.rand(3, 160, 40, generator=g)
    small = _check_invariant(pm, remove, mels)
    assert type(small.lstm) is nn.LSTM and small.lstm.hidden_size == 128
    with torch.no_grad():
        e = small(mels)
        torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
        assert (e >= 0).all()
        torch.testing.assert_close(pz.load(pz.save(small, tmp_path / "enc"))(mels), e, rtol=0, atol=0)
