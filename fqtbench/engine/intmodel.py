"""IntModel: an integer-only network, a list of nodes run on a shared integer backend.

Activations flow channels-last as plain (N, H, W, C) integer tensors. Every node creates integer
tensors only: codes, int32/int64 accumulators, fixed-point requantization, integer pooling. The
model is plain data -- integer tensors plus a JSON description -- so it saves with ``torch.save``
and loads with ``torch.load(weights_only=True)``; nothing is unpickled.

Nodes read the outputs of earlier nodes by index (``inputs``). :meth:`IntModel.forward` can start
from cached outputs; :meth:`IntModel.forward_population` evaluates P variants of one layer (its
weight codes, biases, and the multipliers of a later requantization) in one pass, as CC-EA does,
optionally from the kept activations of :meth:`IntModel.activations` on the same batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import cost
from .intrange import IntRange
from .requant import FixedPoint, add_requantize, requantize

SPEC_VERSION = 2  # 2: conv/linear nodes may carry `frac` fractional accumulator bits; 1 reads as frac 0


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


@dataclass
class Node:
    """One integer operation. `tensors` hold its integer parameters; `attrs` plain JSON values."""

    op: str
    inputs: list[int]
    attrs: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)

    # ---- per-op execution -------------------------------------------------------------------
    def run(self, xs: list[Tensor], backend, weight: Tensor | None = None, prepared=None) -> Tensor:
        return getattr(self, f"_run_{self.op}")(xs, backend, weight, prepared)

    def _run_input(self, xs, backend, weight, prepared):
        x = xs[0]  # (N, C, H, W) integer pixels
        lut = self.tensors["lut"]  # (C, pixel_max + 1) integer codes
        c = lut.shape[0]
        idx = x.permute(0, 2, 3, 1).to(torch.int64).clamp(0, lut.shape[1] - 1)
        return lut[torch.arange(c, device=x.device), idx]

    def _gemm_weight(self, weight: Tensor | None) -> Tensor:
        return self.tensors["weight"] if weight is None else weight

    def _run_conv(self, xs, backend, weight, prepared):
        a = self.attrs
        pw = prepared if prepared is not None else backend.prepare_weight(self._gemm_weight(weight), IntRange(*a["w_range"]))
        acc = backend.conv2d(xs[0], pw, IntRange(*a["x_range"]), stride=a["stride"], padding=a["padding"], dilation=a["dilation"])
        return _add_bias(acc, self.tensors.get("bias"), a.get("frac", 0), a.get("acc_bound", 2**63))

    def _run_linear(self, xs, backend, weight, prepared):
        a = self.attrs
        pw = prepared if prepared is not None else backend.prepare_weight(self._gemm_weight(weight), IntRange(*a["w_range"]))
        acc = backend.linear(xs[0], pw, IntRange(*a["x_range"]))
        return _add_bias(acc, self.tensors.get("bias"), a.get("frac", 0), a.get("acc_bound", 2**63))

    def _run_requant(self, xs, backend, weight, prepared):
        fp = FixedPoint(self.tensors["m"], self.tensors["shift"])
        lo, hi = self.attrs["lo"], self.attrs["hi"]
        return requantize(xs[0], fp, lo, hi, out_dtype=_dtype(lo, hi))

    def _run_add(self, xs, backend, weight, prepared):
        """clamp(round(a*Ma + b*Mb)): both terms kept with `guard` extra fractional bits, then rounded."""
        fa = FixedPoint(self.tensors["m_a"], self.tensors["shift_a"])
        fb = FixedPoint(self.tensors["m_b"], self.tensors["shift_b"])
        lo, hi = self.attrs["lo"], self.attrs["hi"]
        return add_requantize(xs[0], fa, xs[1], fb, self.attrs["guard"], lo, hi, out_dtype=_dtype(lo, hi))

    def _run_maxpool(self, xs, backend, weight, prepared):
        """Max over windows of codes. int8/uint8 codes are pooled as int16 (exact): torch's integer
        max_pool2d refuses a plane of more elements than the dtype's largest value (C*H*W > 127)."""
        a = self.attrs
        x = xs[0].permute(0, 3, 1, 2)
        narrow = x.dtype in (torch.int8, torch.uint8)
        y = F.max_pool2d(x.to(torch.int16) if narrow else x, a["kernel"], a["stride"], a["padding"])
        return y.to(x.dtype).permute(0, 2, 3, 1).contiguous()

    def _run_avgpool(self, xs, backend, weight, prepared):
        """Global average (N, H, W, C) -> (N, C): integer sum over H, W, then a fixed-point divide
        (the multiplier holds 1/(H*W))."""
        s = xs[0].to(torch.int64).sum(dim=(1, 2))
        fp = FixedPoint(self.tensors["m"], self.tensors["shift"])
        lo, hi = self.attrs["lo"], self.attrs["hi"]
        return requantize(s, fp, lo, hi, out_dtype=_dtype(lo, hi))

    def _run_shortcut_a(self, xs, backend, weight, prepared):
        s, pad = self.attrs["stride"], self.attrs["pad"]
        x = xs[0][:, ::s, ::s, :]
        return F.pad(x, (pad // 2, pad - pad // 2)).contiguous()

    def _run_flatten(self, xs, backend, weight, prepared):
        return xs[0].reshape(xs[0].shape[0], -1)

    # ---- cost -------------------------------------------------------------------------------
    def macs(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
        if self.op == "conv":
            n, ho, wo, cout = out_shape
            kh, kw = self.attrs["kernel"]
            return int(n * ho * wo * cout * self.attrs["cin"] * kh * kw)
        if self.op == "linear":
            return int(out_shape[0] * out_shape[1] * self.attrs["cin"])
        return 0


def _dtype(lo: int | None, hi: int | None) -> torch.dtype:
    if lo is None or hi is None:
        return torch.int64
    if -128 <= lo and hi <= 127:
        return torch.int8
    if 0 <= lo and hi <= 255:
        return torch.uint8
    if -(2**15) <= lo and hi < 2**15:
        return torch.int16
    if -(2**31) <= lo and hi < 2**31:
        return torch.int32
    return torch.int64


def _add_bias(acc: Tensor, bias: Tensor | None, frac: int, bound: int) -> Tensor:
    """acc * 2^frac + bias (the bias carries `frac` fractional accumulator bits), in place and in
    int32 when the export-time bound of the result allows it."""
    if bias is None and not frac:
        return acc
    if not (acc.dtype == torch.int32 and bound <= 2**31 - 1):
        acc = acc.to(torch.int64)
    if frac:
        acc = acc.bitwise_left_shift_(frac)
    return acc.add_(bias.to(acc.dtype)) if bias is not None else acc


class IntModel:
    """An exported integer network (see module docstring)."""

    def __init__(self, nodes: list[Node], meta: dict[str, Any]):
        self.nodes = nodes
        self.meta = meta  # input shape, layer table, ...
        self._prepared: dict[tuple[str, int], Any] = {}

    # ---- inference --------------------------------------------------------------------------
    @property
    def gemm_nodes(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.op in ("conv", "linear")]

    def prepared(self, backend, i: int):
        key = (backend.name, i)
        if key not in self._prepared:
            node = self.nodes[i]
            self._prepared[key] = backend.prepare_weight(node.tensors["weight"], IntRange(*node.attrs["w_range"]))
        return self._prepared[key]

    def forward(
        self,
        x: Tensor,
        backend,
        *,
        start: int = 0,
        cache: list[Tensor | None] | None = None,
        keep: set[int] | None = None,
        cost_role: str | None = None,
    ) -> Tensor:
        """Integer logits (N, classes) for integer pixels `x` (N, C, H, W).

        `start`/`cache`: resume at node `start` with the outputs of earlier nodes given in `cache`
        (`x` is then ignored unless node 0 runs). `keep`: indices whose outputs are written back
        into `cache`. `cost_role`: report GEMM MACs to the cost ledger under this role.
        """
        outs: list[Tensor | None] = list(cache) if cache is not None else [None] * len(self.nodes)
        if len(outs) < len(self.nodes):
            outs += [None] * (len(self.nodes) - len(outs))
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            xs = [x] if node.op == "input" else [outs[j] for j in node.inputs]
            y = self._run_node(i, node, xs, backend, cost_role)
            outs[i] = y
            if cache is not None and keep is not None and i in keep:
                cache[i] = y
            # free what no later node reads
            for j in node.inputs:
                if j not in (keep or ()) and self._last_use[j] == i:
                    outs[j] = None
        return outs[-1]

    @property
    def _last_use(self) -> dict[int, int]:
        if not hasattr(self, "_last_use_cache"):
            last: dict[int, int] = {}
            for i, n in enumerate(self.nodes):
                for j in n.inputs:
                    last[j] = i
            self._last_use_cache = last
        return self._last_use_cache

    @property
    def reusable(self) -> set[int]:
        """Outputs a later pass starting at some GEMM node can read (what :meth:`activations` keeps):
        node j's output is reusable if a node at or after a GEMM k > j reads it, and the logits are."""
        if not hasattr(self, "_reusable_cache"):
            gemms = self.gemm_nodes
            keep = {len(self.nodes) - 1}
            for j, last in self._last_use.items():
                if any(j < k <= last for k in gemms):
                    keep.add(j)
            self._reusable_cache = keep
        return self._reusable_cache

    def activations(self, x: Tensor, backend, *, cost_role: str | None = None) -> list[Tensor | None]:
        """One forward pass that keeps every reusable output (the logits last): the prefix that
        :meth:`forward_population` and :meth:`refresh` start from, so that work on an unchanged
        batch is not repeated."""
        acts: list[Tensor | None] = [None] * len(self.nodes)
        self.forward(x, backend, cache=acts, keep=self.reusable, cost_role=cost_role)
        return acts

    def refresh(self, acts: list[Tensor | None], backend, node: int, *, cost_role: str | None = None) -> None:
        """Recompute `acts` (from :meth:`activations`) in place from node `node` on, after that
        node's parameters (or a later node's) changed; the outputs before it are reused."""
        if self.nodes[node].op == "input":
            raise ValueError("refresh from a node after the input; run activations() on the batch instead")
        self.forward(None, backend, start=node, cache=acts, keep=self.reusable, cost_role=cost_role)

    def _run_node(self, i: int, nd: Node, xs: list[Tensor], backend, cost_role: str | None, prepared=None) -> Tensor:
        """Node `nd` (at index i; a GEMM uses its prepared weight unless `prepared` is given), its
        MACs reported to the cost ledger under `cost_role`."""
        gemm = nd.op in ("conv", "linear")
        if gemm and prepared is None:
            prepared = self.prepared(backend, i)
        y = nd.run(xs, backend, prepared=prepared)
        if cost_role and gemm:
            cost.record(cost_role, nd.macs(tuple(xs[0].shape), tuple(y.shape)), nd.attrs["a_bits"], nd.attrs["w_bits"])
        return y

    def forward_population(self, x: Tensor, backend, node: int, weights: Tensor, *, biases: Tensor | None = None,
                           requant: tuple[int, Tensor] | None = None, cost_role: str | None = None,
                           prefix: list[Tensor | None] | None = None, chunk_rows: int = 256) -> Tensor:
        """Integer logits (P, N, classes) of P variants that differ in GEMM node `node`'s weights
        (P, *w.shape), optionally its integer biases (P, Cout), and optionally the per-channel
        multipliers of one later requantization node: `requant` = (index, (P, C) mantissas).

        One pass: the nodes before `node` run once on the batch (their outputs do not depend on the
        candidates); `node` runs one GEMM with the P weight tensors folded into its output-channel
        dimension; the rest of the network runs on candidate-major batches of about `chunk_rows`
        images (whole candidates each), with earlier outputs it reads (residual shortcuts) repeated
        per candidate. Chunking keeps the suffix's working set near a single batch's: one P*N batch
        would make it P times larger and slower per image than P separate passes.

        `prefix`: the outputs of :meth:`activations` (or :meth:`refresh`) on this batch `x`; the
        nodes before `node` are then not run at all -- nothing before `node` differs between
        candidates, nor between generations that keep the batch and change only `node` or later.
        """
        p = int(weights.shape[0])
        n = int(x.shape[0])
        if requant is not None and not (node < requant[0] < len(self.nodes) and self.nodes[requant[0]].op == "requant"):
            raise ValueError(f"requant node {requant[0]} must be a requantization after GEMM node {node}")
        outs: list[Tensor | None] = [None] * len(self.nodes)
        last = self._last_use
        if prefix is not None:
            outs[:node] = prefix[:node]
        else:
            for i in range(node):  # the shared prefix
                nd = self.nodes[i]
                outs[i] = self._run_node(i, nd, [x] if nd.op == "input" else [outs[j] for j in nd.inputs], backend, cost_role)
        nd = self.nodes[node]
        cout = int(nd.tensors["weight"].shape[0])
        pw = backend.prepare_weight(weights.reshape(p * cout, *weights.shape[2:]), IntRange(*nd.attrs["w_range"]))
        own_bias = nd.tensors.get("bias")
        bias = biases.reshape(p * cout) if biases is not None else (own_bias.repeat(p) if own_bias is not None else None)
        folded = Node(nd.op, nd.inputs, nd.attrs, {"bias": bias.to(torch.int64)} if bias is not None else {})
        y = self._run_node(node, folded, [outs[j] for j in nd.inputs], backend, cost_role, pw)  # (N, ..., P*Cout)
        spatial = y.shape[1:-1]
        y = y.reshape(n, *spatial, p, cout).movedim(-2, 0)  # (P, N, ..., Cout)
        shared = {j: outs[j] for j in range(node) if outs[j] is not None and last.get(j, -1) > node}
        per_chunk = max(1, chunk_rows // max(1, n))
        logits = []
        for a in range(0, p, per_chunk):
            b = min(p, a + per_chunk)
            c_outs: list[Tensor | None] = [None] * len(self.nodes)
            for j, t in shared.items():
                c_outs[j] = t.repeat(b - a, *([1] * (t.dim() - 1)))
            c_outs[node] = y[a:b].reshape((b - a) * n, *spatial, cout)
            for i in range(node + 1, len(self.nodes)):
                nd = self.nodes[i]
                xs = [c_outs[j] for j in nd.inputs]
                if requant is not None and i == requant[0]:  # each candidate's slice with its own multipliers
                    ms = requant[1]
                    c_outs[i] = torch.cat([Node(nd.op, nd.inputs, nd.attrs, {**nd.tensors, "m": ms[k]}).run([part], backend)
                                           for k, part in zip(range(a, b), xs[0].chunk(b - a, dim=0))])
                else:
                    c_outs[i] = self._run_node(i, nd, xs, backend, cost_role)
                for j in nd.inputs:
                    if last.get(j) == i:
                        c_outs[j] = None
            logits.append(c_outs[-1].reshape(b - a, n, -1))
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def predict(self, x: Tensor, backend) -> Tensor:
        return self.forward(x, backend).argmax(dim=1)

    @torch.no_grad()
    def evaluate(self, loader, backend) -> float:
        """Top-1 in percent on integer pixels from `loader`."""
        correct = total = 0
        for x, y in loader:
            correct += int((self.predict(x, backend) == y).sum())
            total += len(y)
        return 100.0 * correct / max(1, total)

    # ---- description --------------------------------------------------------------------------
    def layer_table(self) -> list[dict[str, Any]]:
        return list(self.meta.get("layers", []))

    def bitops_per_sample(self) -> int:
        return int(sum(l["macs"] * l["w_bits"] * l["a_bits"] for l in self.layer_table()))

    def macs_per_sample(self) -> int:
        return int(sum(l["macs"] for l in self.layer_table()))

    def size_bytes(self) -> float:
        """Weight storage at each layer's bit-width (scales and biases not counted)."""
        return float(sum(l["params"] * l["w_bits"] for l in self.layer_table()) / 8.0)

    # ---- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        spec = {
            "version": SPEC_VERSION,
            "meta": self.meta,
            "nodes": [{"op": n.op, "inputs": n.inputs, "attrs": n.attrs, "tensors": sorted(n.tensors)} for n in self.nodes],
        }
        tensors = {f"{i}.{k}": t.cpu() for i, n in enumerate(self.nodes) for k, t in n.tensors.items()}
        return {"spec": json.dumps(spec), "tensors": tensors}

    def save(self, path: str | Path) -> None:
        """Atomically: write a temporary file, then rename."""
        path = Path(path)
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(self.state(), tmp)
        tmp.replace(path)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "IntModel":
        spec = json.loads(state["spec"])
        if spec.get("version") not in (1, SPEC_VERSION):
            raise ValueError(f"IntModel spec version {spec.get('version')} is not supported (expected 1..{SPEC_VERSION})")
        tensors = state["tensors"]
        nodes = [
            Node(d["op"], list(d["inputs"]), dict(d["attrs"]), {k: tensors[f"{i}.{k}"] for k in d["tensors"]})
            for i, d in enumerate(spec["nodes"])
        ]
        return cls(nodes, spec["meta"])

    @classmethod
    def load(cls, path: str | Path) -> "IntModel":
        return cls.from_state(torch.load(path, map_location="cpu", weights_only=True))

    def clone(self) -> "IntModel":
        nodes = [Node(n.op, list(n.inputs), dict(n.attrs), {k: t.clone() for k, t in n.tensors.items()}) for n in self.nodes]
        return IntModel(nodes, json.loads(json.dumps(self.meta)))

    @property
    def device(self) -> torch.device:
        for n in self.nodes:
            for t in n.tensors.values():
                return t.device
        return torch.device("cpu")

    def to(self, device: torch.device | str) -> "IntModel":
        """Move every integer tensor to `device` (in place; returns self). Prepared weights are rebuilt."""
        device = torch.device(device)
        stray = any(t.device != device for n in self.nodes for t in n.tensors.values())
        if stray:  # every tensor is checked: one stored from elsewhere must not hide behind the first
            for n in self.nodes:
                n.tensors = {k: t.to(device) for k, t in n.tensors.items()}
            self._prepared = {}
        return self

    def set_weight(self, i: int, codes: Tensor) -> None:
        """Replace one GEMM node's weight codes (same shape and declared range)."""
        node = self.nodes[i]
        node.tensors["weight"] = codes
        self._prepared = {k: v for k, v in self._prepared.items() if k[1] != i}
