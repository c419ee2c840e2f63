"""fqtbench.nn: the three GEMM roles give the same values simulated in float and run on integers."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from fqtbench import cost, registry
from fqtbench.quant import GradQuantizer
from fqtbench.quant.attach import attach_standard

CIFAR = SimpleNamespace(image_size=(32, 32), in_channels=3, num_classes=10, pixel_max=255, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def _step(base, x, y, mode, **quant):
    m = copy.deepcopy(base)
    attach_standard(m, w_bits=4, a_bits=4, exec_mode=mode, backend=registry.backends.get("int8") if mode == "int" else None, **quant)
    m.train()
    with cost.tally() as t:
        out = m(x)
        torch.nn.functional.cross_entropy(out, y).backward()
    return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, t


@pytest.mark.parametrize("grad_quant", [False, True], ids=["qat", "quantized-gradients"])
def test_exec_int_matches_exec_sim_on_a_resnet20_training_step(grad_quant):
    torch.manual_seed(0)
    base = registry.models.get("resnet20").build(CIFAR)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (16,))
    quant = {}
    if grad_quant:  # deterministic rounding so both modes see the same gradient codes
        quant = dict(grad_input=lambda l: GradQuantizer(8, "row", stochastic=False), grad_weight=lambda l: GradQuantizer(8, "column", stochastic=False))
    out_s, g_s, t_s = _step(base, x, y, "sim", **quant)
    out_i, g_i, t_i = _step(base, x, y, "int", **quant)
    assert torch.allclose(out_s, out_i, rtol=1e-5, atol=1e-5)
    assert g_s.keys() == g_i.keys()
    for name in g_s:
        a, b = g_s[name], g_i[name]
        assert (a - b).norm() <= 1e-4 * a.norm() + 1e-9, name  # float rounding of the final scaling only
    assert t_s.as_dict() == t_i.as_dict()  # the same GEMMs with the same bits are counted


def test_exec_int_really_runs_integer_gemms(monkeypatch):
    calls = []
    backend = registry.backends.get("int8")
    original = type(backend).conv2d

    def spy(self, *a, **k):
        calls.append(a[0].dtype)
        return original(self, *a, **k)

    monkeypatch.setattr(type(backend), "conv2d", spy)
    torch.manual_seed(0)
    base = registry.models.get("resnet20").build(CIFAR)
    _step(base, torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.tensor([1, 2]), "int")
    assert len(calls) == 20 and all(not dt.is_floating_point for dt in calls)  # 19 convs + the linear head (a 1x1 conv)


def test_grad_quantizer_is_unbiased_at_the_extremes():
    """Stochastic GradQuantizer codes average to the gradient element by element, the largest
    included (a rounded zero point with a clamp pulled it toward zero)."""
    torch.manual_seed(0)
    g = torch.tensor([[-1.0, -0.3, 0.0, 0.7, 2.0, 3.0]])
    quant = GradQuantizer(3, "tensor")
    draws = torch.stack([(lambda q: q.q * q.scale)(quant(g)) for _ in range(20000)])
    assert (draws.mean(0) - g).abs().max() < 0.02
