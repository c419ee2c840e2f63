"""The integer engine: fixed-point requantization, integer-only IntModel inference, export fidelity."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fqtbench import registry
from fqtbench.engine import FixedPoint, IntModel, requantize
from fqtbench.engine.export import ExportError, export_model
from fqtbench.harness import calibrate_activations
from fqtbench.quant.attach import attach_standard

DIGITS = SimpleNamespace(image_size=(8, 8), in_channels=1, num_classes=10, pixel_max=16, mean=(0.3,), std=(0.4,))
CIFAR = SimpleNamespace(image_size=(32, 32), in_channels=3, num_classes=10, pixel_max=255, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


# ---- requantization --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    mult=st.floats(min_value=1e-7, max_value=4.0e3, allow_nan=False) | st.floats(min_value=-4.0e3, max_value=-1e-7),
    values=st.lists(st.integers(min_value=-(2**21), max_value=2**21), min_size=1, max_size=32),
    lo_hi=st.sampled_from([(None, None), (0, 15), (-7, 7), (0, 255)]),
)
def test_requant_matches_float64_reference_of_round_half_up(mult, values, lo_hi):
    fp = FixedPoint.from_real(mult, input_bound=2**21)
    v = torch.tensor(values, dtype=torch.int64)
    got = requantize(v, fp, *lo_hi)
    # the documented rule: floor(v * m / 2^shift + 1/2); |v*m| < 2^53 here, so float64 is exact
    m, s = int(fp.m), int(fp.shift)
    ref = torch.floor(v.double() * float(m) / 2.0**s + 0.5) if s >= 0 else v.double() * float(m) * 2.0 ** (-s)
    if lo_hi[0] is not None:
        ref = ref.clamp(*lo_hi)
    assert torch.equal(got, ref.to(torch.int64))
    assert abs(float(fp.real()) - mult) <= abs(mult) * 2.0**-18  # mantissa of >= 19 bits at this input bound


@settings(max_examples=200, deadline=None)
@given(mult=st.floats(min_value=1e-9, max_value=1e6), v=st.integers(min_value=-(2**31), max_value=2**31 - 1))
def test_requant_is_exact_in_python_integers_over_the_int32_range(mult, v):
    fp = FixedPoint.from_real(mult)
    got = int(requantize(torch.tensor([v]), fp)[0])
    m, s = int(fp.m), int(fp.shift)
    prod = v * m
    ref = (prod + (1 << (s - 1))) >> s if s > 0 else prod << (-s)
    assert got == ref


def test_requant_of_a_vanishing_multiplier_is_zero_not_an_overflow():
    """A multiplier below ~2^-33 (a tiny batch-norm gamma) needs a shift past 63: it must give 0."""
    v = torch.tensor([-(2**31), -5, 0, 7, 2**31 - 1])
    assert requantize(v, FixedPoint.from_real(9.09e-13)).tolist() == [0] * 5
    out = requantize(v[:, None].expand(5, 2).contiguous(), FixedPoint.from_real(torch.tensor([2.0**-20, 2.0**-80])))
    assert out[:, 1].tolist() == [0] * 5 and out[:, 0].tolist() == [-2048, 0, 0, 0, 2048]


def test_a_multiplier_whose_result_leaves_int64_is_refused():
    FixedPoint.from_real(2.0**30, input_bound=2**31 - 1)  # 2^61: fits
    with pytest.raises(ValueError, match="leaves the int64 range"):
        FixedPoint.from_real(2.0**40, input_bound=2**31 - 1)


def test_requant_rounds_half_up_and_per_channel():
    fp = FixedPoint.from_real(torch.tensor([0.5, 0.25, -0.5]))
    v = torch.tensor([[1, 2, 1], [-1, -2, -1], [3, 6, 3]])
    out = requantize(v, fp)
    assert out.tolist() == [[1, 1, 0], [0, 0, 1], [2, 2, -1]]  # .5 -> up; -0.5 -> 0; 1.5 -> 2; -1.5 -> -1


# ---- IntModel --------------------------------------------------------------------------------


def _quantized(name, info, w_bits=4, a_bits=4, seed=0, granularity="tensor", **options):
    torch.manual_seed(seed)
    model = registry.models.get(name).build(info, **options)
    attach_standard(model, w_bits=w_bits, a_bits=a_bits, first_last_bits=8 if w_bits < 8 else None, weight_granularity=granularity)
    x = torch.randint(0, info.pixel_max + 1, (64, info.in_channels, *info.image_size), dtype=torch.uint8)
    model.train()
    for _ in range(3):  # move batch-norm statistics away from their initial values
        model(x)
    calibrate_activations(model, [(x, None)])
    model.eval()
    return model, x


class NoFloat(TorchDispatchMode):
    """Fails on any op that returns a floating-point tensor."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
                raise AssertionError(f"{func} returned a {t.dtype} tensor")
        return out


@pytest.mark.parametrize("name, info", [("cnn-s", DIGITS), ("resnet20", CIFAR), ("mlp", DIGITS)])
def test_intmodel_forward_creates_no_float_tensor(name, info):
    model, x = _quantized(name, info)
    im = export_model(model, (info.in_channels, *info.image_size))
    backend = registry.backends.get("int8")
    im.prepared(backend, im.gemm_nodes[0])  # weights are prepared once, outside inference
    for i in im.gemm_nodes:
        im.prepared(backend, i)
    with NoFloat() as mode:
        logits = im.forward(x[:8], backend)
    assert logits.dtype in (torch.int32, torch.int64) and logits.shape == (8, 10)
    assert any("_int_mm" in op for op in mode.ops)


@pytest.mark.parametrize("name, info, granularity, options", [
    ("cnn-s", DIGITS, "tensor", {}), ("resnet20", CIFAR, "tensor", {}), ("resnet20", CIFAR, "channel", {}),
    ("resnet20", CIFAR, "tensor", {"shortcut": "B"}),  # the 1x1 shortcut conv reads conv1's codes
    ("cnn-s", CIFAR, "tensor", {}), ("resnet18", CIFAR, "tensor", {}),  # max-pools over planes of > 127 codes
])
def test_integer_model_tracks_the_simulated_model(name, info, granularity, options):
    """Same predictions as the fake-quantized float model on nearly every input (rounding only)."""
    model, x = _quantized(name, info, granularity=granularity, **options)
    im = export_model(model, (info.in_channels, *info.image_size))
    with torch.no_grad():
        sim = model(x)
    got = im.forward(x, registry.backends.get("int8"))
    agree = (sim.argmax(1) == got.argmax(1)).float().mean().item()
    assert agree >= 0.95
    # integer logits are the simulated logits on a fixed scale: strongly correlated
    c = torch.corrcoef(torch.stack([sim.flatten(), got.double().flatten().float()]))[0, 1]
    assert c > 0.99


@pytest.mark.parametrize("bits", [2, 3])
def test_folded_biases_do_not_round_low_bit_exports_away_from_the_simulation(bits):
    """A folded batch-norm bias rounded to whole accumulator units is a rounding the simulated model
    does not have; at w2a2 one unit is about half an output code (agreement was 0.22 here)."""
    model, x = _quantized("resnet20", CIFAR, w_bits=bits, a_bits=bits, shortcut="B")
    im = export_model(model, (3, 32, 32))
    with torch.no_grad():
        sim = model(x)
    got = im.forward(x, registry.backends.get("int8"))
    assert (sim.argmax(1) == got.argmax(1)).float().mean().item() >= 0.95
    assert torch.corrcoef(torch.stack([sim.flatten(), got.double().flatten().float()]))[0, 1] > 0.99
    assert any(nd.attrs.get("frac", 0) > 0 for nd in im.nodes)  # the biases carry fractional bits


def test_all_backends_give_identical_integer_logits():
    model, x = _quantized("resnet20", CIFAR, w_bits=3, a_bits=4)
    im = export_model(model, (3, 32, 32))
    outs = [im.forward(x[:16], registry.backends.get(b)) for b in ("reference", "int8", "bitserial")]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_save_and_load_with_weights_only(tmp_path):
    model, x = _quantized("cnn-s", DIGITS)
    im = export_model(model, (1, 8, 8))
    im.save(tmp_path / "m.pt")
    again = IntModel.load(tmp_path / "m.pt")  # torch.load(weights_only=True) inside
    b = registry.backends.get("int8")
    assert torch.equal(im.forward(x, b), again.forward(x, b))
    assert again.layer_table() == im.layer_table()
    assert im.bitops_per_sample() == sum(l["macs"] * l["w_bits"] * l["a_bits"] for l in im.layer_table())


def test_export_refuses_unquantized_or_too_wide_models():
    model = registry.models.get("cnn-s").build(DIGITS)
    with pytest.raises(ExportError, match="no activation quantizer"):
        export_model(model, (1, 8, 8))
    attach_standard(model, w_bits=12, a_bits=8)
    with pytest.raises(ExportError, match="uses 12 bits; the integer engine supports 0..8"):
        export_model(model, (1, 8, 8))


def test_a_signed_one_bit_input_counts_as_the_two_bits_it_stores():
    """The first layer's signed 1-bit input quantizer is ternary ({-1, 0, 1}); unsigned 1-bit is binary."""
    model, _ = _quantized("cnn-s", DIGITS, w_bits=8, a_bits=1)
    bits = {row["name"]: row["a_bits"] for row in export_model(model, (1, 8, 8)).layer_table()}
    assert bits == {"body.0.conv": 2, "body.1.conv": 1, "head": 1}


def test_mixed_precision_layers_export_with_their_own_bits():
    model, x = _quantized("cnn-s", DIGITS)
    from fqtbench.nn import quant_layers
    from fqtbench.quant import WeightQuantizer

    layers = [l for _, l in quant_layers(model)]
    layers[1].quant.weight = WeightQuantizer(2)
    im = export_model(model, (1, 8, 8))
    assert [l["w_bits"] for l in im.layer_table()] == [8, 2, 8]


@pytest.mark.parametrize("chunk_rows", [512, 8])
def test_forward_population_equals_each_candidate_run_alone(chunk_rows):
    """ResNet-20 (residual shortcuts read across the searched layer): the one-pass population
    evaluation -- whole batch or candidate chunks -- gives every candidate exactly its own logits."""
    from fqtbench.bench.ccea import candidates, quantized_int_model

    im, info = quantized_int_model("resnet20")
    backend = registry.backends.get("int8")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, info.pixel_max + 1, (4, info.in_channels, *info.image_size), dtype=torch.uint8, generator=g)
    for node in (im.gemm_nodes[0], im.gemm_nodes[7], im.gemm_nodes[-1]):
        ws = candidates(im, node, 3, 32, g)
        out = im.forward_population(x, backend, node, ws, chunk_rows=chunk_rows)
        acts = im.activations(x, backend)
        assert torch.equal(out, im.forward_population(x, backend, node, ws, prefix=acts, chunk_rows=chunk_rows))
        for k in range(3):
            alone = im.clone()
            alone.set_weight(node, ws[k])
            assert torch.equal(alone.forward(x, backend), out[k])
        alone.refresh(acts, backend, node)  # the kept activations follow the last candidate's change
        assert torch.equal(acts[-1], out[2])
        assert torch.equal(out, im.forward_population(x, backend, node, ws, prefix=alone.activations(x, backend)))
    with pytest.raises(ValueError, match="must be a requantization after"):
        im.forward_population(x, backend, im.gemm_nodes[1], ws, requant=(1, torch.ones(3, 16, dtype=torch.int64)))


# ---- activation ranges at export -------------------------------------------------------------


def _trained_cnn():
    """cnn-s at w4a4 after a few training-mode forwards: every activation range tracked in an EMA."""
    from fqtbench.quant import ActQuantizer

    torch.manual_seed(0)
    model = registry.models.get("cnn-s").build(DIGITS)
    attach_standard(model, w_bits=4, a_bits=4)
    g = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(3):
        model(torch.randint(0, 17, (32, 1, 8, 8), dtype=torch.uint8, generator=g))
    return model, [m for m in model.modules() if isinstance(m, ActQuantizer)]


def test_calibration_keeps_trained_ranges_and_measures_untrained_ones():
    model, qs = _trained_cnn()
    trained = [float(q.running_max) for q in qs]
    untrained = qs[-1]
    untrained.running_max.zero_()
    untrained.initialized.fill_(False)  # as a quantizer attached after training would be
    calib = [(torch.randint(0, 17, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)), None)]
    calibrate_activations(model, calib, keep_trained=True)
    assert [float(q.running_max) for q in qs[:-1]] == trained[:-1]
    assert bool(untrained.initialized) and float(untrained.running_max) > 0
    calibrate_activations(model, calib)  # engine.act_ranges=calibrate: every range measured again
    assert [float(q.running_max) for q in qs[:-1]] != trained[:-1]


@pytest.mark.parametrize("policy", ["trained", "calibrate"])
def test_export_module_follows_engine_act_ranges(policy):
    from fqtbench.config import resolve
    from fqtbench.engine.export import export_module
    from fqtbench.harness import FQTModule

    model, qs = _trained_cnn()
    trained = [float(q.running_max) for q in qs]
    cfg = resolve("qat", overrides={"engine": {"act_ranges": policy, "calib_batches": 1}})
    calib = [(torch.randint(0, 17, (64, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)), None)]
    data = SimpleNamespace(info=DIGITS, calib_dataloader=lambda n: calib[:n])
    module = SimpleNamespace(model=model, calibrate=FQTModule.calibrate.__get__(SimpleNamespace(model=model)))
    im = export_module(module, cfg, data)
    kept = [float(q.running_max) for q in qs] == trained
    assert kept == (policy == "trained")
    x = calib[0][0][:16]
    model.eval()
    assert torch.equal(im.forward(x, registry.backends.get("int8")).argmax(1), model(x).argmax(1))
