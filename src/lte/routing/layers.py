"""The two modules that replace an FFN's input and output projections.

`LTEInput` wraps the projection that sees the FFN input x and computes the router scores
G = sigmoid(x Wr^T) [..., E] and the per-expert gate for the current routing mode.
`LTEOutput` wraps the output projection and multiplies its input h [..., F] by that gate,
expanded from experts to neurons. Activations, dropout, residuals and norms stay the HF model's
own code, so every family is handled by the same two modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LTEError
from ..kernels.reference import topk_among, topk_keep

MODES = ("dense", "soft", "ste", "hard", "topk")
#: Modes whose forward trains the routers (scores feed L_eff / L_sep and get the task gradient).
TRAINING_MODES = ("soft", "ste")


class _HardThreshold(torch.autograd.Function):
    """Forward: the 0/1 mask 1[G > tau] in `dtype`; backward: the gradient passes to G unchanged
    (straight-through), in G's dtype."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, tau: float, dtype: torch.dtype) -> torch.Tensor:
        ctx.scores_dtype = scores.dtype
        return (scores > tau).to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad.to(ctx.scores_dtype), None, None


def _router_input(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x in the router's dtype; under autocast as it is (the matmul casts both to the autocast dtype)."""
    if torch.is_autocast_enabled(x.device.type):
        return x
    return x.to(weight.dtype)


def _router_operands(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x and the router weight in the dtype the router matmul runs in: the autocast dtype under
    autocast (cast here once, so a training backward reuses them instead of casting again), else the
    router's dtype."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype)
    return x.to(weight.dtype), weight


class _TrainingScores(torch.autograd.Function):
    """The router scores of a training forward, from one matmul: G = sigmoid(x Wr^T) [..., E] in fp32, twice.

    `scores` feeds the gate: the task loss reaches x and Wr through it. `loss_scores` (the same
    values) feeds L_eff and L_sep, whose gradient reaches Wr only (`loss_to_model=False`). Autograd
    would need a second matmul for that (F.linear(x.detach(), Wr)); here the backward adds the two
    gradients of the logits and multiplies once for Wr.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xr, wr = _router_operands(x, weight)  # [..., D], [E, D] in the matmul's dtype
        logits = F.linear(xr, wr)  # [..., E]
        scores = torch.sigmoid(logits.float())
        ctx.save_for_backward(xr, wr, scores)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zero gradients made up
        ctx.x_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return scores, scores.clone()

    @staticmethod
    def backward(ctx, grad_scores: torch.Tensor, grad_loss_scores: torch.Tensor):
        xr, wr, scores = ctx.saved_tensors  # x and the weight already in the matmul's dtype
        dtype = wr.dtype
        # d/dlogits of each use, fp32 [..., E] (None: that output got no gradient)
        grad_model = None if grad_scores is None else torch.ops.aten.sigmoid_backward(grad_scores, scores)
        grad_loss = None if grad_loss_scores is None else torch.ops.aten.sigmoid_backward(grad_loss_scores, scores)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0] and grad_model is not None:
            grad_x = (grad_model.to(dtype) @ wr).to(ctx.x_dtype)  # [..., D]
        both = grad_model if grad_loss is None else (grad_loss if grad_model is None else grad_model + grad_loss)
        if ctx.needs_input_grad[1] and both is not None:
            both = both.to(dtype).reshape(-1, both.shape[-1])  # [T, E]
            grad_w = (both.t() @ xr.reshape(-1, xr.shape[-1])).to(ctx.weight_dtype)  # [E, D]
        return grad_x, grad_w


def expert_gate(scores: torch.Tensor, mode: str, tau: float, k: int | None,
                dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """Per-expert multiplier [..., E] for a routing mode (None = every expert fully on).

    `dtype`: the 0/1 masks of "hard" and "ste" in this dtype (default: the scores'), e.g. that of the
    FFN's hidden activations, so that gating them needs no further cast."""
    if mode == "dense":
        return None
    if mode == "soft":
        return scores
    if mode == "hard":
        return (scores > tau).to(dtype or scores.dtype)
    if mode == "ste":
        # Stage 1, ours: the model sees exactly the hard mask it is served with, while the
        # routers learn through the sigmoid as in soft routing (straight-through estimator).
        return _HardThreshold.apply(scores, tau, dtype or scores.dtype)
    if mode == "topk":
        if k is None:
            raise LTEError("topk routing needs k: set_routing('topk', k=...) or LTEConfig(topk=...)")
        # the min(k, E) largest scores, ties to the lower expert index: the rule of the served mask and
        # its kernel (`lte.kernels.reference.topk_keep`); a 0/1 gate, no gradient to the scores
        return topk_keep(scores, k).to(scores.dtype)
    raise LTEError(f"unknown routing mode {mode!r}; choose one of {', '.join(MODES)}")


def budget_experts(fraction: float, num_experts: int) -> int:
    """Experts a per-batch budget of `fraction` keeps in a layer of `num_experts`: round(fraction x E), >= 1."""
    return max(1, round(fraction * num_experts))


def batch_budget_keep(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Experts a per-batch budget keeps: [..., E] bool, for scores and hard mask [B, T, E] (or [T, E]).

    The B sequences of a batch at one position are a decode step's batch: of the experts some of them
    switched on, the k with the largest summed score stay on for all of them (ties: the lower expert
    index), as `lte.kernels.routed_sparse_ffn(budget=k)` serves that step. A [T, E] input is one group.
    Padding tokens of a padded batch count like the others (packed causal-LM blocks have none).
    """
    grouped = scores if scores.dim() == 3 else scores.unsqueeze(1)  # [B, T, E]
    on = mask if mask.dim() == 3 else mask.unsqueeze(1)
    union = on.any(dim=0)  # [T, E]
    summed = torch.where(union, grouped.float().sum(dim=0), torch.full_like(union, -1.0, dtype=torch.float32))
    order = torch.sort(summed, dim=-1, descending=True, stable=True).indices[..., :k]  # [T, k]
    keep = torch.zeros_like(union).scatter_(-1, order, True) & union  # [T, E]
    keep = keep.unsqueeze(0).expand_as(on)
    return keep if scores.dim() == 3 else keep.squeeze(1)


def gate_neurons(h: torch.Tensor, gate: torch.Tensor, block: int) -> torch.Tensor:
    """h [..., F] times the per-expert gate [..., E] broadcast over each expert's neurons.

    Experts are consecutive blocks of `block` neurons; the last may be smaller.
    """
    lead, f, e = h.shape[:-1], h.shape[-1], gate.shape[-1]
    full = (e - 1) * block if f != e * block else f  # neurons in full-size experts
    n_full = full // block
    head = (h[..., :full].reshape(*lead, n_full, block) * gate[..., :n_full, None]).reshape(*lead, full)
    if full == f:
        return head
    tail = h[..., full:] * gate[..., n_full:]  # the smaller last expert
    return torch.cat([head, tail], dim=-1)


class WrappedLayer(nn.Module):
    """Shows the wrapped layer's `weight` and `bias`, which some HF models read directly."""

    base_layer: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)


class LTEInput(WrappedLayer):
    """An FFN input projection plus its router.

    Args:
        base_layer: the original projection (nn.Linear or Conv1D), called unchanged.
        num_experts: E.
        hidden_size: D, the width of x.
        expert_sizes: neurons per expert (sum = F).
        init_std: router init std (None: 1/sqrt(D)).
        generator: seeded generator for the router init.
    """

    def __init__(self, base_layer: nn.Module, num_experts: int, hidden_size: int, expert_sizes: list[int],
                 init_std: float | None = None, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        self.router = nn.Linear(hidden_size, num_experts, bias=False, device=weight.device, dtype=weight.dtype)
        std = init_std if init_std is not None else 1.0 / math.sqrt(hidden_size)
        with torch.no_grad():
            init = torch.randn(num_experts, hidden_size, generator=generator) * std  # [E, D], CPU generator
            self.router.weight.copy_(init.to(device=weight.device))
        device = weight.device
        self.register_buffer("expert_sizes", torch.tensor(expert_sizes, dtype=torch.long, device=device))
        self.register_buffer("perm", torch.arange(sum(expert_sizes), dtype=torch.long, device=device))
        # Python ints for the gating reshape: experts of `block` neurons, the last one possibly smaller.
        self.block = int(expert_sizes[0])
        self.mode = "dense"
        self.tau = 0.5
        # False: the LTE losses reach only the router (their scores see x.detach()); the task loss
        # still trains the model through the gated FFN. True: as the paper's joint loss.
        self.loss_to_model = False
        self.loss_scores: torch.Tensor | None = None
        self.k: int | None = None
        # Hard or top-k routing: keep at most this fraction of the experts for the sequences of a batch at
        # each position (`batch_budget_keep`; 0 = off), as a served decode step with a per-batch budget does.
        self.budget = 0.0
        # Set by forward, read by LTEOutput, the losses and the statistics (not module state).
        self.scores: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.router.out_features

    @property
    def ffn_width(self) -> int:
        return self.perm.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense":
            self.scores, self.gate, self.loss_scores = None, None, None
            return self.base_layer(x)
        weight = self.router.weight
        training = self.mode in TRAINING_MODES and torch.is_grad_enabled() and not self.loss_to_model
        if training and torch.is_autocast_enabled(x.device.type):
            # cast once for the projection and its router (autocast would cast x for each), so the
            # backward also adds their gradients before one cast back
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = self.base_layer(x)
        if training:
            self.scores, self.loss_scores = _TrainingScores.apply(x, weight)
        else:
            logits = F.linear(_router_input(x, weight), weight)  # [..., E]
            self.scores = self.loss_scores = torch.sigmoid(logits.float())
        # 0/1 masks in y's dtype (that of the hidden activations they gate: one cast fewer per step)
        self.gate = expert_gate(self.scores, self.mode, self.tau, self.k, dtype=y.dtype)
        if self.budget and self.mode in ("hard", "topk"):
            keep = batch_budget_keep(self.scores, self.gate != 0, self.budget_experts)
            if self.mode == "topk":  # each token its top k among the batch's budget, as the served step
                self.gate = topk_among(self.scores, self.k, keep).to(self.gate.dtype)
            else:
                self.gate = self.gate * keep.to(self.gate.dtype)
        return y

    @property
    def budget_experts(self) -> int:
        """k of the per-batch budget (`budget_experts`)."""
        return budget_experts(self.budget, self.num_experts)

    def extra_repr(self) -> str:
        budget = f", budget={self.budget}" if self.budget else ""
        return f"experts={self.num_experts}, F={self.ffn_width}, mode={self.mode}, tau={self.tau}{budget}"


class LTEOutput(WrappedLayer):
    """An FFN output projection that applies the gate of its `LTEInput` to its input."""

    def __init__(self, base_layer: nn.Module, source: LTEInput) -> None:
        super().__init__()
        self.base_layer = base_layer
        # A plain reference, not a submodule: the router must appear once in the module tree.
        object.__setattr__(self, "_source", source)

    @property
    def source(self) -> LTEInput:
        return self._source

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate = self._source.gate
        if gate is None:
            return self.base_layer(h)
        if gate.shape[:-1] != h.shape[:-1]:
            raise LTEError(
                f"the FFN's output projection got {tuple(h.shape)} but its router saw {tuple(gate.shape[:-1])} "
                "tokens; the FFN input and output projections must be called once each per forward"
            )
        return self.base_layer(gate_neurons(h, gate.to(h.dtype), self._source.block))
