"""The adapter registry: adapters by name, a declared order that import order cannot change, forcing one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

import particlize as pz
from particlize.adapters import AdapterResult, adapters, get_adapter, register, unregister
from particlize.models.recurrent import RNNClassifier
from particlize.models.sora import SoraConfig, SpacetimeDiT
from particlize.models.vision import ResNet, SimpleCNN

BUILTIN_ORDER = ["moe", "diffusers-video", "recommender", "dit", "transformers", "recurrent", "conv"]  # moe: moefy's experts, first
TESTS = Path(__file__).parent


def _dit() -> nn.Module:
    torch.manual_seed(0)
    return SpacetimeDiT(SoraConfig(frames=4, size=16, patch=(1, 4, 4), dim=32, depth=2, heads=4, mlp_ratio=2.0)).eval()


def _rnn() -> nn.Module:
    torch.manual_seed(0)
    return RNNClassifier(input_size=5, hidden_size=12, num_layers=2, num_classes=4, cell="lstm").eval()


def _hf(family: str) -> nn.Module:
    pytest.importorskip("transformers")
    from conftest import hf_model

    return hf_model(family)[0]


def _diffusers(family: str) -> nn.Module:
    pytest.importorskip("diffusers")
    import test_diffusers

    return test_diffusers._cogvideox() if family == "cogvideox" else test_diffusers._latte()


MODELS = {
    "simple-cnn": (lambda: SimpleCNN(), "conv"),
    "resnet": (lambda: ResNet(), "conv"),
    "dit": (_dit, "dit"),
    "lstm": (_rnn, "recurrent"),
    "bert": (lambda: _hf("bert"), "transformers"),
    "vit": (lambda: _hf("vit"), "transformers"),
    "cogvideox": (lambda: _diffusers("cogvideox"), "diffusers-video"),
    "latte": (lambda: _diffusers("latte"), "diffusers-video"),
}


def _signature(pm: pz.ParticleMap) -> list[tuple]:
    return [(g.name, g.kind, g.size, g.layer, g.writers, g.readers, g.owned, g.flops_ctx) for g in pm]


@pytest.fixture
def registry():
    """Undo whatever a test registers."""
    before = {a.name: a for a in adapters()}
    yield
    for a in adapters():
        if a.name not in before:
            unregister(a.name)


# ---- the declared order -------------------------------------------------------------------------


def test_builtin_order_is_declared_and_names_resolve():
    assert [a.name for a in adapters()] == BUILTIN_ORDER
    for name in BUILTIN_ORDER:
        assert get_adapter(name).name == name


@pytest.mark.parametrize("case", list(MODELS))
def test_forcing_the_adapter_auto_detection_picks_gives_the_same_map(case):
    build, name = MODELS[case]
    model = build()
    auto = pz.decompose(model)
    forced = pz.decompose(model, adapter=name)
    assert auto.adapter == forced.adapter == name
    assert _signature(forced) == _signature(auto)
    assert forced.tensor_flops == auto.tensor_flops and forced.flops_unit == auto.flops_unit
    pd.testing.assert_frame_equal(forced.table(), auto.table())


@pytest.mark.parametrize(
    ("case", "name", "claimed"),
    [("mlp", "conv", None), ("simple-cnn", "dit", "conv"), ("vit", "conv", "transformers"), ("bert", "recurrent", "transformers"),
     ("dit", "transformers", "dit"), ("lstm", "conv", "recurrent")],
)
def test_forcing_an_adapter_that_does_not_match_says_which_do(case, name, claimed):
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)) if case == "mlp" else MODELS[case][0]()
    hint = f"adapters that match it: {claimed}" if claimed else "no adapter matches it"
    with pytest.raises(pz.UnsupportedModelError, match=f"adapter '{name}' does not match .*{hint}"):
        pz.decompose(model, adapter=name)


def test_unknown_name_lists_the_registered_adapters():
    msg = "no adapter is registered as 'cnn'; registered adapters: " + ", ".join(BUILTIN_ORDER)
    with pytest.raises(pz.UnsupportedModelError, match=msg):
        pz.decompose(SimpleCNN(), adapter="cnn")
    with pytest.raises(pz.UnsupportedModelError, match="registered adapters: moe, diffusers-video"):
        get_adapter("cnn")
    with pytest.raises(pz.UnsupportedModelError, match="no adapter is registered as 'cnn'"):
        unregister("cnn")


class _MeanPooled(nn.Module):
    """A one-layer LSTM read through a mean over time: the recurrent adapter matches but cannot place it."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(5, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out.mean(1))


@pytest.mark.filterwarnings("ignore:recurrent adapter")
def test_forced_adapter_that_places_nothing_errors():
    with pytest.raises(pz.UnsupportedModelError, match="adapter 'recurrent' matches _MeanPooled but places none"):
        pz.decompose(_MeanPooled(), adapter="recurrent")
    with pytest.raises(pz.UnsupportedModelError, match="no adapter can place the modules of _MeanPooled"):
        pz.decompose(_MeanPooled())


# ---- user adapters ------------------------------------------------------------------------------


class _HeadsOnly:
    """Only the attention heads of what the transformers adapter finds."""

    def __init__(self, name: str = "heads-only") -> None:
        self.name = name

    def matches(self, model: nn.Module) -> bool:
        return get_adapter("transformers").matches(model)

    def build(self, model: nn.Module, *, seq_len: int, example_inputs=None) -> AdapterResult:
        res = get_adapter("transformers").build(model, seq_len=seq_len, example_inputs=example_inputs)
        res.groups = [g for g in res.groups if g.kind == "head"]
        return res


def test_a_user_adapter_is_tried_at_its_priority(registry):
    bert = _hf("bert")
    register(_HeadsOnly(), priority=35)  # between dit (40) and transformers (30)
    assert [a.name for a in adapters()] == ["moe", "diffusers-video", "recommender", "dit", "heads-only", "transformers", "recurrent", "conv"]
    pm = pz.decompose(bert)
    assert pm.adapter == "heads-only" and {g.kind for g in pm} == {"head"} and len(list(pm)) == 3
    assert pz.decompose(_dit()).adapter == "dit"  # above it: untouched
    unregister("heads-only")
    assert [a.name for a in adapters()] == BUILTIN_ORDER
    assert pz.decompose(bert).adapter == "transformers"


def test_a_user_adapter_below_the_builtins_is_used_only_when_forced(registry):
    bert = _hf("bert")
    register(_HeadsOnly(), priority=0)
    assert [a.name for a in adapters()][-1] == "heads-only"
    assert pz.decompose(bert).adapter == "transformers"
    forced = pz.decompose(bert, adapter="heads-only")
    auto = pz.decompose(bert)
    assert forced.adapter == "heads-only"
    assert _signature(forced) == [s for s in _signature(auto) if s[1] == "head"]


def test_ties_are_ordered_by_name_and_a_name_registers_once(registry):
    register(_HeadsOnly("zz-heads"), priority=30)
    register(_HeadsOnly("aa-heads"), priority=30)
    register(_HeadsOnly("aa-heads"), priority=30)  # again: replaces, never duplicates
    names = [a.name for a in adapters()]
    assert names[names.index("dit") + 1 : names.index("recurrent")] == ["aa-heads", "transformers", "zz-heads"]


def test_register_refuses_what_is_not_an_adapter():
    class Nameless:
        def matches(self, model):
            return True

    with pytest.raises(pz.ParticlizeError, match="has no name"):
        register(Nameless())
    with pytest.raises(pz.ParticlizeError, match="needs `matches"):
        register(type("Half", (), {"name": "half"})())
    assert [a.name for a in adapters()] == BUILTIN_ORDER


def test_conv_yields_to_transformers_through_the_registry(registry):
    vit = _hf("vit")
    assert not get_adapter("conv").matches(vit)
    transformers = unregister("transformers")
    try:
        assert get_adapter("conv").matches(vit)  # no longer claimed by a registered adapter
    finally:
        register(transformers, priority=30)
    assert [a.name for a in adapters()] == BUILTIN_ORDER


# ---- import order cannot change the choice --------------------------------------------------------

_CHOOSE = """
import json, sys, warnings
sys.path.insert(0, {tests!r})
import importlib
for mod in {order!r}:
    importlib.import_module("particlize.adapters." + mod)
import particlize as pz
from particlize.adapters import adapters
from test_adapter_registry import MODELS
out = {{"order": [a.name for a in adapters()]}}
for case in {cases!r}:
    out[case] = pz.decompose(MODELS[case][0]()).adapter
print(json.dumps(out))
"""


def test_import_order_does_not_change_which_adapter_claims_a_model():
    pytest.importorskip("transformers")
    pytest.importorskip("diffusers")
    cases = ["vit", "simple-cnn", "dit", "cogvideox", "lstm"]
    modules = ["conv", "transformers_hf", "recurrent", "dit", "diffusers_video"]
    results = []
    for order in (modules, modules[::-1]):
        code = _CHOOSE.format(tests=str(TESTS), order=order, cases=cases)
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
        assert run.returncode == 0, run.stderr[-2000:]
        results.append(json.loads(run.stdout.strip().splitlines()[-1]))
    expected = {"order": BUILTIN_ORDER, **{c: MODELS[c][1] for c in cases}}
    assert results == [expected, expected]
