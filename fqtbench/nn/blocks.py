"""Building blocks of fqtbench models, written so that the integer engine can export them.

Each block's forward quantizes exactly where the exported integer model rounds: a residual block
quantizes its input once and feeds the same codes to its first conv and to its shortcut.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import QConv2d, QLinear, quant_layers


class Normalize(nn.Module):
    """Integer pixels in [0, pixel_max] -> (x / pixel_max - mean) / std, per channel."""

    def __init__(self, pixel_max: int, mean, std):
        super().__init__()
        self.pixel_max = int(pixel_max)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x.float() / self.pixel_max - self.mean) / self.std


class ConvBNReLU(nn.Module):
    """conv -> batch norm -> ReLU (-> optional 2x2 max-pool)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, pool: bool = False):
        super().__init__()
        self.conv = QConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.pool = pool

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pool else x


class BasicBlock(nn.Module):
    """He et al.'s basic residual block. Shortcut 'A': stride-2 subsample + zero channels (CIFAR
    ResNets, no parameters); 'B': 1x1 conv + batch norm."""

    def __init__(self, cin: int, cout: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = QConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = QConv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.cin, self.cout = cin, cout
        self.shortcut_kind = shortcut if (stride != 1 or cin != cout) else "identity"
        if self.shortcut_kind == "B":
            self.down_conv = QConv2d(cin, cout, 1, stride=stride, bias=False)
            self.down_bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        xq, qa = self.conv1.quantize_input(x)  # one quantization shared by conv1 and the shortcut
        h = F.relu(self.bn1(self.conv1(xq, qa)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.shortcut(xq, qa))

    def shortcut(self, x: Tensor, qa) -> Tensor:
        if self.shortcut_kind == "identity":
            return x
        if self.shortcut_kind == "A":
            pad = self.cout - self.cin
            x = x[:, :, :: self.stride, :: self.stride]
            return F.pad(x, (0, 0, 0, 0, pad // 2, pad - pad // 2))
        return self.down_bn(self.down_conv(x, qa))


class GlobalAvgPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(2, 3))


class QNet(nn.Module):
    """A classifier: `normalize` (pixels -> float), `body` (a sequence of blocks), `head` (QLinear)."""

    def __init__(self, normalize: Normalize, body: nn.Sequential, head: QLinear, name: str):
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.head = head
        self.arch = name
        mark_positions(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.normalize(x)))


def mark_positions(model: nn.Module) -> None:
    """The first quantized layer reads the signed normalised input; first and last get their own policy."""
    layers = [m for _, m in quant_layers(model)]
    for m in layers:
        m.position, m.input_signed = "middle", False
    if layers:
        layers[0].position, layers[0].input_signed = "first", True
        layers[-1].position = "last"
