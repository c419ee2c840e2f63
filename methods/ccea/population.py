"""Batched population evaluation when candidates differ in a GEMM node's weights *and* biases or
the multipliers of the requantization after it.

`IntModel.forward_population` substitutes per-candidate weights only; the bias and scale searches
need per-candidate integer biases and multipliers too. This is the same one-pass scheme -- the
prefix runs once, the node runs one GEMM with the candidates folded into its output channels, the
suffix runs on the candidate-major batch -- with the folded node's bias taken per candidate and the
requantization applied to each candidate's slice with its own multipliers. (If the engine's
`forward_population` grows such arguments, this module reduces to that call.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fqtbench import cost
from fqtbench.engine.intmodel import IntModel, Node
from fqtbench.engine.intrange import IntRange


def _run(im: IntModel, i: int, xs: list[Tensor], backend, cost_role: str | None, nd: Node | None = None, pw=None) -> Tensor:
    nd = nd if nd is not None else im.nodes[i]
    gemm = nd.op in ("conv", "linear")
    if gemm and pw is None:
        pw = im.prepared(backend, i)
    y = nd.run(xs, backend, prepared=pw)
    if cost_role and gemm:
        cost.record(cost_role, nd.macs(tuple(xs[0].shape), tuple(y.shape)), nd.attrs["a_bits"], nd.attrs["w_bits"])
    return y


def population_logits(im: IntModel, x: Tensor, backend, node: int, weights: Tensor, biases: Tensor | None,
                      scales: tuple[int, Tensor] | None = None, cost_role: str | None = None) -> Tensor:
    """Integer logits (P, N, classes) of P variants of GEMM node `node`: weights (P, *w.shape),
    integer biases (P, Cout) or None (the node's own bias for every candidate), and `scales`
    (requant node, (P, Cout) multipliers) or None (that node's own multipliers)."""
    if biases is None and scales is None:
        return im.forward_population(x, backend, node, weights, cost_role=cost_role)
    p, n = int(weights.shape[0]), int(x.shape[0])
    last = im._last_use
    outs: list[Tensor | None] = [None] * len(im.nodes)
    for i in range(node):  # the shared prefix
        nd = im.nodes[i]
        outs[i] = _run(im, i, [x] if nd.op == "input" else [outs[j] for j in nd.inputs], backend, cost_role)
    nd = im.nodes[node]
    cout = int(nd.tensors["weight"].shape[0])
    pw = backend.prepare_weight(weights.reshape(p * cout, *weights.shape[2:]), IntRange(*nd.attrs["w_range"]))
    bias = biases.reshape(p * cout) if biases is not None else nd.tensors["bias"].repeat(p)
    folded = Node(nd.op, nd.inputs, nd.attrs, {"bias": bias.to(torch.int64)})
    y = _run(im, node, [outs[j] for j in nd.inputs], backend, cost_role, folded, pw)  # (N, ..., P*Cout)
    spatial = y.shape[1:-1]
    outs[node] = y.reshape(n, *spatial, p, cout).movedim(-2, 0).reshape(p * n, *spatial, cout)
    for j in range(node):  # earlier outputs read after `node`: one copy per candidate
        if outs[j] is not None and last.get(j, -1) > node:
            outs[j] = outs[j].repeat(p, *([1] * (outs[j].dim() - 1)))
        else:
            outs[j] = None
    for i in range(node + 1, len(im.nodes)):
        nd = im.nodes[i]
        if scales is not None and i == scales[0]:
            outs[i] = _requant_per_candidate(nd, outs[nd.inputs[0]], scales[1])
        else:
            outs[i] = _run(im, i, [outs[j] for j in nd.inputs], backend, cost_role)
        for j in nd.inputs:
            if last.get(j) == i:
                outs[j] = None
    return outs[-1].reshape(p, n, -1)


def _requant_per_candidate(nd: Node, v: Tensor, ms: Tensor) -> Tensor:
    """The requantization `nd` of the candidate-major batch v (P*N, ..., C), candidate p with its
    own per-channel multipliers ms[p] (the node's shifts)."""
    p = int(ms.shape[0])
    parts = [Node(nd.op, nd.inputs, nd.attrs, {**nd.tensors, "m": ms[k]}).run([chunk], None)
             for k, chunk in enumerate(v.chunk(p, dim=0))]
    return torch.cat(parts, dim=0)
