"""``torch.library`` custom ops ``lte::sparse_ffn``, ``lte::routed_sparse_ffn`` (and its fp8-weight form
``lte::routed_sparse_ffn_fp8``), ``lte::router_mask``, ``lte::router_topk_mask``,
the two halves ``lte::routed_ffn_in`` / ``lte::sparse_ffn_out`` (for FFNs whose model applies the
activation between them, e.g. OPT's decoder layer), ``lte::masked_activation`` (the elementwise
middle of the masked dense FFN; ``lte::masked_activation_logits`` and ``lte::masked_activation_topk`` take the
mask from router logits) and ``lte::decode_attention`` (one query token's grouped heads over a cache).

Each op has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` traces through it
and CUDA-graph capture works. On CUDA the ops launch the Triton kernels (imported lazily, on the
first call); on every other device, for more than ``MAX_DECODE_TOKENS`` tokens (prefill), or when the
environment variable ``LTE_KERNELS=reference`` is set, they run the PyTorch reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F_

from .reference import (
    decode_attention_reference,
    logit_threshold,
    masked_activation_reference,
    routed_mask_reference,
    router_mask_reference,
    router_topk_mask_reference,
    sparse_ffn_reference,
    topk_keep,
)

MAX_DECODE_TOKENS = 64  # token counts above this (prefill) take the masked dense cuBLAS path on CUDA
KERNELS_ENV = "LTE_KERNELS"


def reference_forced() -> bool:
    """True when ``LTE_KERNELS=reference`` asks for the PyTorch reference everywhere."""
    return os.environ.get(KERNELS_ENV, "").strip().lower() == "reference"


@torch.library.custom_op("lte::sparse_ffn", mutates_args=())
def sparse_ffn_op(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    expert_size: int,
    activation: str,
) -> torch.Tensor:
    """Sparse FFN on x [T, D] with expert mask [T, E] (any device: the fp32 reference)."""
    return sparse_ffn_reference(
        x, mask, w_up, w_down_t, w_gate=w_gate, b_up=b_up, b_down=b_down,
        expert_size=expert_size, activation=activation,
    )


@sparse_ffn_op.register_kernel("cuda")
def _sparse_ffn_cuda(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation):
    """CUDA: Triton decode kernels for T <= MAX_DECODE_TOKENS, masked dense cuBLAS above."""
    num_tokens = x.shape[0]
    if reference_forced():
        return sparse_ffn_reference(
            x, mask, w_up, w_down_t, w_gate=w_gate, b_up=b_up, b_down=b_down,
            expert_size=expert_size, activation=activation,
        )
    if num_tokens == 0 or num_tokens > MAX_DECODE_TOKENS:
        return sparse_ffn_reference(
            x, mask, w_up, w_down_t, w_gate=w_gate, b_up=b_up, b_down=b_down,
            expert_size=expert_size, activation=activation, upcast=False,
        )
    from .triton_ffn import sparse_ffn_triton

    return sparse_ffn_triton(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation)


@sparse_ffn_op.register_fake
def _sparse_ffn_fake(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation):
    return x.new_empty(x.shape[0], w_down_t.shape[1])  # [T, D]


@torch.library.custom_op("lte::router_mask", mutates_args=())
def router_mask_op(x: torch.Tensor, w_router: torch.Tensor, tau: float) -> torch.Tensor:
    """Bool expert mask [T, E] = sigmoid(x Wr^T) > tau (any device: the fp32 reference)."""
    return router_mask_reference(x, w_router, tau)


@router_mask_op.register_kernel("cuda")
def _router_mask_cuda(x, w_router, tau):
    """CUDA: fused Triton GEMV + threshold for T <= MAX_DECODE_TOKENS, the reference above."""
    num_tokens = x.shape[0]
    if reference_forced() or num_tokens == 0 or num_tokens > MAX_DECODE_TOKENS:
        return router_mask_reference(x, w_router, tau)
    from .triton_ffn import router_mask_triton

    return router_mask_triton(x, w_router, logit_threshold(tau))


@router_mask_op.register_fake
def _router_mask_fake(x, w_router, tau):
    return x.new_empty(x.shape[0], w_router.shape[0], dtype=torch.bool)  # [T, E]


@torch.library.custom_op("lte::router_topk_mask", mutates_args=())
def router_topk_mask_op(x: torch.Tensor, w_router: torch.Tensor, k: int, budget: int) -> torch.Tensor:
    """Bool expert mask [T, E] of top-k routing: each token's min(k, E) experts of largest logit
    x Wr^T (fp32 accumulation), ties to the lower expert index; ``budget > 0`` cuts the call's union
    to that many experts and each token takes its top k among them (any device: the reference)."""
    return router_topk_mask_reference(x, w_router, k, budget)


@router_topk_mask_op.register_kernel("cuda")
def _router_topk_mask_cuda(x, w_router, k, budget):
    """CUDA: router kernel (fp32 logits) + per-token top-k kernel (+ one kernel cutting the union to the
    budget and re-ranking each token) for T <= MAX_DECODE_TOKENS, the reference above (prefill)."""
    num_tokens = x.shape[0]
    if reference_forced() or num_tokens == 0 or num_tokens > MAX_DECODE_TOKENS or w_router.shape[0] == 0:
        return router_topk_mask_reference(x, w_router, k, budget)
    from .triton_topk import router_topk_mask_triton

    return router_topk_mask_triton(x, w_router, k, budget=budget)


@router_topk_mask_op.register_fake
def _router_topk_mask_fake(x, w_router, k, budget):
    return x.new_empty(x.shape[0], w_router.shape[0], dtype=torch.bool)  # [T, E]


@torch.library.custom_op("lte::routed_sparse_ffn", mutates_args=())
def routed_sparse_ffn_op(
    x: torch.Tensor,
    w_router: torch.Tensor,
    tau: float,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    expert_size: int,
    activation: str,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router (+ per-batch expert budget when ``budget > 0``) + sparse FFN in one op on x [T, D]:
    (y [T, D], mask [T, E]) (any device: the fp32 reference)."""
    mask = routed_mask_reference(x, w_router, tau, budget)
    y = sparse_ffn_reference(
        x, mask, w_up, w_down_t, w_gate=w_gate, b_up=b_up, b_down=b_down,
        expert_size=expert_size, activation=activation,
    )
    return y, mask


@routed_sparse_ffn_op.register_kernel("cuda")
def _routed_sparse_ffn_cuda(x, w_router, tau, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
                            budget):
    """CUDA: router kernel (+ budget kernel) and the FFN kernels for T <= MAX_DECODE_TOKENS; the
    masked dense path through cuBLAS above (prefill)."""
    num_tokens = x.shape[0]
    if reference_forced() or num_tokens == 0 or num_tokens > MAX_DECODE_TOKENS:
        mask = routed_mask_reference(x, w_router, tau, budget)
        y = sparse_ffn_reference(  # forced: the exact fp32 reference; prefill: masked dense in x's dtype
            x, mask, w_up, w_down_t, w_gate=w_gate, b_up=b_up, b_down=b_down,
            expert_size=expert_size, activation=activation, upcast=reference_forced(),
        )
        return y, mask
    from .triton_ffn import routed_sparse_ffn_triton

    return routed_sparse_ffn_triton(x, w_router, logit_threshold(tau), w_up, w_down_t, w_gate, b_up, b_down,
                                    expert_size, activation, budget=budget)


@routed_sparse_ffn_op.register_fake
def _routed_sparse_ffn_fake(x, w_router, tau, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
                            budget):
    y = x.new_empty(x.shape[0], w_down_t.shape[1])  # [T, D]
    mask = x.new_empty(x.shape[0], w_router.shape[0], dtype=torch.bool)  # [T, E]
    return y, mask


@torch.library.custom_op("lte::routed_sparse_ffn_fp8", mutates_args=())
def routed_sparse_ffn_fp8_op(
    x: torch.Tensor,
    w_router: torch.Tensor,
    tau: float,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    s_up: torch.Tensor,
    s_down: torch.Tensor,
    s_gate: torch.Tensor | None,
    expert_size: int,
    activation: str,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lte::routed_sparse_ffn`` with fp8 (e4m3) gate/up/down weights and one fp32 scale per row
    (``lte.kernels.quant``); the router in x's dtype. Any device: the fp32 reference of the
    dequantized weights."""
    mask = routed_mask_reference(x, w_router, tau, budget)
    y = sparse_ffn_reference(x, mask, w_up, w_down_t, w_gate=w_gate, b_up=b_up, b_down=b_down,
                             expert_size=expert_size, activation=activation, s_up=s_up, s_gate=s_gate,
                             s_down=s_down)
    return y, mask


@routed_sparse_ffn_fp8_op.register_kernel("cuda")
def _routed_sparse_ffn_fp8_cuda(x, w_router, tau, w_up, w_down_t, w_gate, b_up, b_down, s_up, s_down, s_gate,
                                expert_size, activation, budget):
    """CUDA: the router (+ budget) and FFN kernels reading fp8 rows for T <= MAX_DECODE_TOKENS; above
    (prefill), the masked dense path on weights dequantized to x's dtype for the call."""
    num_tokens = x.shape[0]
    if reference_forced() or num_tokens == 0 or num_tokens > MAX_DECODE_TOKENS:
        mask = routed_mask_reference(x, w_router, tau, budget)
        y = sparse_ffn_reference(x, mask, w_up, w_down_t, w_gate=w_gate, b_up=b_up, b_down=b_down,
                                 expert_size=expert_size, activation=activation, upcast=reference_forced(),
                                 s_up=s_up, s_gate=s_gate, s_down=s_down)
        return y, mask
    from .triton_ffn import routed_sparse_ffn_triton

    return routed_sparse_ffn_triton(x, w_router, logit_threshold(tau), w_up, w_down_t, w_gate, b_up, b_down,
                                    expert_size, activation, budget=budget, scales=(s_up, s_gate, s_down))


@routed_sparse_ffn_fp8_op.register_fake
def _routed_sparse_ffn_fp8_fake(x, w_router, tau, w_up, w_down_t, w_gate, b_up, b_down, s_up, s_down, s_gate,
                                expert_size, activation, budget):
    y = x.new_empty(x.shape[0], w_down_t.shape[1])  # [T, D]
    mask = x.new_empty(x.shape[0], w_router.shape[0], dtype=torch.bool)  # [T, E]
    return y, mask


@torch.library.custom_op("lte::masked_activation", mutates_args=())
def masked_activation_op(gate: torch.Tensor | None, up: torch.Tensor, mask: torch.Tensor, expert_size: int,
                         activation: str) -> torch.Tensor:
    """h [T, F] = act(gate) * up * m, or act(up) * m without a gate (any device: the fp32 reference)."""
    return masked_activation_reference(gate, up, mask, expert_size, activation)


@masked_activation_op.register_kernel("cuda")
def _masked_activation_cuda(gate, up, mask, expert_size, activation):
    """CUDA: one Triton elementwise launch (any token count)."""
    if reference_forced():
        return masked_activation_reference(gate, up, mask, expert_size, activation)
    from .triton_masked_act import masked_activation_triton

    return masked_activation_triton(gate, up, mask, expert_size, activation)


@masked_activation_op.register_fake
def _masked_activation_fake(gate, up, mask, expert_size, activation):
    return torch.empty_like(up)  # [T, F]


@torch.library.custom_op("lte::masked_activation_logits", mutates_args=())
def masked_activation_logits_op(gate: torch.Tensor | None, up: torch.Tensor, logits: torch.Tensor, tau: float,
                                expert_size: int, activation: str) -> torch.Tensor:
    """``lte::masked_activation`` with the mask taken from router logits [T, E]: m = logit > log(tau / (1 - tau))
    (in fp32; the same as sigmoid(logit) > tau up to rounding at the threshold). Any device: the reference."""
    return masked_activation_reference(gate, up, logits.float() > logit_threshold(tau), expert_size, activation)


@masked_activation_logits_op.register_kernel("cuda")
def _masked_activation_logits_cuda(gate, up, logits, tau, expert_size, activation):
    """CUDA: one Triton elementwise launch that reads the logits (no sigmoid / compare launches)."""
    if reference_forced():
        return masked_activation_reference(gate, up, logits.float() > logit_threshold(tau), expert_size, activation)
    from .triton_masked_act import masked_activation_triton

    return masked_activation_triton(gate, up, logits, expert_size, activation, threshold=logit_threshold(tau))


@masked_activation_logits_op.register_fake
def _masked_activation_logits_fake(gate, up, logits, tau, expert_size, activation):
    return torch.empty_like(up)  # [T, F]


@torch.library.custom_op("lte::masked_activation_topk", mutates_args=())
def masked_activation_topk_op(gate: torch.Tensor | None, up: torch.Tensor, logits: torch.Tensor, k: int,
                              expert_size: int, activation: str) -> torch.Tensor:
    """``lte::masked_activation`` with each token's ``k`` experts of largest router logit [T, E] on (ranked as
    fp32, ties to the lower expert index: ``topk_keep``). Any device: the reference."""
    return masked_activation_reference(gate, up, topk_keep(logits.float(), k), expert_size, activation)


@masked_activation_topk_op.register_kernel("cuda")
def _masked_activation_topk_cuda(gate, up, logits, k, expert_size, activation):
    """CUDA: one Triton launch that ranks each token's logits itself (no router or top-k launches)."""
    if reference_forced():
        return masked_activation_reference(gate, up, topk_keep(logits.float(), k), expert_size, activation)
    from .triton_masked_act import masked_activation_topk_triton

    return masked_activation_topk_triton(gate, up, logits, k, expert_size, activation)


@masked_activation_topk_op.register_fake
def _masked_activation_topk_fake(gate, up, logits, k, expert_size, activation):
    return torch.empty_like(up)  # [T, F]


# --------------------------------------------------------------------------- FFNs in two halves
def _ffn_in_reference(x, w_router, tau, w_up, b_up, expert_size, budget, upcast=True):
    """(z = x W1^T + b1, zero where the token's expert is off (upcast) or not masked (prefill), mask, union)."""
    from .reference import expand_mask

    mask = routed_mask_reference(x, w_router, tau, budget)  # [T, E]
    if upcast:
        z = F_.linear(x.float(), w_up.float(), None if b_up is None else b_up.float())  # [T, F]
        z = (z * expand_mask(mask, w_up.shape[0], expert_size).float()).to(x.dtype)
    else:
        z = F_.linear(x, w_up, b_up)  # the second half applies the mask
    return z, mask, mask.any(dim=0).to(torch.int8)


def _ffn_out_reference(h, mask, w_down_t, b_down, expert_size, upcast=True):
    """y = (h * m) Wd_t + b2 in w_down_t's dtype (fp32 arithmetic when upcast)."""
    from .reference import expand_mask

    dtype = torch.float32 if upcast else h.dtype
    neuron_mask = expand_mask(mask, w_down_t.shape[0], expert_size).to(dtype)  # [T, F]
    y = (h.to(dtype) * neuron_mask) @ w_down_t.to(dtype)  # [T, D]
    if b_down is not None:
        y = y + b_down.to(dtype)
    return y.to(w_down_t.dtype)


@torch.library.custom_op("lte::routed_ffn_in", mutates_args=())
def routed_ffn_in_op(
    x: torch.Tensor,
    w_router: torch.Tensor,
    tau: float,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    expert_size: int,
    budget: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of a plain FFN on x [T, D]: (z [T, F], mask [T, E], union [E] int8) (the fp32 reference)."""
    return _ffn_in_reference(x, w_router, tau, w_up, b_up, expert_size, budget)


@routed_ffn_in_op.register_kernel("cuda")
def _routed_ffn_in_cuda(x, w_router, tau, w_up, b_up, expert_size, budget):
    num_tokens = x.shape[0]
    if reference_forced() or num_tokens == 0 or num_tokens > MAX_DECODE_TOKENS:
        return _ffn_in_reference(x, w_router, tau, w_up, b_up, expert_size, budget, upcast=reference_forced())
    from .triton_ffn_halves import routed_ffn_in_triton

    return routed_ffn_in_triton(x, w_router, logit_threshold(tau), w_up, b_up, expert_size, budget)


@routed_ffn_in_op.register_fake
def _routed_ffn_in_fake(x, w_router, tau, w_up, b_up, expert_size, budget):
    return (x.new_empty(x.shape[0], w_up.shape[0]), x.new_empty(x.shape[0], w_router.shape[0], dtype=torch.bool),
            x.new_empty(w_router.shape[0], dtype=torch.int8))


@torch.library.custom_op("lte::sparse_ffn_out", mutates_args=())
def sparse_ffn_out_op(
    h: torch.Tensor,
    mask: torch.Tensor,
    union: torch.Tensor,
    w_down_t: torch.Tensor,
    b_down: torch.Tensor | None,
    expert_size: int,
) -> torch.Tensor:
    """Second half: y [T, D] = (h * m) Wd_t + b2 for h [T, F], mask [T, E], union [E] (the fp32 reference)."""
    return _ffn_out_reference(h, mask, w_down_t, b_down, expert_size)


@sparse_ffn_out_op.register_kernel("cuda")
def _sparse_ffn_out_cuda(h, mask, union, w_down_t, b_down, expert_size):
    num_tokens = h.shape[0]
    if reference_forced() or num_tokens == 0 or num_tokens > MAX_DECODE_TOKENS:
        return _ffn_out_reference(h, mask, w_down_t, b_down, expert_size, upcast=reference_forced())
    from .triton_ffn_halves import sparse_ffn_out_triton

    return sparse_ffn_out_triton(h, mask, union, w_down_t, b_down, expert_size)


@sparse_ffn_out_op.register_fake
def _sparse_ffn_out_fake(h, mask, union, w_down_t, b_down, expert_size):
    return h.new_empty(h.shape[0], w_down_t.shape[1], dtype=w_down_t.dtype)  # [T, D]


# --------------------------------------------------------------------------- decode attention
@torch.library.custom_op("lte::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """out [B, Hkv, G, d]: attention of q [B, Hkv, G, d] over k, v [B, Hkv, L, d], slots with keep [B, L]
    False left out (any device: the fp32 reference)."""
    return decode_attention_reference(q, k, v, keep, scale)


@decode_attention_op.register_kernel("cuda")
def _decode_attention_cuda(q, k, v, keep, scale):
    """CUDA: the split-KV Triton kernel and its combine launch (``triton_attention``)."""
    if reference_forced():
        return decode_attention_reference(q, k, v, keep, scale)
    from .triton_attention import decode_attention_triton

    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    keep = None if keep is None else keep.contiguous()
    return decode_attention_triton(q, k, v, keep, scale)


@decode_attention_op.register_fake
def _decode_attention_fake(q, k, v, keep, scale):
    return torch.empty_like(q)  # [B, Hkv, G, d]
