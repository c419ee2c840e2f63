"""cpt: the cyclic schedule, the paper's BitOPs savings, evaluation at the declared precision, the
precision range test, and a digits run that learns."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from fqtbench import cost, registry
from fqtbench.config import resolve
from fqtbench.errors import ConfigError
from fqtbench.harness import CostMeter
from fqtbench.harness.runner import execute
from fqtbench_baselines.cpt.quant import SharedErrorQuantizer, attach_cpt, cyclic_quantizers
from fqtbench_baselines.cpt.schedule import cycle_length, cyclic_bits

CIFAR_INFO = SimpleNamespace(image_size=(32, 32), in_channels=3, num_classes=10, pixel_max=255,
                             mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def _histogram(total: int, cycles: int, lo: int, hi: int) -> dict[int, int]:
    t = cycle_length(total, cycles)
    hist: dict[int, int] = {}
    for step in range(total):
        b = cyclic_bits(step, t, lo, hi)
        hist[b] = hist.get(b, 0) + 1
    return hist


# ---- schedule ---------------------------------------------------------------------------------


def test_schedule_ramps_up_restarts_and_matches_the_official_rint():
    t = cycle_length(64000, 32)
    assert t == 2000
    bits = [cyclic_bits(s, t, 3, 8) for s in range(3 * t)]
    assert bits[0] == 3 and bits[t - 1] == 8 and bits[t] == 3 and bits[2 * t] == 3  # ramp up, restart
    assert all(a <= b for a, b in zip(bits[:t - 1], bits[1:t]))  # non-decreasing within a cycle
    for cycle, lo, hi in ((t, 3, 8), (t, 3, 6), (t, 4, 8), (t, 2, 5), (39, 4, 6), (39, 2, 8)):
        # the official expression divides first: pi * ((i % T) / T); pi * (i % T) / T flips the
        # 4-6 and 2-8 ties at i/T = 1/3 and 2/3 (T = 39, i = 26: 5.5 vs 5.499999999999999)
        official = np.rint(lo + 0.5 * (hi - lo) * (1 + np.cos(np.pi * ((np.arange(cycle) % cycle) / cycle) + np.pi)))
        assert [cyclic_bits(s, cycle, lo, hi) for s in range(cycle)] == official.astype(int).tolist(), (cycle, lo, hi)
    # the ramp lands exactly on 4.5 mid-cycle for 3-6: half to even gives 4 (round-half-up would give 5)
    assert 3 + 0.5 * 3 * (1 + math.cos(math.pi * 1000 / 2000 + math.pi)) == 4.5
    assert cyclic_bits(1000, 2000, 3, 6) == 4
    shares = {b: n / 64000 for b, n in sorted(_histogram(64000, 32, 3, 8).items())}
    for b, share in zip(range(3, 9), (0.205, 0.164, 0.130, 0.131, 0.164, 0.204)):  # methods.md 4.2
        assert abs(shares[b] - share) < 1e-3, (b, shares[b])
    with pytest.raises(ConfigError, match="cpt.num_cycles"):
        cycle_length(10, 32)


# ---- cost: the paper's printed savings ---------------------------------------------------------


def _step_tallies(bits_max: int, grad_bits: int, lo: int) -> dict[int, cost.CostTally]:
    """One CIFAR ResNet-20 training step's ledger at each forward precision lo..bits_max."""
    torch.manual_seed(0)
    model = registry.models.get("resnet20").build(CIFAR_INFO)
    attach_cpt(model, bits_max=bits_max, last_bits=bits_max, grad_bits=grad_bits, first_last=None, weight_granularity="channel")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    out = {}
    for b in range(lo, bits_max + 1):
        for q in cyclic_quantizers(model, bits_max, None):
            q.bits = b
        with cost.tally() as t:
            model(x).square().mean().backward()
        out[b] = t
    return out


@pytest.mark.parametrize("lo, hi, printed", [(3, 8, 36.67), (3, 6, 30.04)])
def test_cost_ledger_reproduces_the_papers_savings_on_a_cifar_resnet(lo, hi, printed):
    """CPT lo-hi/hi vs static hi/hi over the paper's 64000 iterations and 32 cycles (grad bits = hi)."""
    tallies = _step_tallies(hi, hi, lo)
    hist = _histogram(64000, 32, lo, hi)
    cyclic = {role: sum(n * tallies[b].bitops[role] for b, n in hist.items()) for role in ("fwd", "grad_input", "grad_weight")}
    static = {role: 64000 * tallies[hi].bitops[role] for role in cyclic}
    savings = 100 * (1 - sum(cyclic.values()) / sum(static.values()))
    assert abs(savings - printed) < 0.1, savings
    # The paper weighs the three GEMMs equally; the ledger does not run the first layer's grad-input
    # GEMM. Per-role mean bit products (BitOPs / MACs) with equal weights give the paper's number.
    macs = {role: 64000 * tallies[hi].macs[role] for role in cyclic}
    per_role = 100 * (1 - sum(cyclic[r] / macs[r] for r in cyclic) / sum(static[r] / macs[r] for r in cyclic))
    assert abs(per_role - printed) < 0.02, per_role


# ---- the quantizers and the meter in a real run ------------------------------------------------


def test_one_error_draw_feeds_both_backward_gemms():
    q = SharedErrorQuantizer(4)
    g = torch.randn(64, 16)
    first, second = q(g), q(g)
    assert first is second and first.bits == 4 and first.scale.numel() == 1
    assert len(torch.unique(first.q)) <= 16  # 4-bit affine codes (centred)
    third = q(g)  # a new backward pass draws again (stochastic rounding)
    assert third is not first


class _SeenBits(pl.Callback):
    """The bits of the cyclic quantizers at every training and validation batch."""

    def __init__(self):
        self.train: list[int] = []
        self.val: set[int] = set()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train.append(module._cyclic[0].bits)

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        self.val |= {q.bits for q in module._cyclic}


def test_meter_integrates_the_schedule_and_validation_runs_at_eval_bits():
    cfg = resolve("cpt", overrides=["cpt.num_cycles=4", "cpt.eval_bits=6"])
    data = registry.datasets.get("digits").build(cfg.data, 0)
    method = registry.methods.get("cpt")
    module = method.build(registry.models.get("cnn-s").build(data.info), cfg, data)
    meter, seen = CostMeter(), _SeenBits()
    steps = 60  # 39 full batches of 32 per epoch: every step has the same MACs; one validation at step 39
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[meter, seen])
    trainer.fit(module, datamodule=data)
    cycle = cycle_length(steps, 4)
    assert seen.train == [cyclic_bits(s, cycle, 3, 8) for s in range(steps)]
    assert seen.val == {6}
    assert {q.bits for q in module._cyclic} == {6}  # after training: the declared precision
    # the meter's total is the schedule integrated over one-step ledgers at each precision
    x, y = next(iter(data.train_dataloader()))
    expected = 0
    for b, n in module.steps_at_bits.items():
        module.set_forward_bits(b)
        with cost.tally() as t:
            torch.nn.functional.cross_entropy(module(x), y).backward()
        expected += n * t.total_bitops
    assert meter.total.total_bitops == expected
    assert module.steps_at_bits == {b: seen.train.count(b) for b in set(seen.train)}


# ---- end to end ---------------------------------------------------------------------------------


def test_digits_run_learns_and_is_evaluated_at_the_declared_precision(tmp_path):
    # 1170 steps, 7 cycles of 167: the last step (1169 = 7 x 167) is the first of a new cycle, at 3 bits
    record, _ = execute(resolve("cpt", overrides=["cpt.num_cycles=7", "trainer.threads=1"], out=str(tmp_path)))
    extra = record.extra["cpt"]
    assert record.status == "ok" and record.bits_tag == "cpt3-8g8"
    assert extra["cycle_steps"] == 167 and cyclic_bits(1169, 167, 3, 8) == 3
    assert {(l["w_bits"], l["a_bits"]) for l in record.layers} == {(8, 8)} and extra["eval_bits"] == 8
    final = record.metrics["final"]
    assert final["int_top1"] >= 97.5 and abs(final["gap"]) <= 0.6
    assert record.metrics["best"]["val_sim_top1"] >= 97.0
    assert 5.0 < extra["mean_fw_bits"] < 6.0 and extra["prt"] is None
    # the training ledger saw the cycle: the forward BitOPs per MAC lie between 3x3 and 8x8 bits
    tc = record.training_cost
    assert 9 < tc["bitops_by_role"]["fwd"] / tc["macs_by_role"]["fwd"] < 40


def test_precision_range_test_choice_is_recorded_and_counted(tmp_path):
    common = ["trainer.max_epochs=2", "cpt.num_cycles=2", "trainer.threads=1"]
    auto, _ = execute(resolve("cpt", overrides=common + ["bits.min=auto", "cpt.prt.steps=12"], out=str(tmp_path / "auto")))
    prt = auto.extra["cpt"]["prt"]
    chosen = prt["chosen"]
    assert auto.extra["cpt"]["bits_min"] == chosen and auto.extra["cpt"]["bits_min_from"] == "prt"
    assert auto.bits_tag == "cptauto-8g8" and min(int(b) for b in auto.extra["cpt"]["steps_at_bits"]) == chosen
    # the rule: the first probe (from prt.start up) whose gain reaches ratio x the reference gain
    assert prt["reference"]["bits"] == 8 and prt["steps"] == 12
    assert prt["threshold_gain"] == pytest.approx(prt["ratio"] * prt["reference"]["gain"], abs=1e-3)
    assert [p["bits"] for p in prt["curve"]] == list(range(2, 2 + len(prt["curve"])))
    assert all(p["gain"] < prt["threshold_gain"] for p in prt["curve"][:-1])
    assert chosen == 8 or prt["curve"][-1]["gain"] >= prt["threshold_gain"]
    # the probes run on copies under a forked random state: training is identical to a run given
    # the chosen bits.min, and the meter holds exactly the probes' BitOPs more
    fixed, _ = execute(resolve("cpt", overrides=common + [f"bits.min={chosen}"], out=str(tmp_path / "fixed")))
    assert auto.metrics["final"] == fixed.metrics["final"]
    assert prt["bitops"] > 0
    assert auto.training_cost["train_bitops"] - fixed.training_cost["train_bitops"] == prt["bitops"]


def test_static_row_and_integer_execution(tmp_path):
    over = ["bits.min=6", "bits.max=6", "bits.grad=6", "exec=int", "cpt.weight_granularity=tensor",
            "trainer.max_steps=30", "trainer.threads=1"]
    record, _ = execute(resolve("cpt", overrides=over, out=str(tmp_path)))
    assert record.status == "ok" and record.bits_tag == "w6a6g6"
    assert record.extra["cpt"]["steps_at_bits"] == {"6": 30}
    tc = record.training_cost
    assert tc["bitops_by_role"]["fwd"] == 36 * tc["macs_by_role"]["fwd"]
    assert tc["bitops_by_role"]["grad_weight"] == 36 * tc["macs_by_role"]["grad_weight"]
    assert record.metrics["final"]["int_top1"] > 50.0


@pytest.mark.parametrize("overrides, key", [
    (["bits.w=4"], "bits.w"),
    (["bits.min=9"], "bits.min"),
    (["bits.min=two"], "bits.min"),
    (["exec=int"], "cpt.weight_granularity"),
    (["bits.max=16"], "bits.max"),
    (["bits.grad=1"], "bits.grad"),
    (["bits.min=auto", "bits.max=2"], "cpt.prt.start"),
])
def test_bad_settings_are_one_line_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as exc:
        resolve("cpt", overrides=overrides)
    assert "\n" not in str(exc.value)


def test_interrupted_run_resumes_bit_identically(tmp_path):
    """The schedule position, the PRT's choice and the stochastic-rounding random state survive a resume."""
    import signal

    from fqtbench.harness.runner import RunInterrupted
    from fqtbench_baselines.cpt import CPT

    class StopOnce(CPT):
        name, armed = "cpt-stop-test", False

        def build(self, model, cfg, data):
            module = super().build(model, cfg, data)
            step = module.training_step

            def training_step(batch, batch_idx):
                if StopOnce.armed and module.current_epoch == 1:
                    raise KeyboardInterrupt
                return step(batch, batch_idx)

            module.training_step = training_step
            return module

    registry.methods.register(StopOnce())
    handler = signal.getsignal(signal.SIGINT)
    common = ["trainer.max_epochs=3", "cpt-stop-test.num_cycles=3", "bits.min=auto", "cpt-stop-test.prt.steps=10", "trainer.threads=1"]
    try:
        full, path_full = execute(resolve("cpt-stop-test", overrides=common, out=str(tmp_path / "full")))
        StopOnce.armed = True
        with pytest.raises(RunInterrupted):
            execute(resolve("cpt-stop-test", overrides=common, out=str(tmp_path / "part")))
        signal.signal(signal.SIGINT, handler)
        StopOnce.armed = False
        (part,) = (tmp_path / "part").iterdir()
        resumed, path_resumed = execute(resolve("cpt-stop-test", overrides=[f"resume={part}"]))
    finally:
        signal.signal(signal.SIGINT, handler)
        registry.methods.unregister("cpt-stop-test")
    a, b = (torch.load(p.parent / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"] for p in (path_full, path_resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.extra == full.extra and resumed.training_cost["train_bitops"] == full.training_cost["train_bitops"]


def test_the_error_quantizer_is_unbiased_at_the_extremes_too():
    """E[dequant(Q(g))] = g element by element, the largest one included: a rounded zero point with a
    clamp (version 1) pulled the extreme toward zero (x = 3 here: mean error -0.14)."""
    from fqtbench_baselines.cpt.quant import SharedErrorQuantizer

    torch.manual_seed(0)
    g = torch.tensor([-1.0, -0.3, 0.0, 0.7, 2.0, 3.0])
    quant = SharedErrorQuantizer(3)
    draws = torch.stack([(lambda q: q.q * q.scale)(quant(g.clone())) for _ in range(20000)])
    assert (draws.mean(0) - g).abs().max() < 0.02
    assert draws[:, 2].eq(0).all()  # zero stays exactly zero
