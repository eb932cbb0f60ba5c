"""Residual streams as particle groups (`particlize.adapters.conv_stream`): the channels coupled across
residual adds, found, gated at every reader, and pruned together (masked ≡ pruned, exact costs, save/load)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import particlize as pz
from particlize.adapters.conv import ConvAdapter
from particlize.adapters.conv_stream import StreamGate
from particlize.allocate import named_scorer
from particlize.models.vision import resnet_small
from strategies import removal_sets
from test_conv import _flops, _params, make_case


class StreamNet(nn.Module):
    """A stream with a depthwise conv on a branch, a conv that reads and writes it, a scaled branch, max
    pooling and a Linear reading the flattened 4×4 map (of a 16×16 input) (``width = 16`` per channel)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pw = nn.Conv2d(6, 6, 1)
        self.c1 = nn.Conv2d(6, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        x = x + self.pw(F.relu(self.dw(x)))
        x = F.relu(x + self.c2(F.relu(self.c1(x))) * 0.5)
        return self.fc(torch.flatten(F.max_pool2d(x, 4), 1))


class CatNet(nn.Module):
    """A residual sum that is then concatenated: its channels mix with others, so no stream group."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = y + self.b(y)
        return self.c(torch.cat([y, y.flip(1)], 1)).mean((2, 3))


CASES = {
    "resnet-small": (lambda: resnet_small(num_classes=10), (1, 28, 28)),
    "streamnet": (StreamNet, (3, 16, 16)),
}
_CACHE: dict[str, tuple[nn.Module, torch.Tensor, pz.ParticleMap]] = {}


def _case(name: str) -> tuple[nn.Module, torch.Tensor, pz.ParticleMap]:
    if name not in _CACHE:
        _CACHE[name] = make_case(*CASES[name], n=3)
    return _CACHE[name]


def test_resnet_small_streams() -> None:
    model, x, pm = _case("resnet-small")
    streams = {g.name: g for g in pm.groups if g.name.endswith(".stream")}
    assert {n: g.size for n, g in streams.items()} == {
        "stem.0.stream": 8, "layers.1.0.downsample.0.stream": 16, "layers.2.0.downsample.0.stream": 32,
    }
    g = streams["stem.0.stream"]
    assert g.kind == "channel" and g.gate == StreamGate(("layers.0.0.conv1", "layers.1.0.downsample.0", "layers.1.0.conv1"))
    assert {s.name for s in g.writers} == {
        f"{m}.{t}" for m in ("stem.1", "layers.0.0.bn2") for t in ("weight", "bias", "running_mean", "running_var")
    } | {"stem.0.weight", "layers.0.0.conv2.weight"}
    assert streams["layers.2.0.downsample.0.stream"].readers == (pz.Slice("fc.weight", 1),)
    assert pm.unplaced == []
    # every conv / linear weight is now in some group: the whole network is prunable
    sliced = {s.name for g in pm.groups for s in (*g.writers, *g.readers)}
    assert {n for n, _ in model.named_parameters() if n.endswith("weight")} <= sliced | {"fc.weight"}


def test_streams_off_leaves_the_coupled_convs() -> None:
    model, x, _ = _case("resnet-small")
    res = ConvAdapter(streams=False).build(model, seq_len=1, example_inputs=x[:1])
    assert not any(g.name.endswith(".stream") for g in res.groups)
    assert set(res.unplaced) == {"stem.0", "layers.0.0.conv2", "layers.1.0.downsample.0", "layers.1.0.conv2",
                                 "layers.2.0.downsample.0", "layers.2.0.conv2"}


def test_streamnet_groups() -> None:
    _, _, pm = _case("streamnet")
    g = pm["stem.stream"]
    assert g.size == 6 and g.gate == StreamGate(("pw", "c1", "fc"))
    assert pz.Slice("fc.weight", 1, 16) in g.readers and pz.Slice("pw.weight", 1) in g.readers
    assert {"stem.weight", "stem.bias", "pw.weight", "pw.bias", "c2.weight", "dw.weight", "bn.running_mean"} <= {
        s.name for s in g.writers
    }
    assert {g.name for g in pm.groups} == {"stem.stream", "c1.channels"}


def test_concatenated_stream_stays_unplaced() -> None:
    res = ConvAdapter().build(CatNet(), seq_len=1, example_inputs=torch.zeros(1, 3, 8, 8))
    assert res.groups == [] and res.unplaced == ["a", "b", "c"]


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_masked_equals_pruned(name: str, data, tmp_path_factory) -> None:
    model, x, pm = _case(name)
    remove = data.draw(removal_sets(pm))
    stream = next(g for g in pm.groups if g.name.endswith(".stream"))
    remove.setdefault(stream.name, sorted(data.draw(st.sets(st.integers(0, stream.size - 1), min_size=1,
                                                           max_size=stream.size - 1))))
    with torch.no_grad():
        with pm.ablate(remove):
            masked = model(x)
        small = pm.prune(remove).eval()
        pruned = small(x)
    assert (masked - pruned).abs().max().item() <= 1e-5
    assert _params(small) == pm.cost(remove).params
    assert _flops(model, x[:1]) - _flops(small, x[:1]) == pytest.approx(
        pm.cost().flops - pm.cost(remove).flops, rel=1e-6, abs=1e-6)
    folder = pz.save(small, tmp_path_factory.mktemp("saved") / "m")
    again = pz.load(folder, base=StreamNet()) if name == "streamnet" else pz.load(folder)
    with torch.no_grad():
        assert (again(x) - pruned).abs().max().item() <= 1e-6


def test_per_example_gates_and_capture() -> None:
    model, x, pm = _case("streamnet")
    mask = torch.zeros(3, 6)
    mask[0, 1] = mask[2, 4] = 1
    with torch.no_grad():
        with pm.ablate({"stem.stream": mask}):
            both = model(x)
        for b, i in ((0, 1), (1, None), (2, 4)):
            with pm.ablate({"stem.stream": [i]} if i is not None else {}):
                assert torch.allclose(both[b], model(x)[b], atol=1e-6)
    seen: list[tuple[int, tuple[int, ...]]] = []
    with torch.no_grad(), pm.capture(["stem.stream"], lambda _g, i, a: seen.append((i, tuple(a.shape)))):
        model(x[:1])
    assert seen == [(0, (1, 6, 16, 16)), (1, (1, 6, 16, 16)), (2, (1, 96))]


@pytest.mark.parametrize("scorer", ["taylor", "fisher"])
def test_gradient_scorers_cover_streams(scorer: str) -> None:
    """Gate gradients sum over all readers of a stream: finite, non-negative scores, not all zero (a channel
    the last ReLU silences for every example may score 0)."""
    model, x, pm = _case("resnet-small")
    scores = named_scorer(scorer)(pm, [(x, torch.tensor([0, 1, 2]))], {"channel"})
    for name in ("stem.0.stream", "layers.2.0.downsample.0.stream"):
        assert scores[name].shape == (pm[name].size,)
        assert torch.isfinite(scores[name]).all() and (scores[name] >= 0).all() and scores[name].sum() > 0
