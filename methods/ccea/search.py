"""The CC-EA search state and operators, in integer arithmetic only.

For every weight of every GEMM layer the estimation-of-distribution model keeps **integer counts**
over a window of allowed codes (its layer's code range, optionally restricted to ``radius`` levels
around the starting code). A variable's *confidence* is the count of its most likely code.

With ``bias_radius`` set, each conv layer's vector of variables also holds one integer *bias
offset* per output channel (codes -bias_radius..bias_radius around the start): the channel's
integer bias is ``bias0 + offset * bias_step``, where ``bias_step`` is a quarter of one output
code of the node that consumes the conv, in accumulator units. These variables live in the same
count table (wider windows are padded with zero counts) and are grouped like weights.

With ``scale_radius`` set, a GEMM whose output goes straight into a requantization also holds one
*scale offset* per output channel: the requantization multiplier of that channel becomes
``m0 + offset * m_step`` with ``m_step = m0 / 16`` (integer), i.e. a per-channel activation scale
moved in steps of 1/16 -- what a low-bit activation loses to one max-calibrated range per tensor.

One generation (= one cooperative-coevolution cycle):

1. pick a layer, with probability proportional to its number of still-searching weights;
2. group: take ``group_size`` weights of that layer -- the least confident ones (``confidence``),
   random ones (``random``) or the next fixed block (``layer``, static decomposition);
3. sample ``pop_size`` candidates for the group from the counts; all other weights stay at the
   context vector (the current best solution), which is evaluated alongside as candidate 0;
4. rank by integer fitness on the same mini-batch, keep ``elite``;
5. counts of the group decay by 1/2^decay_shift and gain ``lr`` per elite vote;
6. the context takes the best candidate's codes when its fitness is strictly higher.

Weights whose confidence reaches ``saturation`` drop out of the search; every ``regroup_every``
generations all counts are halved, which brings them back.

Random numbers come from one ``torch.Generator`` (integer draws only) saved with the state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fqtbench.engine.requant import INT64_SAFE_BITS


@dataclass
class LayerState:
    """EDA model of one GEMM layer's variables: its weights (flattened), then its bias offsets."""

    node: int  # index of the GEMM node in the IntModel
    name: str
    shape: tuple[int, ...]  # weight shape
    base: Tensor  # (n,) int64: code of window slot 0 for each variable
    counts: Tensor  # (n, L) int32: counts over window slots; slots outside a variable's range are always 0
    bias0: Tensor | None = None  # (Cout,) int64 starting bias, when the biases are searched
    bias_step: Tensor | None = None  # (Cout,) int64 accumulator units per bias code
    scale_node: int | None = None  # the requantization node whose per-channel multipliers are searched
    m0: Tensor | None = None  # (Cout,) int64 starting multipliers
    m_step: Tensor | None = None  # (Cout,) int64 multiplier change per scale code
    cursor: int = 0  # next block for static ("layer") grouping

    @property
    def n_weights(self) -> int:
        return math.prod(self.shape)

    @property
    def n_biases(self) -> int:
        return 0 if self.bias0 is None else int(self.bias0.numel())

    @property
    def n(self) -> int:
        return int(self.base.numel())

    def confidence(self) -> Tensor:
        return self.counts.amax(dim=1)


@dataclass
class SearchConfig:
    pop_size: int
    elite: int
    group_size: int
    lr: int
    prior: int
    start_count: int
    decay_shift: int
    saturation: int
    regroup_every: int
    radius: int | None
    grouping: str  # confidence | random | layer
    bias_radius: int | None = None  # search conv biases within +-bias_radius steps; None: weights only
    scale_radius: int | None = None  # search requantization multipliers within +-scale_radius steps of m0/16


@dataclass
class SearchState:
    layers: list[LayerState]
    generator: torch.Generator
    generation: int = 0
    history: list[dict] = field(default_factory=list)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls, model, cfg: SearchConfig, seed: int) -> "SearchState":
        """Counts peaked at the model's current codes: `start_count` there, `prior` elsewhere in the window."""
        layers = []
        for node in model.gemm_nodes:
            nd = model.nodes[node]
            lo, hi = (int(v) for v in nd.attrs["w_range"])
            w = nd.tensors["weight"].reshape(-1).to(torch.int64)
            if cfg.radius is None:  # the whole code range
                base, width = torch.full_like(w, lo), hi - lo + 1
            else:
                base, width = w - cfg.radius, 2 * cfg.radius + 1
            # per variable: window base, starting code, window width, code range; weights first
            groups = [(base, w, torch.full_like(w, width), torch.full_like(w, lo), torch.full_like(w, hi))]
            bias0 = step = None
            if cfg.bias_radius is not None and nd.op == "conv":
                step = bias_step(model, node)
                bias0 = nd.tensors["bias"].to(torch.int64).clone()
                groups.append(_offset_variables(bias0.numel(), cfg.bias_radius))
            scale_node = m0 = m_step = None
            rq = requant_consumer(model, node) if cfg.scale_radius is not None else None
            if rq is not None and _scales_fit(model, node, rq, cfg.scale_radius):
                cout = int(nd.tensors["weight"].shape[0])
                scale_node = rq
                m0 = model.nodes[rq].tensors["m"].to(torch.int64).expand(cout).clone()
                m_step = (m0.abs() >> 4).clamp_min(1)
                groups.append(_offset_variables(cout, cfg.scale_radius))
            base, start, span, lo_v, hi_v = (torch.cat(parts) for parts in zip(*groups))
            offset = torch.arange(int(span.max()), dtype=torch.int64)[None, :]
            slots = base[:, None] + offset
            valid = (offset < span[:, None]) & (slots >= lo_v[:, None]) & (slots <= hi_v[:, None])
            counts = torch.where(valid, torch.full_like(slots, cfg.prior), torch.zeros_like(slots))
            counts[slots == start[:, None]] = cfg.start_count
            layers.append(LayerState(node, nd.attrs.get("name", str(node)), tuple(nd.tensors["weight"].shape),
                                     base, counts.to(torch.int32), bias0, step, scale_node=scale_node, m0=m0, m_step=m_step))
        g = torch.Generator().manual_seed(int(seed))
        return cls(layers, g)

    def context(self, model, li: int) -> Tensor:
        """(n,) int64: the current codes of layer `li`'s variables in `model` (weights, then bias
        offsets, then scale offsets)."""
        layer = self.layers[li]
        nd = model.nodes[layer.node]
        parts = [nd.tensors["weight"].reshape(-1).to("cpu", torch.int64)]  # the search state lives on the CPU
        if layer.bias0 is not None:
            parts.append((nd.tensors["bias"].to("cpu", torch.int64) - layer.bias0) // layer.bias_step)
        if layer.scale_node is not None:
            m = model.nodes[layer.scale_node].tensors["m"].to("cpu", torch.int64).expand_as(layer.m0)
            parts.append((m - layer.m0) // layer.m_step)
        return torch.cat(parts)

    def split(self, li: int, codes: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Candidate codes (P, n) -> weight codes (P, *shape), integer biases (P, Cout) or None, and
        requantization multipliers (P, Cout) or None."""
        layer = self.layers[li]
        k, nb = layer.n_weights, layer.n_biases
        weights = codes[:, :k].reshape(codes.shape[0], *layer.shape)
        biases = ms = None
        if layer.bias0 is not None:
            biases = layer.bias0[None, :] + codes[:, k:k + nb] * layer.bias_step[None, :]
        if layer.scale_node is not None:
            ms = layer.m0[None, :] + codes[:, k + nb:] * layer.m_step[None, :]
        return weights, biases, ms

    # ---- one generation: the parts -------------------------------------------------------------
    def searching(self, layer: LayerState, cfg: SearchConfig) -> Tensor:
        """Mask of weights still in the search (confidence below saturation)."""
        return layer.confidence() < cfg.saturation

    def pick_layer(self, cfg: SearchConfig) -> int:
        """A layer index, with probability proportional to its number of searching variables."""
        sizes = torch.tensor([int(self.searching(l, cfg).sum()) for l in self.layers], dtype=torch.int64)
        if int(sizes.sum()) == 0:  # everything saturated: regroup now
            self.regroup()
            sizes = torch.tensor([l.n for l in self.layers], dtype=torch.int64)
        r = int(torch.randint(0, int(sizes.sum()), (1,), generator=self.generator))
        return int((torch.cumsum(sizes, 0) <= r).sum())

    def group(self, li: int, cfg: SearchConfig) -> Tensor:
        """Indices (flat) of the active sub-problem within layer `li`."""
        layer = self.layers[li]
        g = min(cfg.group_size, layer.n)
        if cfg.grouping == "layer":  # static decomposition: fixed consecutive blocks, in turn
            idx = (torch.arange(g, dtype=torch.int64) + layer.cursor) % layer.n
            layer.cursor = (layer.cursor + g) % layer.n
            return idx
        noise = torch.randint(0, 1 << 20, (layer.n,), generator=self.generator, dtype=torch.int64)
        if cfg.grouping == "random":
            key = noise
        else:  # confidence: least confident first, ties broken at random
            key = layer.confidence().to(torch.int64) * (1 << 20) + noise
        key = torch.where(self.searching(layer, cfg), key, key + (1 << 62))  # saturated weights last
        return torch.argsort(key)[:g]

    def sample(self, li: int, idx: Tensor, pop: int) -> Tensor:
        """(pop, G) codes drawn from the integer counts of the group (inverse-CDF on integers)."""
        layer = self.layers[li]
        counts = layer.counts[idx].to(torch.int64)  # (G, L)
        cdf = torch.cumsum(counts, dim=1)
        total = cdf[:, -1]  # > 0 always (the starting code keeps a count)
        r = torch.randint(0, 1 << 40, (pop, idx.numel()), generator=self.generator, dtype=torch.int64) % total[None, :]
        slot = (cdf[None, :, :] <= r[:, :, None]).sum(dim=2)
        return layer.base[idx][None, :] + slot

    def update(self, li: int, idx: Tensor, elite_codes: Tensor, cfg: SearchConfig) -> None:
        """Decay the group's counts, then add `lr` per elite vote."""
        layer = self.layers[li]
        c = layer.counts[idx].to(torch.int64)
        valid = c > 0
        c = c - (c >> cfg.decay_shift)
        slots = (elite_codes - layer.base[idx][None, :]).clamp(0, c.shape[1] - 1)  # (E, G)
        votes = torch.zeros_like(c)
        votes.scatter_add_(1, slots.t(), torch.full_like(slots.t(), cfg.lr))
        c = torch.where(valid, (c + votes).clamp_min(1), c)  # a valid slot never dies completely
        layer.counts[idx] = c.clamp_max(2**30).to(torch.int32)

    def regroup(self) -> None:
        """Halve every count (keeping valid slots >= 1): saturated weights re-enter the search."""
        for layer in self.layers:
            c = layer.counts
            layer.counts = torch.where(c > 0, (c >> 1).clamp_min(1), c)

    # ---- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "generation": self.generation,
            "rng": self.generator.get_state(),
            "counts": [l.counts for l in self.layers],
            "cursor": [l.cursor for l in self.layers],
            "history": list(self.history),
        }

    def load_state_dict(self, d: dict) -> None:
        self.generation = int(d["generation"])
        self.generator.set_state(d["rng"])
        for l, c, k in zip(self.layers, d["counts"], d["cursor"]):
            l.counts = c.clone()
            l.cursor = int(k)
        self.history = list(d["history"])


def _offset_variables(n: int, k: int) -> tuple[Tensor, ...]:
    """Window base, start, width, and range of `n` offset variables in -k..k that start at 0."""
    zero = torch.zeros(n, dtype=torch.int64)
    return zero - k, zero, zero + 2 * k + 1, zero - k, zero + k


def requant_consumer(model, node: int) -> int | None:
    """The requantization node that reads GEMM `node`'s output, if that is its only consumer and
    not the network's output (scaling the logits per class would buy margin, not accuracy)."""
    readers = [i for i, nd in enumerate(model.nodes) if node in nd.inputs]
    if len(readers) == 1 and model.nodes[readers[0]].op == "requant" and readers[0] != len(model.nodes) - 1:
        return readers[0]
    return None


def _scales_fit(model, node: int, rq: int, radius: int) -> bool:
    """Whether every reachable multiplier keeps accumulator x multiplier inside int64's safe range
    (one bit to spare for the accumulator growth a bias search may add)."""
    m = model.nodes[rq].tensors["m"].to(torch.int64).abs()
    m_max = int((m + radius * (m >> 4).clamp_min(1)).max())
    acc = int(model.nodes[node].attrs.get("acc_bound", 2**62))
    return acc.bit_length() + m_max.bit_length() <= INT64_SAFE_BITS - 1


def bias_step(model, node: int) -> Tensor:
    """(Cout,) accumulator units that move the consumer of GEMM `node` by a quarter of an output code.

    The consumer is a requantization (m, shift) or a residual add (m_a/shift_a or m_b/shift_b) whose
    multiplier is m * 2^-shift; a quarter code is 2^shift / (4 |m|) accumulator units (at least 1).
    """
    for nd in model.nodes:
        if node not in nd.inputs:
            continue
        if nd.op == "requant":
            m, shift = nd.tensors["m"], nd.tensors["shift"]
        elif nd.op == "add":
            key = "a" if nd.inputs[0] == node else "b"
            m, shift = nd.tensors[f"m_{key}"], nd.tensors[f"shift_{key}"]
        else:
            continue
        cout = int(model.nodes[node].tensors["weight"].shape[0])
        m = m.to(torch.int64).abs().clamp_min(1).expand(cout)
        shift = shift.to(torch.int64).expand(cout).clamp(0, 62)
        return ((torch.ones_like(m) << shift) // (4 * m)).clamp_min(1)
    raise ValueError(f"GEMM node {node} has no requantizing consumer: its bias cannot be searched")


def fitness_terms(logits: Tensor, y: Tensor, margin_clip: int, kind: str, target: Tensor | None = None) -> Tensor:
    """(P, 3) int64 per-candidate sums over the batch: correct predictions, clipped margins, and
    the L1 distance to `target`. Sums, so that the terms of a batch split across processes add up
    exactly to the terms of the whole batch (sharded CC-EA all-reduces them)."""
    logits = logits.to(torch.int64)
    p, n, c = logits.shape
    correct = (logits.argmax(dim=2) == y.view(1, n)).sum(dim=1)
    zero = torch.zeros_like(correct)
    if kind == "distill":
        return torch.stack([correct, zero, (logits - target.unsqueeze(0)).abs().sum(dim=(1, 2))], dim=1)
    yy = y.view(1, n, 1).expand(p, n, 1)
    true = logits.gather(2, yy).squeeze(2)
    other = logits.scatter(2, yy, torch.iinfo(torch.int64).min).amax(dim=2)
    margin = (true - other).clamp(-margin_clip, margin_clip).sum(dim=1)
    return torch.stack([correct, margin, zero], dim=1)


def fitness_from_terms(terms: Tensor, n: int, margin_clip: int, kind: str) -> tuple[Tensor, Tensor]:
    """Integer fitness (P,) and correct counts (P,) from the summed terms of a batch of `n` samples.

    `accuracy_margin`: correct predictions first, ties broken by the sum of clipped margins
    (true-class logit minus the largest other, clipped to +-margin_clip), packed into one int64.
    `margin`: the clipped-margin sum alone (an integer hinge surrogate of the loss).
    `distill`: minus the L1 distance to the integer logits of the 8-bit integer teacher on the
    same batch, on the candidates' logit scale.
    """
    correct, margin, l1 = terms.unbind(dim=1)
    if kind == "distill":
        return -l1, correct
    if kind == "margin":
        return margin, correct
    return correct * (2 * n * margin_clip + 1) + margin, correct


def fitness(logits: Tensor, y: Tensor, margin_clip: int, kind: str, target: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Integer fitness of each candidate: (fitness (P,), correct (P,)) for logits (P, N, C) on one batch."""
    terms = fitness_terms(logits, y, margin_clip, kind, target)
    return fitness_from_terms(terms, int(y.numel()), margin_clip, kind)
