"""The EBS search space: one meta weight per layer shared by every candidate bit-width.

Each searched layer keeps its single full-precision weight W (the *meta weight*). Candidate b sees
Q_b(W), and the layer computes with the strength-weighted mixture

    W_mix = sum_b softmax(alpha_w / tau)_b * Q_b(W)        x_mix = sum_b softmax(alpha_a / tau)_b * Q_b(x)

through ``layer.weight_fn`` / ``layer.input_fn``, so the strengths alpha are optimised directly by the
task loss and no per-candidate weight copy exists. The mixture is a custom autograd function that
saves only its input and recomputes the candidates in backward: its memory does not grow with the
number of candidates either.

The expected inference cost of a layer is MACs * E[b_w] * E[b_a] under the strengths' softmax (the
two choices are independent, so this is exactly E[b_w * b_a]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fqtbench.nn import BasicBlock, LayerQuant, QConv2d, QLayer, quant_layers
from fqtbench.quant import ActQuantizer, WeightQuantizer, signed_quantize, symmetric_quantize, unsigned_quantize
from fqtbench.quant.core import act_magnitude, act_qmax, track_running_max

Candidates = Callable[[Tensor], Iterator[Tensor]]


class _Mixture(torch.autograd.Function):
    """sum_b p_b * Q_b(x), straight-through to x (sum_b p_b = 1); dL/dp_b = <g, Q_b(x)>.

    The candidates are recomputed from x in backward instead of being stored."""

    @staticmethod
    def forward(ctx, x: Tensor, probs: Tensor, candidates: Candidates) -> Tensor:
        ctx.candidates = candidates
        ctx.save_for_backward(x)
        out = torch.zeros_like(x)
        for p, q in zip(probs, candidates(x)):
            out += p * q
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        (x,) = ctx.saved_tensors
        gp = torch.stack([(g * q).sum() for q in ctx.candidates(x)]) if ctx.needs_input_grad[1] else None
        return g, gp, None


@dataclass
class SearchState:
    """Settings every choice reads at forward time (set by the training module)."""

    temperature: float = 1.0
    gumbel: bool = False
    detach: bool = False  # bilevel: the training loss must not move the strengths


class Choice(nn.Module):
    """Strengths (logits) over candidate bit-widths, ascending."""

    def __init__(self, bits: list[int], state: SearchState):
        super().__init__()
        self.bits = tuple(sorted(bits))
        self.alpha = nn.Parameter(torch.zeros(len(self.bits)))
        self.state = state

    def log_probs(self) -> Tensor:
        """Deterministic log-softmax of the strengths (no noise): the expected cost and the decision."""
        return F.log_softmax(self.alpha / self.state.temperature, dim=0)

    def mixing_probs(self) -> Tensor:
        """The weights of the mixture in the forward pass (Gumbel noise in training when enabled)."""
        a = self.alpha.detach() if self.state.detach else self.alpha
        if self.state.gumbel and self.training:
            u = torch.rand_like(a).clamp(1e-9, 1 - 1e-9)
            a = a - torch.log(-torch.log(u))
        return F.softmax(a / self.state.temperature, dim=0)

    def expected_bits(self) -> Tensor:
        return (self.log_probs().exp() * torch.tensor(self.bits, dtype=self.alpha.dtype, device=self.alpha.device)).sum()

    def argmax(self) -> int:
        return int(self.alpha.detach().argmax())


class WeightChoice(Choice):
    """Symmetric signed weight codes of the shared meta weight at every candidate width."""

    def __init__(self, bits: list[int], state: SearchState, granularity: str):
        super().__init__(bits, state)
        self.granularity = granularity

    def mix(self, w: Tensor) -> Tensor:
        return _Mixture.apply(w, self.mixing_probs(), self._candidates)

    def _candidates(self, w: Tensor) -> Iterator[Tensor]:
        for b in self.bits:
            yield symmetric_quantize(w, b, self.granularity).dequant()


class ActChoice(Choice):
    """Per-tensor activation codes at every candidate width from one range shared by all candidates:
    the batch maximum in training, tracked in an EMA that evaluation uses (as ActQuantizer does)."""

    def __init__(self, bits: list[int], state: SearchState, signed: bool, momentum: float = 0.1):
        super().__init__(bits, state)
        self.signed = bool(signed)
        self.momentum = momentum
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def qmax(self, bits: int) -> int:
        """The same code range as ActQuantizer, so the retrained quantizer continues the search's."""
        return act_qmax(bits, self.signed)

    def mix(self, x: Tensor) -> Tensor:
        m = self._range(x.detach())
        quantize = signed_quantize if self.signed else unsigned_quantize

        def candidates(t: Tensor) -> Iterator[Tensor]:
            for b in self.bits:
                yield quantize(t, b, (m / self.qmax(b)).clamp_min(1e-12)).dequant()

        return _Mixture.apply(x, self.mixing_probs(), candidates)

    def _range(self, xd: Tensor) -> Tensor:
        if not self.training:
            return self.running_max
        m = act_magnitude(xd, self.signed).amax()
        track_running_max(self.running_max, self.initialized, m, self.momentum)
        return m

    def quantizer(self, bits: int) -> ActQuantizer:
        """An ActQuantizer at `bits` that starts from this choice's tracked range."""
        q = ActQuantizer(bits, signed=self.signed, momentum=self.momentum).to(self.running_max.device)
        q.running_max.copy_(self.running_max)
        q.initialized.copy_(self.initialized)
        return q


@dataclass
class Entry:
    """One quantized layer of the network: searched (w and a choices) or fixed at `fixed` bits."""

    name: str
    layer: QLayer
    macs: int  # per sample
    w: WeightChoice | None = None
    a: ActChoice | None = None
    fixed: int | None = None


@dataclass
class Decision:
    """The discrete network picked after the search."""

    bits: dict[str, tuple[int, int]]  # layer name -> (w_bits, a_bits)
    argmax_bitops: int
    bitops: int
    repairs: list[dict] = field(default_factory=list)


class SearchSpace(nn.Module):
    """All choices of a network. Layers that read the same quantized input (a residual block's first
    conv and its 1x1 shortcut conv) share one activation choice, as they share one quantizer."""

    def __init__(self, model: nn.Module, macs: dict[str, int], w_bits: list[int], a_bits: list[int],
                 fixed_bits: int | None, granularity: str, logit_scale: bool = False):
        super().__init__()
        self.state = SearchState()
        self.granularity = granularity
        # log of a learnable logit scale for the search (`ebs.logit_scale`), trained with the strengths
        self.log_logit_scale = nn.Parameter(torch.zeros(())) if logit_scale else None
        self.weights = nn.ModuleList()
        self.acts = nn.ModuleList()
        self.entries: list[Entry] = []
        shared_input = {id(m.down_conv): m.conv1 for m in model.modules()
                        if isinstance(m, BasicBlock) and m.shortcut_kind == "B"}
        act_of: dict[int, ActChoice] = {}
        for name, layer in quant_layers(model):
            if fixed_bits is not None and layer.position in ("first", "last"):
                self.entries.append(Entry(name, layer, macs[name], fixed=fixed_bits))
                continue
            w = WeightChoice(w_bits, self.state, granularity)
            self.weights.append(w)
            leader = shared_input.get(id(layer))  # the shared choice then sees that input twice a step:
            a = act_of.get(id(leader)) if leader is not None else None  # its EMA just takes the same max twice
            if a is None:
                a = ActChoice(a_bits, self.state, signed=layer.input_signed)
                self.acts.append(a)
            act_of[id(layer)] = a
            self.entries.append(Entry(name, layer, macs[name], w=w, a=a))

    def choices(self) -> list[Choice]:
        return [*self.weights, *self.acts]

    def search_parameters(self) -> list[nn.Parameter]:
        """What the strengths' objective trains: every choice's strengths, and the logit scale if any."""
        extra = [self.log_logit_scale] if self.log_logit_scale is not None else []
        return [c.alpha for c in self.choices()] + extra

    def scale_logits(self, logits: Tensor) -> Tensor:
        """Logits times the learnable scale (seen detached where the strengths are): the scale takes the
        loss's pull on the logits' size, which a choice ahead of a layer without batch norm (the head)
        can otherwise only answer by a bit-width that shrinks or grows them."""
        if self.log_logit_scale is None:
            return logits
        s = self.log_logit_scale.detach() if self.state.detach else self.log_logit_scale
        return logits * s.exp()

    # ---- cost ----------------------------------------------------------------------------------
    def expected_bitops(self) -> Tensor:
        """E[BitOPs per sample] under the strengths' softmax; fixed layers add a constant."""
        total = self.weights[0].alpha.new_zeros(()) if len(self.weights) else torch.zeros(())
        for e in self.entries:
            if e.fixed is not None:
                total = total + e.macs * e.fixed * e.fixed
            else:
                total = total + e.macs * e.w.expected_bits() * e.a.expected_bits()
        return total

    def bitops(self, index: dict[int, int]) -> int:
        """BitOPs per sample when each choice (by id) takes candidate index[id]."""
        bits = self._bits(index)
        return sum(e.macs * bits[e.name][0] * bits[e.name][1] for e in self.entries)

    def bitops_range(self) -> tuple[int, int]:
        """(all searched choices at their smallest candidate, at their largest)."""
        lo = {id(c): 0 for c in self.choices()}
        hi = {id(c): len(c.bits) - 1 for c in self.choices()}
        return self.bitops(lo), self.bitops(hi)

    def _bits(self, index: dict[int, int]) -> dict[str, tuple[int, int]]:
        out = {}
        for e in self.entries:
            if e.fixed is not None:
                out[e.name] = (e.fixed, e.fixed)
            else:
                out[e.name] = (e.w.bits[index[id(e.w)]], e.a.bits[index[id(e.a)]])
        return out

    def macs_of(self) -> dict[str, int]:
        return {e.name: e.macs for e in self.entries}

    # ---- the decision -------------------------------------------------------------------------
    @torch.no_grad()
    def decide(self, target: float) -> Decision:
        """Each choice's argmax; if that exceeds the target, lower one choice by one candidate at a
        time until it fits, always the one that gives up the least log-probability per BitOP of the
        excess it removes (savings beyond the excess earn nothing, so a small sufficient step wins)."""
        choices = self.choices()
        index = {id(c): c.argmax() for c in choices}
        logp = {id(c): c.log_probs() for c in choices}
        names = {id(c): n for n, c in self._choice_names()}
        argmax_bitops = cost = self.bitops(index)
        repairs = []
        while cost > target:
            best = None
            for c in choices:
                i = index[id(c)]
                if i == 0:
                    continue
                lowered = {**index, id(c): i - 1}
                saved = cost - self.bitops(lowered)
                if saved <= 0:
                    continue
                score = float(logp[id(c)][i] - logp[id(c)][i - 1]) / min(saved, cost - target)
                if best is None or score < best[0]:
                    best = (score, c, lowered)
            if best is None:
                break  # every choice at its smallest candidate; build() refuses such targets
            _, c, index = best
            new_cost = self.bitops(index)
            repairs.append({"choice": names[id(c)], "from": c.bits[index[id(c)] + 1], "to": c.bits[index[id(c)]],
                            "bitops_after": new_cost})
            cost = new_cost
        return Decision(self._bits(index), argmax_bitops, cost, repairs)

    def _choice_names(self) -> Iterator[tuple[str, Choice]]:
        seen = set()
        for e in self.entries:
            for c, role in ((e.w, "w"), (e.a, "a")):
                if c is not None and id(c) not in seen:
                    seen.add(id(c))
                    yield f"{e.name}:{role}", c

    def describe(self) -> list[dict]:
        """Per layer: MACs and the strengths' probabilities over the candidates."""
        out = []
        for e in self.entries:
            row: dict = {"name": e.name, "macs": e.macs, "searched": e.fixed is None}
            if e.fixed is None:
                row["p_w"] = {b: round(float(p), 4) for b, p in zip(e.w.bits, e.w.log_probs().exp())}
                row["p_a"] = {b: round(float(p), 4) for b, p in zip(e.a.bits, e.a.log_probs().exp())}
            out.append(row)
        return out

    # ---- attaching to the network -------------------------------------------------------------
    def attach_search(self) -> None:
        """Searched layers compute with the mixtures (no quantizers of their own); fixed layers are
        quantized at their fixed bits from the start."""
        for e in self.entries:
            if e.fixed is not None:
                e.layer.set_quant(LayerQuant(WeightQuantizer(e.fixed, self.granularity),
                                             ActQuantizer(e.fixed, signed=e.layer.input_signed)))
            else:
                e.layer.set_quant(None)
                e.layer.weight_fn, e.layer.input_fn = e.w.mix, e.a.mix

    def attach_final(self, bits: dict[str, tuple[int, int]]) -> None:
        """Give every searched layer plain quantizers at its chosen bits (mixtures removed) and freeze
        the strengths; layers sharing an input share one ActQuantizer, as they shared one choice."""
        act_q: dict[int, ActQuantizer] = {}
        for e in self.entries:
            if e.fixed is not None:
                continue
            wb, ab = bits[e.name]
            if id(e.a) not in act_q:
                act_q[id(e.a)] = e.a.quantizer(ab)
            e.layer.weight_fn = e.layer.input_fn = None
            e.layer.set_quant(LayerQuant(WeightQuantizer(wb, self.granularity), act_q[id(e.a)]))
        for p in self.parameters():
            p.requires_grad_(False)


@torch.no_grad()
def macs_per_sample(model: nn.Module, in_shape: tuple[int, ...]) -> dict[str, int]:
    """MACs of each quantized layer for one sample, from a dry forward pass (shapes only)."""
    macs: dict[str, int] = {}
    hooks = []
    for name, layer in quant_layers(model):
        def hook(mod, inputs, out, name=name):
            if isinstance(mod, QConv2d):
                kh, kw = mod.kernel_size
                macs[name] = int(out.shape[2] * out.shape[3] * mod.out_channels * mod.in_channels * kh * kw)
            else:
                macs[name] = int(mod.in_features * mod.out_features)
        hooks.append(layer.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        model(torch.zeros((1, *in_shape)))
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return macs
