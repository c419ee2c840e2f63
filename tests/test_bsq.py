"""BSQ: exact bit representation and re-quantization, the group Lasso, the clamps, mixed-precision
export on every backend, and a digits run whose precision falls from 8 bits."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fqtbench import registry
from fqtbench.config import resolve
from fqtbench.engine.export import ExportError, export_model
from fqtbench.errors import ConfigError
from fqtbench.harness import calibrate_activations
from fqtbench.nn import quant_layers
from fqtbench_baselines.bsq import BitWeight, BSQModule, attach_bsq, group_lasso

DIGITS = SimpleNamespace(image_size=(8, 8), in_channels=1, num_classes=10, pixel_max=16, mean=(0.3,), std=(0.4,))
CIFAR = SimpleNamespace(image_size=(32, 32), in_channels=3, num_classes=10, pixel_max=255, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def _random_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)


def _planes(bw: BitWeight, p: torch.Tensor, n: torch.Tensor) -> None:
    bw.pweight.data.copy_(p)
    bw.nweight.data.copy_(n)


# ---- the representation and re-quantization ------------------------------------------------------


def test_conversion_is_the_8bit_rounding_of_the_fp32_weight():
    w = torch.randn(4, 3, 3, 3)
    bw = BitWeight(w, 8)
    assert set(bw.pweight.unique().tolist()) <= {0.0, 1.0} and not bool((bw.pweight * bw.nweight).any())
    unit = w.abs().max() / 255
    assert torch.equal(bw.codes(), torch.round(w / unit))
    assert torch.allclose(bw.effective(), torch.round(w / unit) * unit, atol=1e-7)


def test_redecomposition_leaves_the_function_unchanged():
    torch.manual_seed(0)
    model = registry.models.get("cnn-s").build(DIGITS)
    _random_bn(model)
    layers, _ = attach_bsq(model, 8, 4)
    for bw in layers.values():  # continuous bit variables with |Wc| <= 1: no overflow, no clipping
        _planes(bw, torch.rand_like(bw.pweight), torch.rand_like(bw.nweight))
    x = torch.randint(0, 17, (64, 1, 8, 8))
    calibrate_activations(model, [(x, None)])
    model.eval()
    with torch.no_grad():
        before = model(x)
    codes = {name: bw.codes() for name, bw in layers.items()}
    units = {name: bw.unit().item() for name, bw in layers.items()}
    for bw in layers.values():
        bw.requantize()
        assert set(torch.cat([bw.pweight.flatten(), bw.nweight.flatten()]).unique().tolist()) <= {0.0, 1.0}
    with torch.no_grad():
        after = model(x)
    for name, bw in layers.items():
        assert torch.equal(bw.codes(), codes[name])
        assert math.isclose(bw.unit().item(), units[name], rel_tol=1e-6)
    assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)
    assert torch.equal(before.argmax(1), after.argmax(1))


def test_all_zero_planes_are_dropped_and_a_layer_can_reach_zero_bits():
    w = torch.tensor([[12.0, -8.0, 4.0, 0.0]])  # codes 12, -8, 4, 0 at 4 bits with scale 15 / 15
    bw = BitWeight(w * 15 / 12, 4)
    assert bw.codes().tolist() == [[15.0, -10.0, 5.0, 0.0]]
    _planes(bw, torch.tensor([[[1.0, 0, 0, 0]], [[1, 0, 1, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]]),
            torch.tensor([[[0.0, 1, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]], [[0, 0, 0, 0]]]))
    before = bw.effective().detach()  # codes 12, -8, 4, 0: both LSB planes are zero
    bw.requantize()
    assert bw.bits == 2 and bw.codes().tolist() == [[3.0, -2.0, 1.0, 0.0]]
    assert torch.allclose(bw.effective(), before)
    _planes(bw, torch.tensor([[[0.0, 0, 0, 0]], [[0, 0, 1, 0]]]), torch.zeros(2, 1, 4))  # MSB plane zero
    before = bw.effective().detach()
    bw.requantize()
    assert bw.bits == 1 and torch.allclose(bw.effective(), before)
    _planes(bw, torch.zeros(1, 1, 4), torch.zeros(1, 1, 4))
    bw.requantize()
    assert bw.bits == 0 and bw.pweight.shape == (0, 1, 4)
    q = bw(bw.effective())
    assert q.bits == 0 and (q.range.lo, q.range.hi) == (0, 0) and not bool(q.q.any()) and float(q.scale) > 0


def test_sparse_lsb_plane_is_dropped_only_above_the_threshold():
    codes = torch.tensor([6.0] * 99 + [7.0])  # LSB set in 1 % of the weights
    for threshold, bits in ((0.0, 3), (0.01, 2)):
        bw = BitWeight(codes / 7, 3)
        bw.requantize(threshold)
        assert bw.bits == bits
    assert bw.codes().unique().tolist() == [3.0] and math.isclose(bw.unit().item(), 2 / 7, rel_tol=1e-6)


def test_overflow_grows_one_bit_until_eight():
    bw = BitWeight(torch.tensor([7.0, -3.0]), 3)
    _planes(bw, torch.tensor([[2.0, 0], [2, 0], [2, 0]]), torch.tensor([[0.0, 0], [0, 1], [0, 1]]))
    assert bw.codes().tolist() == [7.0, -3.0]  # Wc = 2: clipped to 2^3 - 1 in the forward pass
    unit = bw.unit().item()
    bw.requantize()
    assert bw.bits == 4 and bw.codes().tolist() == [14.0, -3.0]  # the overflowing magnitude is kept
    assert math.isclose(bw.unit().item(), unit, rel_tol=1e-6)
    top = BitWeight(torch.tensor([127.0, -1.0]), 7)
    top.pweight.data[:, 0] = 2.0
    before = top.effective().detach()
    top.requantize()
    assert top.bits == 7 and torch.allclose(top.effective(), before)  # at 7 magnitude bits (8 stored) it clips instead


def test_exported_codes_count_the_sign_bit():
    """Magnitude bits n store as n + 1 two's-complement bits: the shared size/BitOPs columns count that,
    and the engine refuses 8 magnitude bits (9 stored) like any other 9-bit weight."""
    bw = BitWeight(torch.tensor([7.0, -3.0, 1.0]), 3)
    qt = bw(bw.effective())
    assert qt.q.tolist() == [7.0, -3.0, 1.0] and qt.bits == 4 == qt.range.bits
    model = registry.models.get("cnn-s").build(DIGITS)
    attach_bsq(model, 8, 4)
    calibrate_activations(model, [(torch.randint(0, 17, (8, 1, 8, 8)), None)])
    with pytest.raises(ExportError, match="uses 9 bits; the integer engine supports 0..8"):
        export_model(model, (1, 8, 8))
    empty = BitWeight(torch.zeros(3), 3)
    empty.requantize()
    assert empty.bits == 0 and empty(empty.effective()).bits == 0


def test_group_lasso_on_a_hand_example():
    a = BitWeight(torch.tensor([3.0, -1.0]), 2)  # codes 3 = 11b, -1 = -01b: planes ||(1,0)|| = 1, ||(1,0;0,1)|| = sqrt 2
    b = BitWeight(torch.tensor([[0.5, 0.5]]), 1)  # one plane (1, 1): sqrt 2
    value = group_lasso([a, b], total_params=4)
    expected = (2 * 2 * (1 + math.sqrt(2)) + 2 * 1 * math.sqrt(2)) / 4
    assert math.isclose(value.item(), expected, rel_tol=1e-6)
    value.backward()
    assert a.pweight.grad[0, 0].item() == pytest.approx(2 * 2 / 4 * 1.0, rel=1e-6)  # d||plane||/dp = p / ||plane||


def test_state_dict_round_trip_restores_precision_and_form():
    torch.manual_seed(1)
    src = registry.models.get("cnn-s").build(DIGITS)
    layers, _ = attach_bsq(src, 8, 4)
    a, b, c = layers.values()
    a.pweight.data[:3] = 0
    a.nweight.data[:3] = 0
    a.requantize()
    b.requantize()
    b.to_float()
    _planes(c, torch.zeros_like(c.pweight), torch.zeros_like(c.nweight))
    c.requantize()
    dst = registry.models.get("cnn-s").build(DIGITS)
    dst_layers, _ = attach_bsq(dst, 8, 4)
    dst.load_state_dict(src.state_dict())
    for s, d in zip(layers.values(), dst_layers.values()):
        assert (d.bits, d.form) == (s.bits, s.form)
        assert torch.equal(d.effective(), s.effective())
    assert [d.bits for d in dst_layers.values()] == [5, 8, 0]


# ---- mixed-precision export ------------------------------------------------------------------------


def test_mixed_bits_export_is_identical_on_every_backend():
    torch.manual_seed(0)
    model = registry.models.get("resnet20").build(CIFAR, shortcut="B")
    _random_bn(model)
    layers, shortcuts = attach_bsq(model, 7, 4)
    targets = [7, 6, 5, 4, 3, 2, 1, 0] * 3
    for bw, bits in zip(layers.values(), targets):  # zero the 7 - bits LSB planes; re-quantization drops them
        bw.pweight.data[bits:] = 0
        bw.nweight.data[bits:] = 0
        bw.requantize()
        assert bw.bits == bits
    x = torch.randint(0, 256, (8, 3, 32, 32))
    calibrate_activations(model, [(x, None)])
    int_model = export_model(model, (3, 32, 32))
    table = {row["name"]: row["w_bits"] for row in int_model.layer_table()}
    assert [table[name] for name in layers] == [n + 1 if n else 0 for n in targets[: len(layers)]]  # the sign counts
    assert all(table[name] == 8 for name in shortcuts) and len(shortcuts) == 2
    preds = {name: int_model.predict(x, registry.backends.get(name)) for name in ("reference", "int8", "bitserial")}
    assert torch.equal(preds["int8"], preds["reference"]) and torch.equal(preds["bitserial"], preds["reference"])
    model.eval()
    with torch.no_grad():
        sim = model(x).argmax(1)
    assert float((sim == preds["reference"]).float().mean()) >= 0.875


# ---- the post-step clamp ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["clean", "faithful"])
def test_faithful_clamp_also_hits_the_shortcut_and_its_bn(mode):
    cfg = resolve("bsq", overrides={"model": {"name": "resnet20", "options": {"shortcut": "B"}}, "bsq": {"mode": mode}})
    model = registry.models.get("resnet20").build(DIGITS, shortcut="B")
    module = BSQModule(model, cfg, bsq_epochs=20)
    block = model.body[4]
    for p in (block.down_conv.weight, block.down_bn.bias, block.bn1.bias, model.head.bias):
        p.data.fill_(-0.5)
    for bw in module.bit_layers.values():
        bw.pweight.data.fill_(3.0)
        bw.nweight.data.fill_(-1.0)
    module.clamp_variables()
    for bw in module.bit_layers.values():
        assert bw.pweight.max().item() == 2.0 and bw.nweight.min().item() == 0.0
    assert block.bn1.bias.min().item() == -0.5 and model.head.bias.min().item() == -0.5  # main-path BN, float bias
    shortcut = block.down_conv.weight.min().item(), block.down_bn.bias.min().item()
    assert shortcut == ((0.0, 0.0) if mode == "faithful" else (-0.5, -0.5))
    for bw in module.bit_layers.values():
        bw.requantize()
        bw.to_float()
        bw.value.data.fill_(-3.0)
    module.clamp_variables()  # fine-tuning: float weights to [-1, 1]
    assert all(bw.value.min().item() == -1.0 for bw in module.bit_layers.values())


# ---- config and end to end -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over",
    [{"exec": "int"}, {"bits": {"w": 9}}, {"bits": {"w": 1}}, {"bits": {"first_last": 8}}, {"bsq": {"epochs": 5}}, {"bsq": {"finetune_epochs": 30}}],
)
def test_bad_config_is_one_config_error(over):
    with pytest.raises(ConfigError):
        resolve("bsq", overrides=over)


def test_bits_tag_names_activation_bits_and_alpha():
    from fqtbench_baselines.bsq import METHOD

    assert METHOD.bits_tag(resolve("bsq", overrides={"bsq": {"alpha": 0.05}})) == "bsq-a4-alpha0.05"


@pytest.mark.slow
def test_digits_run_lowers_the_precision_from_8_bits(tmp_path, monkeypatch):
    from fqtbench.harness.runner import execute

    monkeypatch.setenv("FQTBENCH_CACHE", str(tmp_path / "cache"))
    cfg = resolve("bsq", overrides=["trainer.progress=false", "wandb.mode=disabled"], seed=0, out=str(tmp_path / "runs"))
    record, _ = execute(cfg)
    bsq, final = record.extra["bsq"], record.metrics["final"]
    assert record.status == "ok" and bsq["start_bits"] == 7  # magnitude bits of the default 8-bit start
    assert bsq["bits_history"][0]["bits"] == {name: 7 for name in bsq["layer_bits"]} and bsq["avg_weight_bits"] < 6
    assert final["int_top1"] >= 97.0 and abs(final["gap"]) <= 1.0
    assert {row["name"]: row["w_bits"] for row in record.layers} == {k: n + 1 if n else 0 for k, n in bsq["layer_bits"].items()}
    assert bsq["compression"] == pytest.approx(32 / bsq["avg_weight_bits"], rel=1e-3)
    assert record.pretraining_cost and record.pretraining_cost["samples"] > 0
