"""The CNN adapter: channel and block groups of SimpleCNN, ResNet and MobileNetV2, and the invariant
(zero gates on S == the physically pruned model without S) with exact costs and save/load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import particlize as pz
from particlize.adapters.conv import ConvAdapter
from particlize.models.vision import MobileNetV2, ResNet, SimpleCNN
from particlize.record import unit_cost
from strategies import removal_sets

CASES = {
    "simple": (lambda: SimpleCNN(num_classes=5, in_channels=3, widths=(8, 16)), (3, 16, 16)),
    "resnet": (lambda: ResNet(num_classes=5, in_channels=3, widths=(8, 16), blocks_per_stage=(2, 2)), (3, 16, 16)),
    "mobilenet": (lambda: MobileNetV2(num_classes=5, width_mult=0.25), (3, 32, 32)),
}


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms and O(1) classifier weights, so the test sees
    every slice."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / m.in_features**0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


_CACHE: dict[str, tuple[nn.Module, torch.Tensor, pz.ParticleMap]] = {}


def make_case(factory, shape: tuple[int, ...], n: int = 2) -> tuple[nn.Module, torch.Tensor, pz.ParticleMap]:
    """A seeded, randomised model from ``factory``, ``n`` inputs of ``shape`` and its particle map."""
    torch.manual_seed(0)
    model = _randomize(factory())
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(1))
    return model, x, pz.decompose(model, example_inputs=x[:1])


def _case(name: str) -> tuple[nn.Module, torch.Tensor, pz.ParticleMap]:
    if name not in _CACHE:
        _CACHE[name] = make_case(*CASES[name])
    return _CACHE[name]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _flops(model: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops()


_DENSE: dict[str, int] = {}


def _dense_flops(name: str) -> int:
    if name not in _DENSE:
        model, x, pm = _case(name)
        _DENSE[name] = _flops(model, x[:1])
        assert _DENSE[name] == pytest.approx(pm.cost().flops, rel=1e-9)
    return _DENSE[name]


def _channels(pm: pz.ParticleMap) -> dict[str, int]:
    return {g.name: g.size for g in pm.select("channel")}


def _blocks(pm: pz.ParticleMap) -> dict[str, tuple[str, ...]]:
    return {g.name: g.gate.modules for g in pm.select("block")}


# ---- the groups found ---------------------------------------------------------------------------


def test_simple_cnn_groups() -> None:
    _, _, pm = _case("simple")
    assert pm.adapter == "conv"
    assert _channels(pm) == {"features.0.channels": 8, "features.4.channels": 16}
    assert _blocks(pm) == {}
    assert pm["features.0.channels"].gate == pz.InputGate("features.4", dim=1)
    assert pm["features.4.channels"].gate == pz.InputGate("fc", dim=1)
    assert [g.layer for g in pm.select("channel")] == [0, 1]
    assert {s.name for s in pm["features.0.channels"].writers} == {
        "features.0.weight", "features.1.weight", "features.1.bias", "features.1.running_mean", "features.1.running_var",
    }
    assert pm.flops_unit == "per sample at 16×16"
    assert pm.recipe == pm.model.particlize_recipe


def test_resnet_groups() -> None:
    _, _, pm = _case("resnet")
    convs = {f"layers.{i}.{j}.conv1.channels": w for i, w in enumerate((8, 16)) for j in range(2)}
    # the stem, conv2 and downsample channels are coupled across the residual stream: one group per stage
    assert _channels(pm) == {**convs, "stem.0.stream": 8, "layers.1.0.downsample.0.stream": 16}
    assert pm["stem.0.stream"].gate.modules == (
        "layers.0.0.conv1", "layers.0.1.conv1", "layers.1.0.downsample.0", "layers.1.0.conv1"
    )
    # only identity-shortcut blocks; the downsampling block layers.1.0 is not one, a stage is not one
    assert _blocks(pm) == {"layers.0.blocks": ("layers.0.0", "layers.0.1"), "layers.1.blocks": ("layers.1.1",)}
    g = pm["layers.0.0.conv1.channels"]
    assert g.gate == pz.InputGate("layers.0.0.conv2", dim=1) and g.scope == "layers.0.0."
    owned = pm["layers.1.blocks"].owned[0]
    assert "layers.1.1.conv1.weight" in owned and "layers.1.1.bn1.running_var" in owned


def test_mobilenet_groups() -> None:
    model, _, pm = _case("mobilenet")
    res = tuple(f"features.{i}" for i, b in enumerate(model.features) if getattr(b, "use_res_connect", False))
    assert _blocks(pm) == {"features.blocks": res} and len(res) == 11
    expected = {f"features.{i}.conv.0.0.channels" for i in range(2, 18)}
    expected |= {"features.17.conv.2.channels", "features.18.0.channels"}
    expected |= {f"features.{i}.stream" for i in ("0.0", "2.conv.2", "4.conv.2", "7.conv.2", "11.conv.2", "14.conv.2")}
    assert set(_channels(pm)) == expected
    g = pm["features.5.conv.0.0.channels"]  # expand conv -> BN -> ReLU6 -> depthwise -> BN -> ReLU6 -> project
    assert g.gate == pz.InputGate("features.5.conv.2", dim=1)
    assert "features.5.conv.1.0.weight" in {s.name for s in g.writers}
    assert pm["features.18.0.channels"].gate == pz.InputGate("classifier.1", dim=1)
    assert pm.flops_unit == "per sample at 32×32"


# ---- the invariant, costs, save/load (property-based) --------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_ablate_equals_prune(name: str, data, tmp_path_factory) -> None:
    model, x, pm = _case(name)
    remove = data.draw(removal_sets(pm))
    with torch.no_grad():
        with pm.ablate(remove):
            ablated = model(x)
        small = pm.prune(remove)
        pruned = small.eval()(x)
    assert (ablated - pruned).abs().max().item() <= 1e-5
    assert _params(small) == pm.cost(remove).params
    dense_f, small_f = _dense_flops(name), _flops(small, x[:1])
    assert dense_f - small_f == pytest.approx(pm.cost().flops - pm.cost(remove).flops, rel=1e-6, abs=1e-6)
    folder = pz.save(small, tmp_path_factory.mktemp("saved") / "m")
    again = pz.load(folder)
    with torch.no_grad():
        assert (again(x) - pruned).abs().max().item() <= 1e-6
    assert _params(again) == _params(small)


def test_prune_keeps_original_and_records_plan() -> None:
    model, x, pm = _case("resnet")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = pm.prune({"layers.0.blocks": [1], "layers.1.1.conv1.channels": [0, 5]})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(small.layers[0]) == 1 and small.layers[1][1].conv1.out_channels == 14
    assert small.layers[1][1].bn1.num_features == 14 and small.layers[1][1].conv2.in_channels == 14
    # a second round on the pruned model: the plan grows, names follow the renumbered containers
    pm2 = pz.decompose(small, example_inputs=x[:1])
    assert _blocks(pm2) == {"layers.0.blocks": ("layers.0.0",), "layers.1.blocks": ("layers.1.1",)}
    smaller = pm2.prune({"layers.1.1.conv1.channels": [0]})
    assert [s.group for s in pz.plan.model_plan(smaller)] == ["layers.1.1.conv1.channels", "layers.0.blocks", "layers.1.1.conv1.channels"]
    with torch.no_grad(), pm2.ablate({"layers.1.1.conv1.channels": [0]}):
        y = small(x)
    assert (smaller.eval()(x) - y).abs().max().item() <= 1e-5
    # block indices are positions in the group's particle list, not in the container: index 0 of
    # layers.1.blocks is layers.1.1; the downsampling layers.1.0 stays
    small = pm.prune({"layers.1.blocks": [0]})
    assert len(small.layers[1]) == 1 and small.layers[1][0].downsample is not None
    assert torch.equal(small.layers[1][0].conv1.weight, model.layers[1][0].conv1.weight)


class Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1), nn.BatchNorm2d(2 * c), nn.SiLU(),
                                  nn.Conv2d(2 * c, c, 3, padding=1), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


def test_root_sequential_blocks_and_emptied_container(tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomize(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Res(4), Res(4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    ))
    x = torch.randn(2, 3, 16, 16)
    pm = pz.decompose(model, example_inputs=x[:1])
    assert _blocks(pm) == {"blocks": ("3", "4")}
    # the stem conv and both blocks' last convs write one residual stream
    assert _channels(pm) == {"0.stream": 4, "3.body.0.channels": 8, "4.body.0.channels": 8}
    assert pm["3.body.0.channels"].scope == "3."
    for remove in ({"blocks": [0], "4.body.0.channels": [1, 2]}, {"blocks": [0, 1]}):
        with torch.no_grad():
            with pm.ablate(remove):
                ya = model(x)
            small = pm.prune(remove)
            assert (small(x) - ya).abs().max().item() <= 1e-5
        assert len(small) == 8 - len(remove["blocks"]) and _params(small) == pm.cost(remove).params
    # ResNet: both blocks of stage 0 removed leaves an empty stage, which is the identity
    model, x, pm = _case("resnet")
    remove = {"layers.0.blocks": [0, 1], "layers.1.1.conv1.channels": [3]}
    with torch.no_grad():
        with pm.ablate(remove):
            ya = model(x)
        small = pm.prune(remove)
        assert len(small.layers[0]) == 0 and (small(x) - ya).abs().max().item() <= 1e-5
        again = pz.load(pz.save(small, tmp_path / "m"))
        assert (again(x) - ya).abs().max().item() <= 1e-5


def test_depthwise_channels_prune() -> None:
    model, x, pm = _case("mobilenet")
    name = "features.4.conv.0.0.channels"
    remove = {name: list(range(0, 48, 3)), "features.blocks": [0, 4, 10]}
    small = pm.prune(remove)
    dw = small.features[3].conv[1][0]  # features.1 was removed: features.4 is now features.3
    assert dw.groups == dw.in_channels == dw.out_channels == 32 and tuple(dw.weight.shape[:2]) == (32, 1)
    with torch.no_grad(), pm.ablate(remove):
        y = model(x)
    assert (small.eval()(x) - y).abs().max().item() <= 1e-5


# ---- gates: per-example, mean mode ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet", "mobilenet"])
def test_per_example_gates(name: str) -> None:
    model, x, pm = _case(name)
    chan, block = pm.select("channel")[0], pm.select("block")[0]
    gen = torch.Generator().manual_seed(3)
    masks = {
        chan.name: (torch.rand(len(x), chan.size, generator=gen) < 0.4).float(),
        block.name: (torch.rand(len(x), block.size, generator=gen) < 0.5).float(),
    }
    assert chan.per_example and block.per_example
    with torch.no_grad():
        with pm.ablate(masks):
            rows = model(x)
        for b in range(len(x)):
            shared = {k: v[b].nonzero().reshape(-1).tolist() for k, v in masks.items()}
            with pm.ablate(shared):
                ref = model(x)
            assert (rows[b] - ref[b]).abs().max().item() <= 1e-5


def test_mean_mode_ablation() -> None:
    model, x, pm = _case("resnet")
    remove = {"layers.0.0.conv1.channels": [0, 1], "layers.0.blocks": [1]}
    with torch.no_grad():
        with pm.ablate(remove, mode="mean", data=[x]):
            y_mean = model(x)
        with pm.ablate(remove):
            y_zero = model(x)
        y = model(x)
    assert torch.isfinite(y_mean).all() and y_mean.shape == y.shape
    assert not torch.allclose(y_mean, y_zero)
    # by hand: the clean per-channel means (over examples and positions) of conv2's input and of block 1's update
    conv2, block = model.layers[0][0].conv2, model.layers[0][1]
    seen = {}
    hooks = [conv2.register_forward_pre_hook(lambda m, a: seen.__setitem__("c", a[0].mean((0, 2, 3)))),
             block.register_forward_hook(lambda m, a, o: seen.__setitem__("b", (o - a[0]).mean((0, 2, 3))))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    means = pm.mean_activations(["layers.0.0.conv1.channels"], [x])["layers.0.0.conv1.channels"][0]
    assert means.shape == (8,)
    torch.testing.assert_close(means, seen["c"], atol=1e-6, rtol=1e-6)

    def patch_channels(m, a):
        a = a[0].clone()
        a[:, :2] = seen["c"][:2, None, None]
        return (a,)

    hooks = [conv2.register_forward_pre_hook(patch_channels),
             block.register_forward_hook(lambda m, a, o: a[0] + seen["b"][None, :, None, None])]
    try:
        with torch.no_grad():
            want = model(x)
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(y_mean, want, atol=1e-5, rtol=0)


# ---- table and costs -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_table(name: str) -> None:
    model, _, pm = _case(name)
    df = pm.table()
    assert len(df) == sum(g.size for g in pm.groups)
    for g in pm.groups:
        rows = df[df.group == g.name].sort_values("index")
        assert list(rows["index"]) == list(range(g.size))
        params, flops = unit_cost(pm, g, pm.seq_len)
        assert list(rows.params) == params
        # removing one particle alone saves exactly its unit cost
        full, one = pm.cost(), pm.cost({g.name: [0]})
        assert full.params - one.params == params[0]
        assert full.flops - one.flops == pytest.approx(flops[0], rel=1e-9)
        if g.kind == "block":
            block = model.get_submodule(g.gate.modules[0])
            assert params[0] == _params(block)
    assert pm.cost().params == _params(model)



@pytest.mark.parametrize(
    "name", ["simple", "resnet", "mobilenet"]
)
def test_table_with_activation_stats(name: str) -> None:
    _, x, pm = _case(name)
    stats = pm.table(data=[x])
    assert len(stats) == sum(g.size for g in pm.groups)
    assert stats.act_mean_abs.notna().all() and (stats.act_std >= 0).all()


# ---- other models ------------------------------------------------------------------------------------


class FunctionalCNN(nn.Module):
    """Functional activations, a depthwise chain, a flattened C×H×W map read by a Linear, a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.b = nn.Conv2d(6, 5, 1)
        self.c = nn.Conv2d(5, 4, 3, padding=1, stride=2)
        self.d = nn.Conv2d(5, 2, 1)  # concatenated with c: coupled
        self.e = nn.Conv2d(6, 3, 1)
        self.fc = nn.Linear(3 * 8 * 8, 7)

    def forward(self, x):
        x = self.dw(F.relu(self.bn_a(self.a(x))))
        x = F.gelu(self.b(x)) * 2.0
        y = torch.cat([self.c(x), F.max_pool2d(self.d(x), 2)], dim=1)
        y = F.relu(self.e(y))
        return self.fc(y.view(y.size(0), -1))


def test_functional_cnn_and_flattened_linear() -> None:
    torch.manual_seed(0)
    model = _randomize(FunctionalCNN())
    x = torch.randn(2, 3, 16, 16)
    pm = pz.decompose(model, example_inputs=x[:1])
    assert _channels(pm) == {"a.channels": 6, "e.channels": 3}  # b feeds two convs; c, d reach cat
    assert pm["e.channels"].readers == (pz.Slice("fc.weight", 1, 64),)
    assert {s.name for s in pm["a.channels"].writers} >= {"a.bias", "dw.weight", "dw.bias", "bn_a.running_var"}
    remove = {"a.channels": [1, 4], "e.channels": [2]}
    with torch.no_grad():
        with pm.ablate(remove):
            ya = model(x)
        small = pm.prune(remove)
        assert (small(x) - ya).abs().max().item() <= 1e-5
    assert small.fc.in_features == 2 * 64 and small.dw.groups == 4
    assert _params(small) == pm.cost(remove).params
    assert _flops(model, x[:1]) - _flops(small, x[:1]) == pytest.approx(
        pm.cost().flops - pm.cost(remove).flops, rel=1e-6
    )


def test_unplaced_and_transposed_flops() -> None:
    model, x, _ = _case("resnet")
    res = ConvAdapter(streams=False).build(model, seq_len=1, example_inputs=x[:1])
    assert set(res.unplaced) == {"stem.0", "layers.1.0.downsample.0"} | {
        f"layers.{i}.{j}.conv2" for i in range(2) for j in range(2)
    }
    assert ConvAdapter().build(model, seq_len=1, example_inputs=x[:1]).unplaced == []
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ConvTranspose2d(4, 2, 4, 2))
    z = torch.zeros(1, 3, 20, 20)
    pm = pz.decompose(net, example_inputs=z)
    assert pm.cost().flops == _flops(net, z)
    assert _flops(net, z) - _flops(pm.prune({"0.channels": [1, 2, 3]}), z) == pm.cost().flops - pm.cost(
        {"0.channels": [1, 2, 3]}
    ).flops


def test_default_example_inputs_and_train_mode_untouched() -> None:
    model = SimpleCNN(num_classes=3, in_channels=2, widths=(4, 8)).train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    pm = pz.decompose(model)
    assert pm.flops_unit == "per sample at 32×32"
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(stats[k], v) for k, v in model.state_dict().items())
    assert pm.cost().flops == pytest.approx(_flops(model.eval(), torch.zeros(1, 2, 32, 32)), rel=1e-9)


def test_default_size_falls_back_for_fixed_flatten() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 2))
    pm = pz.decompose(model)
    assert pm.flops_unit == "per sample at 28×28"
    assert pm["0.channels"].readers == (pz.Slice("3.weight", 1, 26 * 26),)


@pytest.mark.parametrize(
    "model",
    [
        nn.Sequential(nn.Conv2d(3, 3, 3, groups=3)),
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)),  # channels reach the output
    ],
    ids=["depthwise_only", "mlp", "conv_to_output"],
)
def test_unsupported(model: nn.Module) -> None:
    with pytest.raises(pz.UnsupportedModelError):
        pz.decompose(model)


def test_matches_is_cheap_and_selective() -> None:
    adapter = ConvAdapter()
    assert adapter.matches(SimpleCNN())
    assert not adapter.matches(nn.Sequential(nn.Linear(2, 2)))


def test_not_for_hf_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4,
    )
    vit = transformers.ViTModel(cfg)
    assert not ConvAdapter().matches(vit)


def test_untraceable_model_error() -> None:
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(pz.UnsupportedModelError, match="symbolic_trace"):
        ConvAdapter().build(Branchy(), seq_len=1)


def test_decompose_is_deterministic() -> None:
    model, x, pm = _case("simple")
    twin = copy.deepcopy(model)
    pm2 = pz.decompose(twin, example_inputs=x[:1])
    assert [g.name for g in pm2] == [g.name for g in pm]
