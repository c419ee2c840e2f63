"""Harness: cost meter, gradient-free stepping, checkpoints a run resumes from bit-identically."""

from __future__ import annotations

import pytorch_lightning as pl
import torch

from fqtbench import cost, registry
from fqtbench.config import resolve
from fqtbench.harness import CostMeter, GradientFreeModule
from fqtbench.harness.runner import execute
from fqtbench.method import Method
from fqtbench.nn import QConv2d, quant_layers
from fqtbench.records import load_record


def test_cost_ledger_counts_each_gemm_role_with_bits():
    info = type("I", (), dict(image_size=(8, 8), in_channels=1, num_classes=10, pixel_max=16, mean=(0.3,), std=(0.4,)))
    model = registry.models.get("cnn-s").build(info)
    from fqtbench.quant.attach import attach_standard
    from fqtbench.quant import GradQuantizer

    attach_standard(model, w_bits=4, a_bits=3, grad_input=lambda l: GradQuantizer(6), grad_weight=lambda l: GradQuantizer(5))
    x = torch.randint(0, 17, (5, 1, 8, 8), dtype=torch.uint8)
    with cost.tally() as t:
        model(x).sum().backward()
    # cnn-s: conv 1->16 on 8x8, conv 16->32 on 4x4, linear 128->10; batch 5
    macs = [5 * 64 * 16 * 9, 5 * 16 * 32 * 16 * 9, 5 * 128 * 10]
    assert t.macs["fwd"] == sum(macs) and t.bitops["fwd"] == sum(macs) * 4 * 3
    assert t.macs["grad_input"] == sum(macs[1:])  # the first layer needs no input gradient
    assert t.bitops["grad_input"] == sum(macs[1:]) * 6 * 4
    assert t.bitops["grad_weight"] == sum(macs) * 5 * 3
    with cost.tally() as t2:  # an fp32 forward counts 32x32
        model.eval()
        for _, l in quant_layers(model):
            l.set_quant(None)
        model(x)
    assert t2.bitops["fwd"] == sum(macs) * 32 * 32


class _Counter(Method):
    """A gradient-free method that only counts generations."""

    name, version, description, uses_gradients = "gf-count-test", "1", "counts", False

    def build(self, model, cfg, data):
        class M(GradientFreeModule):
            def __init__(self):
                super().__init__(cfg)
                self.model = model
                self.generations = 0

            def generation(self, batch, batch_idx):
                self.generations += 1
                return {"best": 1.0}

        return M()

    def export(self, module, cfg, data):
        return None


def test_gradient_free_module_advances_global_step_and_honours_max_steps(tmp_path):
    m = _Counter()
    registry.methods.register(m)
    try:
        cfg = resolve("gf-count-test", overrides=["trainer.max_steps=7", "trainer.max_epochs=100", f"out={tmp_path}"])
        data = registry.datasets.get("digits").build(cfg.data, 0)
        model = registry.models.get("cnn-s").build(data.info)
        module = m.build(model, cfg, data)
        trainer = pl.Trainer(max_steps=7, max_epochs=100, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                             callbacks=[CostMeter()], limit_val_batches=0)
        trainer.fit(module, datamodule=data)
        assert trainer.global_step == 7 and module.generations == 7
    finally:
        registry.methods.unregister(m.name)


def _final_weights(record_path):
    ckpt = torch.load(record_path.parent / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items()}


from fqtbench_baselines.qat import QATConfig  # noqa: E402


class _StopOnce(Method):
    """qat that raises KeyboardInterrupt at the start of epoch `stop_epoch` while `armed`."""

    name, version, description = "qat-stop-test", "1", "qat, interrupted once"
    Config = QATConfig
    armed = True
    stop_epoch = 2

    def build(self, model, cfg, data):
        from fqtbench_baselines.qat import METHOD as QAT

        module = QAT.build(model, cfg, data)
        outer, step = self, module.training_step

        def training_step(batch, batch_idx):
            if outer.armed and module.current_epoch == outer.stop_epoch:
                raise KeyboardInterrupt
            return step(batch, batch_idx)

        module.training_step = training_step
        return module


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    import signal

    from fqtbench.harness.runner import RunInterrupted

    m = _StopOnce()
    registry.methods.register(m)
    handler = signal.getsignal(signal.SIGINT)
    try:
        common = ["bits.w=4", "bits.a=4", "trainer.max_epochs=4"]
        m.armed = False
        full, path_full = execute(resolve("qat-stop-test", overrides=common, out=str(tmp_path / "full")))
        m.armed = True
        try:
            execute(resolve("qat-stop-test", overrides=common, out=str(tmp_path / "part")))
            raise AssertionError("the run was not interrupted")
        except RunInterrupted:
            pass
        signal.signal(signal.SIGINT, handler)
        (part_dir,) = (tmp_path / "part").iterdir()
        part = load_record(part_dir)
        assert part.status == "interrupted"
        assert 0 < part.training_cost["steps"] < full.training_cost["steps"]  # what it spent before the stop
        m.armed = False
        resumed, path_resumed = execute(resolve("qat-stop-test", overrides=[f"resume={part_dir}"]))
    finally:
        signal.signal(signal.SIGINT, handler)
        registry.methods.unregister(m.name)
    assert path_resumed.parent == part_dir and resumed.status == "ok"
    a, b = _final_weights(path_full), _final_weights(path_resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.metrics["final"] == full.metrics["final"]
    assert resumed.training_cost["samples"] == full.training_cost["samples"]
    assert resumed.training_cost["train_bitops"] == full.training_cost["train_bitops"]


def test_quant_layers_cover_every_conv():
    info = type("I", (), dict(image_size=(32, 32), in_channels=3, num_classes=10, pixel_max=255, mean=(0.5,) * 3, std=(0.25,) * 3))
    model = registry.models.get("resnet20").build(info)
    assert sum(isinstance(m, QConv2d) for m in model.modules()) == sum(isinstance(l, QConv2d) for _, l in quant_layers(model))
