"""`fqtbench bench ccea`: CC-EA fitness evaluations per second, naive against batched + incremental.

Naive: one full integer forward pass per candidate. Batched + incremental: the context's
activations are kept (`IntModel.activations`), the candidates are folded into the active layer's
GEMM and run from there on (`IntModel.forward_population` with the kept prefix). Both produce
identical logits (checked here on every measured layer). Two fitness regimes: a fresh batch every
generation (the prefix is computed once per generation), and a kept batch (digits evaluates the
whole training split every generation: the prefix is computed once per change of the context).
Every GEMM layer is timed; the headline mixes the layers as the search picks them -- in proportion
to their number of weights (`SearchState.pick_layer` before any weight saturates) -- and a second
column weighs every layer equally. Where the active group sits decides the saving: a group late in
the network leaves a short suffix to run per candidate. The last column is that ceiling: the
speed-up if each candidate cost exactly one single-candidate pass from its layer on, so a reader can
tell an implementation short of its bound from a bound short of a target."""

from __future__ import annotations

import os
import socket

import torch
import typer

from . import bench_app
from .common import emit, shape_info, time_call



def quantized_int_model(name: str, bits: int = 4, seed: int = 0, n_calib: int = 64):
    """A PTQ IntModel of an (untrained) model, quantized as ccea's default start is (its default
    weight granularity): the timing does not depend on the weights' values."""
    from fqtbench_methods.ccea import CCEAConfig

    from .. import registry
    from ..engine.export import export_model
    from ..harness.module import calibrate_activations
    from ..quant.attach import attach_standard

    info = shape_info(name)
    torch.manual_seed(seed)
    model = registry.models.get(name).build(info)
    attach_standard(model, w_bits=bits, a_bits=bits, weight_granularity=CCEAConfig().weight_granularity)
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


def measure(name: str, backend, batch: int, pop: int, group: int, repeat: int) -> list[dict]:
    """Two rows: a fresh fitness batch every generation (cifar10-r20-cpu), and a kept one (digits:
    the whole training split every generation). Times are per generation of `pop` candidates (the
    context first) and mix the layers as the search picks them."""
    im, info = quantized_int_model(name)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, info.pixel_max + 1, (batch, info.in_channels, *info.image_size), dtype=torch.uint8, generator=g)
    pops = {node: candidates(im, node, pop, group, g) for node in im.gemm_nodes}
    _check_paths(im, backend, x[:8], pops)
    clones = {node: [_with_weight(im, node, w) for w in ws] for node, ws in pops.items()}
    kept = im.activations(x, backend)

    def fresh(node):  # the context's pass keeps its activations, the candidates run from them
        acts = im.activations(x, backend)
        im.forward_population(x, backend, node, pops[node][1:], prefix=acts)

    def held(node):  # the batch and its activations are kept; the context changed in `node` (upper bound)
        im.forward_population(x, backend, node, pops[node][1:], prefix=kept)
        im.refresh(kept, backend, node)

    timings = {
        "fresh": (lambda node: [c.forward(x, backend) for c in clones[node]], fresh),
        # naive remembers the context's fitness on a kept batch too
        "kept": (lambda node: [c.forward(x, backend) for c in clones[node][1:]], held),
    }
    share = {node: im.nodes[node].tensors["weight"].numel() for node in im.gemm_nodes}
    total = sum(share.values())
    # one candidate's passes, to bound what running candidates from their layer on can give at all
    t_forward = time_call(lambda: im.forward(x, backend), warmup=1, repeat=repeat)
    t_suffix = {n: time_call(lambda: im.refresh(kept, backend, n), warmup=1, repeat=repeat) for n in im.gemm_nodes}
    bounds = {  # (naive, best possible batched+incremental) seconds per generation at layer n
        "fresh": lambda n: (pop * t_forward, t_forward + (pop - 1) * t_suffix[n]),
        "kept": lambda n: ((pop - 1) * t_forward, pop * t_suffix[n]),
    }
    rows = []
    for regime, (naive, batched) in timings.items():
        t_naive = {n: time_call(lambda: naive(n), warmup=1, repeat=repeat) for n in im.gemm_nodes}
        t_batched = {n: time_call(lambda: batched(n), warmup=1, repeat=repeat) for n in im.gemm_nodes}
        naive_mix = sum(share[n] * t_naive[n] for n in share) / total  # seconds per generation, the search's mix
        batched_mix = sum(share[n] * t_batched[n] for n in share) / total
        bound_naive, bound_batched = (sum(share[n] * bounds[regime](n)[k] for n in share) / total for k in (0, 1))
        rows.append({
            "model": name,
            "fitness batch": regime,
            "batch": batch,
            "candidates": pop,
            "layers": len(im.gemm_nodes),
            "naive evals/s": pop / naive_mix,
            "batched+incremental evals/s": pop / batched_mix,
            "speed-up": naive_mix / batched_mix,
            "speed-up, layers uniform": sum(t_naive.values()) / sum(t_batched.values()),
            "suffix-only bound": bound_naive / bound_batched,
        })
    return rows


TARGET_SPEEDUP = 5.0  # issue 4: batched + incremental over naive, on resnet20


def _target_note(rows: list[dict]) -> str:
    """The target, and for each resnet20 regime measured whether this run meets it."""
    verdicts = [f"{r['fitness batch']} {r['speed-up']:.2f}x ({'met' if r['speed-up'] >= TARGET_SPEEDUP else 'not met'})"
                for r in rows if r["model"] == "resnet20"]
    return (f"target: batched+incremental >= {TARGET_SPEEDUP:g}x naive on resnet20"
            + (": " + ", ".join(verdicts) if verdicts else " (resnet20 not measured in this run)"))


def _check_paths(im, backend, x, pops) -> None:
    """Both paths give identical logits on every layer: the population pass with and without the
    kept prefix, and the kept activations refreshed after the context changes."""
    for node, ws in pops.items():
        naive = torch.stack([_with_weight(im, node, w).forward(x, backend) for w in ws[:2]])
        assert torch.equal(naive, im.forward_population(x, backend, node, ws[:2])), f"mismatch at node {node}"
        acts = im.activations(x, backend)
        assert torch.equal(naive, im.forward_population(x, backend, node, ws[:2], prefix=acts)), f"prefix mismatch at node {node}"
        changed = _with_weight(im, node, ws[1])
        changed.refresh(acts, backend, node)
        assert torch.equal(acts[-1], naive[1]), f"refresh mismatch at node {node}"


def _rank_worker(rank: int, world: int, port: int, name: str, backend_name: str, batch: int, pop: int, group: int,
                 repeat: int, threads: int, results) -> None:
    """One process of sharded CC-EA evaluation: every candidate on this rank's share of the batch
    (samples rank, rank+world, ...), then one all-reduce of the integer fitness terms, as
    `CCEAModule.sum_over_ranks` does in a run."""
    import torch.distributed as dist

    from fqtbench import registry
    from fqtbench_methods.ccea.search import fitness_terms

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(threads)
        be = registry.backends.get(backend_name)
        im, info = quantized_int_model(name)  # identical on every rank (fixed seeds)
        g = torch.Generator().manual_seed(0)
        x = torch.randint(0, info.pixel_max + 1, (batch, info.in_channels, *info.image_size), dtype=torch.uint8, generator=g)
        y = torch.randint(0, info.num_classes, (batch,), generator=g)
        pops = {node: candidates(im, node, pop, group, g) for node in im.gemm_nodes}
        xs, ys = x[rank::world], y[rank::world]

        def terms_of(xb, yb, node):
            return fitness_terms(im.forward_population(xb, be, node, pops[node]), yb, 32, "margin")

        def sharded(node):
            terms = terms_of(xs, ys, node)
            dist.all_reduce(terms)
            return terms

        def all_layers():
            for node in im.gemm_nodes:
                sharded(node)

        for node in (im.gemm_nodes[0], im.gemm_nodes[-1]):  # the shares add up to the whole batch exactly
            assert torch.equal(sharded(node), terms_of(x, y, node)), f"sharded fitness differs from the whole batch's at node {node}"
        dist.barrier()
        t = time_call(all_layers, warmup=1, repeat=repeat)
        if rank == 0:
            results.put(pop * len(im.gemm_nodes) / t)
    finally:
        dist.destroy_process_group()


def measure_ranks(name: str, backend_name: str, batch: int, pop: int, group: int, repeat: int, ranks: int, threads: int) -> dict:
    """Sharded evaluations per second with 1 and with `ranks` processes (`threads` torch threads each)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    rates = {}
    for world in (1, ranks):
        results = ctx.Queue()
        mp.start_processes(_rank_worker, args=(world, _free_port(), name, backend_name, batch, pop, group, repeat, threads, results),
                           nprocs=world, join=True, start_method="spawn")
        rates[world] = results.get()
    return {
        "model": name,
        "batch": batch,
        "candidates": pop,
        "threads/process": threads,
        "1 process evals/s": rates[1],
        f"{ranks} processes evals/s": rates[ranks],
        "speed-up": rates[ranks] / rates[1],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_weight(im, node, w):
    c = im.clone()
    c.set_weight(node, w)
    return c


@bench_app.command("ccea")
def bench_ccea(
    models: str = typer.Option("cnn-s,resnet20", help="Comma-separated: cnn-s, resnet20."),
    backend: str = typer.Option("int8", help="Integer backend."),
    batch: int = typer.Option(256, min=1, help="Mini-batch of one fitness evaluation."),
    pop: int = typer.Option(9, min=2, help="Candidates per generation (pop_size + the context)."),
    group: int = typer.Option(32, min=1, help="Weights per active group."),
    repeat: int = typer.Option(3, min=1, help="Timed repetitions (median)."),
    threads: int = typer.Option(0, min=0, help="torch threads (0: torch's default; with --ranks: per process, default 1)."),
    ranks: int = typer.Option(1, help="With N > 1: sharded evaluation (each process takes its share of the "
                                      "mini-batch) on 1 and on N processes, instead of naive vs batched."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
):
    """Fitness evaluations per second: naive (full forward per candidate) vs batched + incremental,
    or with --ranks N, batched + incremental on 1 process vs N processes (torch.distributed, gloo)."""
    from .. import registry
    from ..errors import UserError

    be = registry.backends.get(backend)
    names = [m.strip() for m in models.split(",") if m.strip()]
    for m in names:
        shape_info(m)
    if ranks < 1:
        raise UserError(f"--ranks={ranks}: must be at least 1")
    if ranks > 1:
        rows = [measure_ranks(m, backend, batch, pop, group, repeat, ranks, threads or 1) for m in names]
        emit(f"CC-EA sharded fitness evaluation: 1 vs {ranks} processes", rows, json_out,
             notes=[f"each process evaluates every candidate on 1/{ranks} of the batch, then all-reduces the "
                    "integer fitness terms; expect at most ~Nx, and only with N free cores",
                    "sharded fitness checked identical to the whole batch's"])
        return
    if threads:
        torch.set_num_threads(threads)
    rows = [row for m in names for row in measure(m, be, batch, pop, group, repeat)]
    emit("CC-EA fitness evaluation throughput", rows, json_out,
         notes=[_target_note(rows),
                "both paths checked bit-identical on every layer (also from kept activations, and after a refresh)",
                "fitness batch fresh (a new one every generation, as on cifar10-r20-cpu): naive runs every candidate "
                "and the context in full; batched+incremental runs the context once, keeping its activations, and "
                "each candidate from its layer on",
                "fitness batch kept (the same every generation, as on digits: the whole training split): neither "
                "path re-runs the context; batched+incremental recomputes it from the searched layer on after "
                "every generation (as if each improved: an upper bound)",
                "evals/s and speed-up: layers mixed as the search picks them (in proportion to their weights); "
                "'layers uniform': every layer weighted equally",
                "suffix-only bound: the speed-up if every candidate cost exactly one pass of the network from its "
                "layer on (timed on one candidate) and the context one full pass (fresh) or one such pass (kept); "
                "batching and prefix reuse cannot beat it by more than the GEMM's better use of a larger batch"])
