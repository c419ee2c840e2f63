"""`fqtbench bench backends`: integer inference throughput on each backend against the fp32 model.

All in one process: for each model, the fp32 float network (eval mode, no grad) and its exported
IntModel on every backend, images/s at the same batch, their ratio, and the integer GOP/s achieved
against a large `torch._int_mm` GEMM timed in the same run (this machine's int8 ceiling).
"""

from __future__ import annotations

import copy

import torch
import typer

from . import bench_app
from .common import emit, shape_info, time_call


def int8_ceiling(m: int = 4096, k: int = 1024, n: int = 1024, repeat: int = 5) -> float:
    """GOP/s (2 ops per MAC) of one large int8 x int8 -> int32 GEMM."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (k, n), dtype=torch.int8, generator=g)
    t = time_call(lambda: torch._int_mm(a, b), warmup=2, repeat=repeat)
    return 2 * m * k * n / t / 1e9


def models_for(name: str, bits: int, batch: int):
    """(fp32 float model, IntModel, integer pixels) for one architecture."""
    from .. import registry
    from ..engine.export import export_model
    from ..harness.module import calibrate_activations
    from ..quant.attach import attach_standard

    info = shape_info(name)
    torch.manual_seed(0)
    float_model = registry.models.get(name).build(info).eval()
    q = copy.deepcopy(float_model)
    attach_standard(q, w_bits=bits, a_bits=bits)
    x = torch.randint(0, info.pixel_max + 1, (batch, info.in_channels, *info.image_size), dtype=torch.uint8)
    calibrate_activations(q, [(x[:64], None)])
    return float_model, export_model(q, (info.in_channels, *info.image_size)), x


@bench_app.command("backends")
def bench_backends(
    models: str = typer.Option("cnn-s,resnet20", help="Comma-separated: cnn-s, resnet20."),
    backends: str = typer.Option("int8,bitserial,reference", help="Backends to time."),
    bits: int = typer.Option(8, min=2, max=8, help="Weight and activation bits of the exported IntModel."),
    batch: int = typer.Option(256, min=1, help="Images per forward pass."),
    repeat: int = typer.Option(5, min=1, help="Timed repetitions (median)."),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Integer inference images/s per backend vs the fp32 model, and GOP/s vs the _int_mm ceiling."""
    from .. import registry

    if threads:
        torch.set_num_threads(threads)
    ceiling = int8_ceiling()
    rows = []
    for name in [m.strip() for m in models.split(",") if m.strip()]:
        float_model, im, x = models_for(name, bits, batch)
        with torch.no_grad():
            t_fp32 = time_call(lambda: float_model(x), warmup=1, repeat=repeat)
        macs = im.macs_per_sample() * batch
        rows.append({"model": name, "engine": "fp32 float", "images/s": batch / t_fp32, "vs fp32": 1.0,
                     "GOP/s": 2 * macs / t_fp32 / 1e9, "% of int8 ceiling": float("nan")})
        reference_logits = None
        for bname in [b.strip() for b in backends.split(",") if b.strip()]:
            be = registry.backends.get(bname)
            logits = im.forward(x, be)  # also prepares the weights once, outside the timing
            if reference_logits is None:
                reference_logits = logits
            assert torch.equal(logits, reference_logits), f"{bname} disagrees with {backends.split(',')[0]}"
            t = time_call(lambda: im.forward(x, be), warmup=0, repeat=repeat if bname != "reference" else 1)
            rows.append({"model": name, "engine": f"IntModel w{bits}a{bits} on {bname}", "images/s": batch / t,
                         "vs fp32": t_fp32 / t, "GOP/s": 2 * macs / t / 1e9, "% of int8 ceiling": 100 * 2 * macs / t / 1e9 / ceiling})
    emit(f"Integer inference throughput (batch {batch})", rows, json_out, notes=[
        f"int8 ceiling: torch._int_mm 4096x1024 @ 1024x1024 = {ceiling:.1f} GOP/s in this run",
        "target: int8 ResNet-20 >= 1.5x the fp32 model's images/s",
        "every backend's logits checked identical",
    ])
