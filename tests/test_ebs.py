"""ebs: shared meta weights (no per-candidate copies), the mixture math, the BitOPs target and its
repair, bilevel strengths, the phases of a digits run, and the bit-exact bitserial export."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from fqtbench import registry
from fqtbench.config import resolve
from fqtbench.errors import ConfigError
from fqtbench.harness.runner import execute, quiet_libraries
from fqtbench.models import count_parameters
from fqtbench.nn import QLinear, quant_layers
from fqtbench.quant import ActQuantizer, WeightQuantizer, signed_quantize, symmetric_quantize, unsigned_quantize
from fqtbench_baselines.ebs import METHOD
from fqtbench_baselines.ebs.search import ActChoice, SearchState, WeightChoice

QUIET = ["trainer.progress=false", "trainer.threads=1"]


def _setup(overrides=(), seed=0):
    quiet_libraries()
    cfg = resolve("ebs", "digits", overrides=[*QUIET, *overrides], seed=seed)
    pl.seed_everything(seed, verbose=False)
    data = registry.datasets.get("digits").build(cfg.data, seed)
    model = registry.models.get("cnn-s").build(data.info)
    return cfg, data, model


def _fit(module, data, epochs):
    trainer = pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return trainer


@pytest.mark.parametrize("logit_scale", [False, True])  # the method's default, and the digits track's
def test_search_adds_only_the_strengths_no_weight_copies(logit_scale):
    cfg, data, model = _setup([f"ebs.logit_scale={str(logit_scale).lower()}"])
    base = count_parameters(model)
    module = METHOD.build(model, cfg, data)
    n_layers = len(list(quant_layers(model)))
    n_cand = len(cfg.params.w_candidates) + len(cfg.params.a_candidates)
    assert count_parameters(module) == base + n_layers * n_cand + int(logit_scale)
    # the only parameters besides the network's are the strengths, one scalar per candidate (and
    # with ebs.logit_scale the one scalar trained with them)
    extra = [n for n, _ in module.named_parameters() if not n.startswith("model.")]
    strengths = [n for n in extra if n.endswith(".alpha")]
    assert len(strengths) == 2 * n_layers and set(extra) - set(strengths) == ({"space.log_logit_scale"} if logit_scale else set())
    # autograd keeps one copy of the meta weight for the mixture, not one per candidate
    layer = module.model.body[1].conv
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        layer.weight_fn(layer.weight)
    assert sum(n for n in saved if n == layer.weight.numel()) == layer.weight.numel()
    assert sum(saved) < 2 * layer.weight.numel()


def test_weight_and_activation_mixtures_match_the_explicit_formula():
    torch.manual_seed(0)
    state = SearchState(temperature=0.7)
    wc = WeightChoice([2, 4, 8], state, "tensor")
    ac_u = ActChoice([3, 5], state, signed=False)
    ac_s = ActChoice([2, 8], state, signed=True)
    for c in (wc, ac_u, ac_s):
        c.alpha.data = torch.randn(len(c.bits))
    w = torch.randn(6, 5, requires_grad=True)
    x = torch.rand(4, 5, requires_grad=True)
    xs = torch.randn(4, 5, requires_grad=True)

    def explicit(choice, t, quantize):  # sum_b p_b * STE(Q_b(t)), written out
        p = F.softmax(choice.alpha / state.temperature, 0)
        return sum(p[i] * (t + (quantize(t, b) - t).detach()) for i, b in enumerate(choice.bits))

    m = x.detach().amax()
    ms = xs.detach().abs().amax()
    cases = [
        (wc, w, lambda t, b: symmetric_quantize(t, b).dequant()),
        (ac_u, x, lambda t, b: unsigned_quantize(t, b, m / (2**b - 1)).dequant()),
        (ac_s, xs, lambda t, b: signed_quantize(t, b, ms / (2 ** (b - 1) - 1)).dequant()),
    ]
    for choice, t, quantize in cases:
        g = torch.randn_like(t)
        got = choice.mix(t)
        ga, gt = torch.autograd.grad((got * g).sum(), [choice.alpha, t])
        want = explicit(choice, t, quantize)
        wa, wt = torch.autograd.grad((want * g).sum(), [choice.alpha, t])
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(ga, wa)
        torch.testing.assert_close(gt, wt)
    # evaluation uses the tracked range; a fresh choice copies the first batch's range exactly
    assert float(ac_u.running_max) == pytest.approx(float(m))
    # the layer computes with the mixtures through weight_fn / input_fn
    layer = QLinear(5, 6, bias=False)
    layer.weight.data = w.detach().clone()
    layer.weight_fn, layer.input_fn = wc.mix, ac_u.mix
    torch.testing.assert_close(layer(x.detach()), F.linear(ac_u.mix(x.detach()), wc.mix(layer.weight)))


def test_expected_bitops_and_repair_to_the_target():
    cfg, data, model = _setup()
    module = METHOD.build(model, cfg, data)
    space = module.space
    macs = space.macs_of()
    assert macs == {"body.0.conv": 64 * 16 * 9, "body.1.conv": 16 * 32 * 16 * 9, "head": 128 * 10}
    assert module.reference_bitops == sum(macs.values()) * 16 == module.target  # uniform w4a4, ratio 1
    with torch.no_grad():
        for c in space.choices():
            c.alpha.copy_(torch.linspace(0, 1, len(c.bits)))  # argmax: every choice at 8 bits
        e = space.expected_bitops()
    p = F.softmax(torch.linspace(0, 1, 6), 0)
    eb = float((p * torch.tensor([2.0, 3, 4, 5, 6, 8])).sum())
    assert float(e) == pytest.approx(sum(macs.values()) * eb * eb, rel=1e-5)
    d = space.decide(module.target)
    assert d.argmax_bitops == sum(macs.values()) * 64
    assert d.repairs and d.bitops <= module.target < d.repairs[-2]["bitops_after"]
    assert d.bitops == sum(macs[n] * w * a for n, (w, a) in d.bits.items())
    # with equal confidence everywhere, the repair lowers the big layer (most BitOPs saved) first
    assert d.repairs[0]["choice"].startswith("body.1.conv")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\(\)`")
def test_bilevel_moves_strengths_only_by_validation_loss_and_penalty():
    cfg, data, model = _setup(["ebs.search_optimizer=bilevel", "ebs.target_ratio=0.5"])
    module = METHOD.build(model, cfg, data)
    x, y = next(iter(data.train_dataloader()))
    val_grads = module._validation_strength_grads()
    module.zero_grad()
    module.space.state.detach = True
    loss = F.cross_entropy(module(x), y) + module.extra_loss()
    module.space.state.detach = False
    loss.backward()
    alphas = [c.alpha for c in module.space.choices()]
    penalty_grads = torch.autograd.grad(module.extra_loss(), alphas)
    for a, g in zip(alphas, penalty_grads):
        torch.testing.assert_close(a.grad, g)
    assert all(float(g.abs().sum()) > 0 for g in val_grads)
    module._val_grads = val_grads
    module.on_after_backward()
    for a, g, v in zip(alphas, penalty_grads, val_grads):
        torch.testing.assert_close(a.grad, g + v)


def test_logit_scale_takes_the_strengths_objective_and_leaves_with_the_search():
    cfg, data, model = _setup(["ebs.search_optimizer=bilevel", "ebs.logit_scale=true"])
    module = METHOD.build(model, cfg, data)
    extra = [n for n, _ in module.named_parameters() if not n.startswith("model.") and not n.endswith(".alpha")]
    assert extra == ["space.log_logit_scale"]  # one scalar more than the strengths, nothing else
    scale = module.space.log_logit_scale
    x, y = next(iter(data.train_dataloader()))
    with torch.no_grad():
        scale.fill_(0.5)
        torch.testing.assert_close(module(x), module.model(x) * torch.exp(torch.tensor(0.5)))
    val_grads = module._validation_strength_grads()  # bilevel: the scale learns from the validation loss ...
    assert len(val_grads) == len(module.space.choices()) + 1 and float(val_grads[-1].abs()) > 0
    module.zero_grad()
    module.space.state.detach = True  # ... and not from the training loss, like the strengths
    F.cross_entropy(module(x), y).backward()
    module.space.state.detach = False
    assert scale.grad is None
    module._val_grads = val_grads
    module.on_after_backward()
    torch.testing.assert_close(scale.grad, val_grads[-1])
    module.finish_search()  # the retrain and the export see the network's own logits
    torch.testing.assert_close(module(x), module.model(x))
    assert not scale.requires_grad and module.end_of_search["logit_scale"] == pytest.approx(float(scale.exp()))


@pytest.fixture(scope="module")
def searched():
    cfg, data, model = _setup(["trainer.max_epochs=12", "ebs.target_ratio=0.75"])
    module = METHOD.build(model, cfg, data)
    _fit(module, data, cfg.trainer.max_epochs)
    return cfg, data, module


def test_digits_run_searches_retrains_and_learns(searched):
    cfg, data, module = searched
    assert module.phase == "retrain" and module.counts["search"]["steps"] == module.counts["retrain"]["steps"] > 0
    d = module.decision
    assert d.bitops <= module.target
    for name, layer in quant_layers(module.model):  # plain quantizers at the decided bits, mixtures gone
        assert layer.weight_fn is None and layer.input_fn is None
        assert (layer.quant.weight.bits, layer.quant.act.bits) == d.bits[name]
        assert isinstance(layer.quant.weight, WeightQuantizer) and isinstance(layer.quant.act, ActQuantizer)
    assert all(not p.requires_grad for p in module.space.parameters())
    assert module.evaluate_sim(data.test_dataloader()) >= 95.0


def test_export_is_the_decided_mixed_precision_and_bitserial_matches_int8(searched):
    cfg, data, module = searched
    int_model = METHOD.export(module, cfg, data)
    d = module.decision
    assert {l["name"]: (l["w_bits"], l["a_bits"]) for l in int_model.layer_table()} == d.bits
    assert int_model.bitops_per_sample() == d.bitops
    int8, bitserial = registry.backends.get("int8"), registry.backends.get("bitserial")
    for x, _ in data.test_dataloader():
        assert torch.equal(int_model.forward(x, int8), int_model.forward(x, bitserial))
    assert int_model.evaluate(data.test_dataloader(), bitserial) >= 95.0


@torch.no_grad()
def test_checkpoint_restores_the_retrain_phase(searched, tmp_path):
    cfg, data, module = searched
    module.trainer.save_checkpoint(tmp_path / "last.ckpt")
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    _, _, model = _setup(["trainer.max_epochs=12", "ebs.target_ratio=0.75"])
    fresh = METHOD.build(model, cfg, data)
    fresh.on_load_checkpoint(ckpt)  # Lightning calls it before loading the state dict
    fresh.load_state_dict(ckpt["state_dict"])  # strict: the retrain quantizers exist again
    assert fresh.phase == "retrain" and fresh.decision.bits == module.decision.bits
    assert fresh.counts == module.counts
    x, _ = next(iter(data.test_dataloader()))
    module.eval(), fresh.eval()
    try:
        assert torch.equal(module(x), fresh(x))
    finally:
        module.train()


def test_tighter_target_chooses_fewer_bits(tmp_path):
    finals = {}
    for ratio in (1.0, 0.4):
        cfg = resolve("ebs", "digits", overrides=[*QUIET, "trainer.max_epochs=8", f"ebs.target_ratio={ratio}"], out=str(tmp_path))
        record, _ = execute(cfg)
        e = record.extra
        assert record.status == "ok" and record.bits_tag == f"ebs-t{ratio}"
        assert e["final_bitops"] == record.inference_bitops <= e["target_bitops"] == pytest.approx(ratio * e["reference_bitops"])
        assert e["search_cost"]["steps"] > 0 and e["retrain_cost"]["steps"] > 0
        assert e["search_cost"]["train_bitops"] > 0 and e["retrain_cost"]["train_bitops"] > 0
        finals[ratio] = (e["argmax_bitops"], {l["name"]: l["w_bits"] * l["a_bits"] for l in e["searched_bits"]})
    # the search itself (its argmax, before any repair to the target) spends fewer BitOPs, and the
    # layer that holds most of them gets fewer bits (cheap layers may rise: that is the trade)
    assert finals[0.4][0] < finals[1.0][0]
    assert finals[0.4][1]["body.1.conv"] < finals[1.0][1]["body.1.conv"]


@pytest.mark.parametrize("overrides, key", [
    (["ebs.w_candidates=[2,4,4]"], "ebs.w_candidates"),
    (["ebs.a_candidates=[1,4]"], "ebs.a_candidates"),
    (["ebs.search_optimizer=bilevel", "data.val_fraction=0"], "ebs.search_optimizer"),
    (["bits.g_input=8"], "bits.g_input"),
    (["exec=int"], "exec"),
    (["bits.first_last=16"], "bits.first_last"),
])
def test_bad_config_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as exc:
        resolve("ebs", "digits", overrides=overrides)
    assert key in str(exc.value) and "\n" not in str(exc.value)


def test_unreachable_target_is_refused():
    cfg, data, model = _setup(["ebs.target_ratio=0.1"])
    with pytest.raises(ConfigError, match="ebs.target_ratio=0.1"):
        METHOD.build(model, cfg, data)


def test_shortcut_conv_shares_the_block_input_choice_and_quantizer():
    from fqtbench.engine.export import export_model
    from fqtbench.harness import calibrate_activations
    from fqtbench_baselines.ebs.search import SearchSpace, macs_per_sample

    torch.manual_seed(0)
    info = type("I", (), dict(image_size=(8, 8), in_channels=3, num_classes=10, pixel_max=255, mean=(0.5,) * 3, std=(0.25,) * 3))
    model = registry.models.get("resnet20").build(info, shortcut="B")
    space = SearchSpace(model, macs_per_sample(model, (3, 8, 8)), [2, 4, 8], [4, 8], None, "tensor")
    blocks = [m for m in model.modules() if hasattr(m, "down_conv")]
    assert blocks
    entry = {e.name: e for e in space.entries}
    names = {id(l): n for n, l in quant_layers(model)}
    for b in blocks:
        assert entry[names[id(b.down_conv)]].a is entry[names[id(b.conv1)]].a
    assert len(space.acts) == len(space.entries) - len(blocks) and len(space.weights) == len(space.entries)
    space.attach_search()
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    model(x).sum().backward()
    assert all(c.alpha.grad is not None for c in space.choices())
    d = space.decide(float("inf"))
    space.attach_final(d.bits)
    for b in blocks:
        assert b.down_conv.quant.act is b.conv1.quant.act
    calibrate_activations(model, [(x, None)])
    int_model = export_model(model, (3, 8, 8))
    assert {l["name"]: (l["w_bits"], l["a_bits"]) for l in int_model.layer_table()} == d.bits
    assert torch.equal(int_model.forward(x, registry.backends.get("int8")), int_model.forward(x, registry.backends.get("bitserial")))
