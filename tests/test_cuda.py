"""Every backend and method on CUDA, where a GPU exists (skipped with the reason elsewhere)."""

from __future__ import annotations

import pytest
import torch

from fqtbench import registry

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none visible to torch here)"),
]


def _int_model():
    from fqtbench.bench.ccea import quantized_int_model

    return quantized_int_model("cnn-s", bits=4)


@pytest.mark.parametrize("backend", sorted(registry.backends.names()))
def test_every_backend_on_cuda_equals_the_cpu_result(backend):
    be = registry.backends.get(backend)
    im, info = _int_model()
    x = torch.randint(0, info.pixel_max + 1, (37, info.in_channels, *info.image_size), dtype=torch.uint8)
    want = im.forward(x, be)
    got = im.clone().to("cuda").forward(x.cuda(), be)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), want)


@pytest.mark.parametrize("method", sorted(registry.methods.names()))
def test_every_method_runs_on_cuda(method, cli, tmp_path):
    code, out, err = cli("run", "--method", method, "--out", str(tmp_path), "--set", "trainer.accelerator=cuda",
                         "--set", "trainer.max_steps=20", "--set", "trainer.progress=false")
    assert code == 0, err
    from conftest import only_record

    rec = only_record(tmp_path)
    assert rec.ok and rec.host["device"] != "cpu"


def test_ccea_searching_biases_and_scales_runs_on_cuda(cli, tmp_path):
    """The searched multipliers and biases are stored into the model on its device."""
    code, out, err = cli("run", "--method", "ccea", "--out", str(tmp_path), "--set", "trainer.accelerator=cuda",
                         "--set", "trainer.max_steps=60", "--set", "trainer.progress=false",
                         "--set", "ccea.search_biases=true", "--set", "ccea.search_scales=true")
    assert code == 0, err
    from conftest import only_record

    rec = only_record(tmp_path)
    assert rec.ok and rec.host["device"] != "cpu"
