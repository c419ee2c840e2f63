"""Small models for the digits track."""

from __future__ import annotations

from torch import nn

from ..nn import ConvBNReLU, Normalize, QLinear, QNet


def cnn_s(info) -> QNet:
    """conv3x3(16)-BN-ReLU-maxpool, conv3x3(32)-BN-ReLU-maxpool, linear."""
    h, w = info.image_size
    body = nn.Sequential(
        ConvBNReLU(info.in_channels, 16, 3, pool=True),
        ConvBNReLU(16, 32, 3, pool=True),
        nn.Flatten(),
    )
    head = QLinear(32 * (h // 4) * (w // 4), info.num_classes)
    return QNet(Normalize(info.pixel_max, info.mean, info.std), body, head, "cnn-s")


def mlp(info, hidden: list[int] | tuple[int, ...] = (128,)) -> QNet:
    """Flattened pixels -> [linear-ReLU] x len(hidden) -> linear."""
    h, w = info.image_size
    dims = [info.in_channels * h * w, *[int(x) for x in hidden]]
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [QLinear(a, b), nn.ReLU()]
    return QNet(Normalize(info.pixel_max, info.mean, info.std), nn.Sequential(*layers), QLinear(dims[-1], info.num_classes), "mlp")
