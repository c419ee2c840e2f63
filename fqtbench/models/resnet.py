"""ResNets: the CIFAR family of He et al. (depth 6n+2) and ImageNet ResNet-18."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..nn import BasicBlock, ConvBNReLU, GlobalAvgPool, Normalize, QLinear, QNet


def _init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():  # zero-init the last BN of each residual branch: identity at start
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return model


def resnet_cifar(info, depth: int, shortcut: str = "A") -> QNet:
    """16-32-64 channels, n = (depth - 2) / 6 basic blocks per stage, global average pool, linear."""
    if (depth - 2) % 6:
        raise ConfigError(f"CIFAR ResNet depth {depth} is not 6n+2")
    if shortcut not in ("A", "B"):
        raise ConfigError(f"model.options.shortcut={shortcut!r}: must be 'A' (parameter-free) or 'B' (1x1 conv)")
    n = (depth - 2) // 6
    layers: list[nn.Module] = [ConvBNReLU(info.in_channels, 16, 3)]
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            layers.append(BasicBlock(cin, cout, stride, shortcut))
            cin = cout
    layers += [GlobalAvgPool()]
    model = QNet(Normalize(info.pixel_max, info.mean, info.std), nn.Sequential(*layers), QLinear(64, info.num_classes), f"resnet{depth}")
    return _init(model)


class _Stem(nn.Module):
    """ImageNet stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool."""

    def __init__(self, cin: int):
        super().__init__()
        self.cbr = ConvBNReLU(cin, 64, 7, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(self.cbr(x), 3, 2, 1)


def resnet18(info, shortcut: str = "B") -> QNet:
    """torchvision-shaped ResNet-18 (basic blocks 2-2-2-2, 64..512 channels, 1x1 conv shortcuts)."""
    layers: list[nn.Module] = [_Stem(info.in_channels)]
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512)):
        for i in range(2):
            stride = 2 if (stage > 0 and i == 0) else 1
            layers.append(BasicBlock(cin, cout, stride, shortcut))
            cin = cout
    layers += [GlobalAvgPool()]
    model = QNet(Normalize(info.pixel_max, info.mean, info.std), nn.Sequential(*layers), QLinear(512, info.num_classes), "resnet18")
    return _init(model)
