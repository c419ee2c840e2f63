"""Model zoo: every model is built from fqtbench.nn layers so every method attaches to it unchanged.

A :class:`ModelSpec` is what the ``fqtbench.models`` entry-point group registers: a name, a
version, a one-line description and ``build(info, **options)``, where ``info`` is the dataset's
:class:`~fqtbench.data.DataInfo` (channels, classes, normalisation) and ``options`` come from
``model.options`` in the config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import ConfigError
from .cnn import cnn_s, mlp
from .resnet import resnet18, resnet_cifar


@dataclass(frozen=True)
class ModelSpec:
    name: str
    version: str
    description: str
    factory: Callable[..., nn.Module]

    def build(self, info: Any, **options: Any) -> nn.Module:
        params = inspect.signature(self.factory).parameters
        allowed = [p for p in params if p != "info"]
        for key in options:
            if key not in allowed:
                raise ConfigError(f"model.options.{key}: unknown option for model '{self.name}'; allowed: {', '.join(allowed) or '(none)'}")
        return self.factory(info, **options)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MLP_SPEC = ModelSpec("mlp", "1", "MLP on flattened pixels (hidden sizes configurable)", mlp)
CNN_S_SPEC = ModelSpec("cnn-s", "1", "two 3x3 convs (16, 32 ch) with BN, ReLU, max-pool, then a linear layer: the digits model", cnn_s)
RESNET20_SPEC = ModelSpec("resnet20", "1", "He et al. CIFAR ResNet-20 (0.27 M parameters)", lambda info, shortcut="A": resnet_cifar(info, 20, shortcut))
RESNET32_SPEC = ModelSpec("resnet32", "1", "He et al. CIFAR ResNet-32 (0.46 M parameters)", lambda info, shortcut="A": resnet_cifar(info, 32, shortcut))
RESNET56_SPEC = ModelSpec("resnet56", "1", "He et al. CIFAR ResNet-56 (0.85 M parameters)", lambda info, shortcut="A": resnet_cifar(info, 56, shortcut))
RESNET18_SPEC = ModelSpec("resnet18", "1", "ImageNet ResNet-18 (11.7 M parameters at 1000 classes)", resnet18)

__all__ = ["ModelSpec", "count_parameters", "MLP_SPEC", "CNN_S_SPEC", "RESNET20_SPEC", "RESNET32_SPEC", "RESNET56_SPEC", "RESNET18_SPEC"]
