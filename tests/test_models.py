"""Model zoo: shapes, parameter counts, and that every model is built of fqtbench.nn layers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fqtbench import registry
from fqtbench.models import count_parameters
from fqtbench.nn import QConv2d, QLinear, quant_layers

CIFAR = SimpleNamespace(image_size=(32, 32), in_channels=3, num_classes=10, pixel_max=255, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
DIGITS = SimpleNamespace(image_size=(8, 8), in_channels=1, num_classes=10, pixel_max=16, mean=(0.3,), std=(0.4,))
IMAGENET = SimpleNamespace(image_size=(224, 224), in_channels=3, num_classes=1000, pixel_max=255, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))

# He et al. 2016 (Table 6): ResNet-20 0.27M, -32 0.46M, -56 0.85M; torchvision ResNet-18: 11,689,512
EXPECTED = {"resnet20": 269_722, "resnet32": 464_154, "resnet56": 853_018, "resnet18": 11_689_512, "cnn-s": 6_138}  # cnn-s on 8x8 digits


@pytest.mark.parametrize("name", ["mlp", "cnn-s", "resnet20", "resnet32", "resnet56", "resnet18"])
def test_forward_shape_and_layers(name):
    info = {"mlp": DIGITS, "cnn-s": DIGITS, "resnet18": IMAGENET}.get(name, CIFAR)
    model = registry.models.get(name).build(info)
    x = torch.randint(0, info.pixel_max + 1, (2, info.in_channels, *info.image_size), dtype=torch.uint8)
    if name == "resnet18":
        x = x[:1]
    y = model(x)
    assert y.shape == (x.shape[0], info.num_classes)
    layers = [m for _, m in quant_layers(model)]
    assert layers and all(isinstance(m, (QConv2d, QLinear)) for m in layers)
    assert layers[0].position == "first" and layers[0].input_signed and layers[-1].position == "last"
    # no plain torch conv/linear hides in the model: every GEMM takes quantizers
    plain = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and not isinstance(m, (QConv2d, QLinear))]
    assert not plain
    if name in EXPECTED:
        assert count_parameters(model) == EXPECTED[name]


def test_resnet20_is_about_027m_and_has_19_convs():
    m = registry.models.get("resnet20").build(CIFAR)
    assert abs(count_parameters(m) / 1e6 - 0.27) < 0.005
    assert sum(isinstance(l, QConv2d) for _, l in quant_layers(m)) == 19


def test_shortcut_b_adds_projection_convs():
    a = registry.models.get("resnet20").build(CIFAR)
    b = registry.models.get("resnet20").build(CIFAR, shortcut="B")
    assert count_parameters(b) > count_parameters(a)
    assert len(list(quant_layers(b))) == len(list(quant_layers(a))) + 2


def test_unknown_model_option_is_a_config_error():
    from fqtbench.errors import ConfigError

    with pytest.raises(ConfigError, match="model.options.depth"):
        registry.models.get("resnet20").build(CIFAR, depth=3)
