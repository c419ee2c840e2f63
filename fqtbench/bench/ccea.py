"""`fqtbench bench ccea`: CC-EA fitness evaluations per second, naive against batched + incremental.

Naive: one full integer forward pass per candidate. Batched + incremental: the layers before the
active one run once, the candidates are folded into the active layer's GEMM, and the rest of the
network runs on the candidate-major batch (`IntModel.forward_population`). Both produce identical
logits (checked here on every measured layer). Every GEMM layer is visited in turn, as the search
does, so the ratio is an average over where the active group sits.
"""

from __future__ import annotations

import torch
import typer

from . import bench_app
from .common import emit, shape_info, time_call



def quantized_int_model(name: str, bits: int = 4, seed: int = 0, n_calib: int = 64):
    """A PTQ IntModel of an (untrained) model: the timing does not depend on the weights' values."""
    from .. import registry
    from ..engine.export import export_model
    from ..harness.module import calibrate_activations
    from ..quant.attach import attach_standard

    info = shape_info(name)
    torch.manual_seed(seed)
    model = registry.models.get(name).build(info)
    attach_standard(model, w_bits=bits, a_bits=bits, weight_granularity="channel")
    x = torch.randint(0, info.pixel_max + 1, (n_calib, info.in_channels, *info.image_size), dtype=torch.uint8)
    calibrate_activations(model, [(x, None)])
    return export_model(model, (info.in_channels, *info.image_size)), info


def candidates(im, node: int, pop: int, group: int, g: torch.Generator) -> torch.Tensor:
    w = im.nodes[node].tensors["weight"]
    lo, hi = im.nodes[node].attrs["w_range"]
    flat = w.reshape(1, -1).repeat(pop, 1)
    idx = torch.randperm(flat.shape[1], generator=g)[:group]
    flat[1:, idx] = torch.randint(lo, hi + 1, (pop - 1, idx.numel()), generator=g, dtype=torch.int64).to(flat.dtype)
    return flat.reshape(pop, *w.shape)


def measure(name: str, backend, batch: int, pop: int, group: int, repeat: int) -> dict:
    im, info = quantized_int_model(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, info.pixel_max + 1, (batch, info.in_channels, *info.image_size), dtype=torch.uint8, generator=g)
    pops = {node: candidates(im, node, pop, group, g) for node in im.gemm_nodes}
    for node, ws in pops.items():  # the two paths agree exactly
        naive = torch.stack([_with_weight(im, node, w).forward(x[:8], backend) for w in ws[:2]])
        assert torch.equal(naive, im.forward_population(x[:8], backend, node, ws[:2])), f"mismatch at node {node}"
    clones = {node: [_with_weight(im, node, w) for w in ws] for node, ws in pops.items()}

    def naive_all():
        for node in im.gemm_nodes:
            for c in clones[node]:
                c.forward(x, backend)

    def batched_all():
        for node in im.gemm_nodes:
            im.forward_population(x, backend, node, pops[node])

    evals = pop * len(im.gemm_nodes)
    t_naive = time_call(naive_all, warmup=1, repeat=repeat)
    t_batched = time_call(batched_all, warmup=1, repeat=repeat)
    return {
        "model": name,
        "batch": batch,
        "candidates": pop,
        "layers": len(im.gemm_nodes),
        "naive evals/s": evals / t_naive,
        "batched+incremental evals/s": evals / t_batched,
        "speed-up": t_naive / t_batched,
    }


def _with_weight(im, node, w):
    c = im.clone()
    c.set_weight(node, w)
    return c


@bench_app.command("ccea")
def bench_ccea(
    models: str = typer.Option("cnn-s,resnet20", help="Comma-separated: cnn-s, resnet20."),
    backend: str = typer.Option("int8", help="Integer backend."),
    batch: int = typer.Option(256, help="Mini-batch of one fitness evaluation."),
    pop: int = typer.Option(9, help="Candidates per generation (pop_size + the context)."),
    group: int = typer.Option(32, help="Weights per active group."),
    repeat: int = typer.Option(3, help="Timed repetitions (median)."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Fitness evaluations per second: naive (full forward per candidate) vs batched + incremental."""
    from .. import registry

    if threads:
        torch.set_num_threads(threads)
    be = registry.backends.get(backend)
    rows = [measure(m.strip(), be, batch, pop, group, repeat) for m in models.split(",") if m.strip()]
    emit("CC-EA fitness evaluation throughput", rows, json_out,
         notes=["target: batched+incremental >= 5x naive on resnet20", "both paths checked bit-identical on every layer"])
