"""Sparse-expert FFN kernels for decoding, their ``torch.library`` ops and the PyTorch reference.

Public API:

- ``sparse_ffn(x, mask, w_up, w_down_t, *, w_gate=None, b_up=None, b_down=None, expert_size=32,
  activation="silu")``: one LTE FFN for x ``[..., D]`` and a per-token expert mask ``[..., E]``.
- ``router_mask(x, w_router, tau=0.5)``: the hard expert mask ``sigmoid(x Wr^T) > tau``.
- ``router_topk_mask(x, w_router, k, budget=0)``: top-k routing's mask, each token's k experts of largest
  router logit (ties to the lower expert index), for ``sparse_ffn``.
- ``routed_sparse_ffn(x, w_router, w_up, w_down_t, *, tau=0.5, budget=0, ...)``: both in one op,
  with an optional per-batch expert budget; returns ``(y, mask)``. With ``scales=(s_up, s_gate,
  s_down)`` the three FFN matrices are fp8 (e4m3) with one fp32 scale per row
  (``quantize_rows_fp8``), so the kernels read half the bytes of bf16.
- ``routed_ffn_in(x, w_router, w_up, ...)`` and ``sparse_ffn_out(h, mask, union, w_down_t, ...)``: a
  plain FFN in two halves, for models that apply the activation between the two projections
  themselves (OPT): the router and ``x W1^T + b1`` for the union's experts, then the down projection.
- ``masked_dense_ffn(x, mask, w_up, w_down_t, ...)``: the same function as ``sparse_ffn`` with every
  neuron computed by cuBLAS and the mask applied in one elementwise launch: the path for a batch
  whose union of masks is too full for skipping to pay (``lte.serving`` picks it per FFN).
- ``routed_masked_dense_ffn(x, w_router, w_up, w_down_t, *, tau=0.5, ...)``: the same with the router
  too (a cuBLAS GEMM whose logits the elementwise launch thresholds itself): the prefill path.
- ``kernels_available()``: whether the Triton kernels will run (CUDA + triton, not forced off).

Importing this package does not import triton; the kernels load on the first CUDA call.
Set ``LTE_KERNELS=reference`` to force the PyTorch reference everywhere.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F_

from . import ops
from .quant import FP8_DTYPE, dequantize_rows, quantize_rows_fp8
from .reference import (
    ACTIVATIONS,
    budget_keep,
    decode_attention_reference,
    num_experts,
    routed_mask_reference,
    router_mask_reference,
    router_topk_mask_reference,
    sparse_ffn_reference,
    topk_keep,
)
from .tuning import KernelConfig, load_table

__all__ = [
    "ACTIVATIONS",
    "FP8_DTYPE",
    "KernelConfig",
    "budget_keep",
    "decode_attention",
    "decode_attention_reference",
    "dequantize_rows",
    "kernels_available",
    "load_table",
    "masked_dense_ffn",
    "routed_masked_dense_ffn",
    "num_experts",
    "quantize_rows_fp8",
    "router_mask",
    "routed_ffn_in",
    "routed_mask_reference",
    "routed_sparse_ffn",
    "router_mask_reference",
    "router_topk_mask",
    "router_topk_mask_reference",
    "sparse_ffn",
    "sparse_ffn_out",
    "stack_ffn_inputs",
    "stacked_masked_dense_ffn",
    "sparse_ffn_reference",
    "topk_keep",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def kernels_available() -> bool:
    """True when CUDA and triton are present and ``LTE_KERNELS=reference`` is not set."""
    return (
        torch.cuda.is_available()
        and importlib.util.find_spec("triton") is not None
        and not ops.reference_forced()
    )


def _check_matrix(name: str, w: torch.Tensor, x: torch.Tensor, rows: int | None, fp8: bool = False) -> None:
    """A weight must be a contiguous [rows, D] matrix with x's dtype (fp8: float8_e4m3fn) and device."""
    model_width = x.shape[-1]
    if w.dim() != 2 or w.shape[1] != model_width or (rows is not None and w.shape[0] != rows):
        want = f"[{rows if rows is not None else 'F'}, {model_width}]"
        raise ValueError(f"{name} must have shape {want} (row-major [F, D]), got {list(w.shape)}")
    if fp8:
        if w.dtype != FP8_DTYPE or w.device != x.device:
            raise ValueError(f"with scales, {name} must be {FP8_DTYPE} on {x.device} (lte.kernels.quantize_rows_fp8), "
                             f"got {w.dtype} on {w.device}")
    elif w.dtype != x.dtype or w.device != x.device:
        raise ValueError(
            f"{name} is {w.dtype} on {w.device} but x is {x.dtype} on {x.device}; "
            "cast the weights once when the model is prepared for inference"
        )
    if not w.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() once when preparing the model")


def _check_bias(name: str, b: torch.Tensor | None, size: int, x: torch.Tensor) -> None:
    if b is None:
        return
    if b.shape != (size,) or b.dtype != x.dtype or b.device != x.device or not b.is_contiguous():
        raise ValueError(
            f"{name} must be a contiguous [{size}] tensor of {x.dtype} on {x.device}, "
            f"got {list(b.shape)} {b.dtype} on {b.device}"
        )


def _check_scales(scales, w_gate, ffn_width: int, x: torch.Tensor) -> None:
    """(s_up, s_gate, s_down): contiguous fp32 [F] on x's device; s_gate given exactly when w_gate is."""
    if not isinstance(scales, tuple) or len(scales) != 3:
        raise ValueError("scales must be a tuple (s_up, s_gate, s_down) of fp32 [F] row scales (s_gate None "
                         "for a plain FFN), as lte.kernels.quantize_rows_fp8 returns them")
    if (scales[1] is None) != (w_gate is None):
        raise ValueError("s_gate must be given exactly when w_gate is (a gated FFN has three fp8 matrices)")
    for name, s in zip(("s_up", "s_gate", "s_down"), scales):
        if s is None:
            continue
        if s.shape != (ffn_width,) or s.dtype != torch.float32 or s.device != x.device or not s.is_contiguous():
            raise ValueError(f"{name} must be a contiguous fp32 [{ffn_width}] tensor on {x.device}, "
                             f"got {s.dtype} {list(s.shape)} on {s.device}")


def _validate_ffn(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation, fp8: bool = False) -> int:
    """Check every argument of ``sparse_ffn`` (the mask only when given); returns the number of experts E.
    ``fp8``: the three FFN matrices are float8_e4m3fn (their scales are checked by ``_check_scales``)."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape [..., D]")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if not isinstance(expert_size, int) or expert_size < 1:
        raise ValueError(f"expert_size must be a positive int, got {expert_size!r}")
    _check_matrix("w_up", w_up, x, None, fp8)
    ffn_width = w_up.shape[0]
    _check_matrix("w_down_t", w_down_t, x, ffn_width, fp8)
    if w_gate is not None:
        _check_matrix("w_gate", w_gate, x, ffn_width, fp8)
    _check_bias("b_up", b_up, ffn_width, x)
    _check_bias("b_down", b_down, x.shape[-1], x)
    num_exp = num_experts(ffn_width, expert_size)
    if mask is None:
        return num_exp
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = expert on), got {mask.dtype}")
    if mask.shape != (*x.shape[:-1], num_exp) or mask.device != x.device:
        raise ValueError(
            f"mask must have shape {[*x.shape[:-1], num_exp]} (x's leading dims, E = ceil(F/S) = "
            f"ceil({ffn_width}/{expert_size})) on {x.device}, got {list(mask.shape)} on {mask.device}"
        )
    return num_exp


def sparse_ffn(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    expert_size: int = 32,
    activation: str = "silu",
) -> torch.Tensor:
    """One LTE FFN computing only the experts each token's mask turns on.

    x ``[..., D]``; mask ``[..., E]`` bool; ``w_gate``/``w_up`` (W1 for plain FFNs) and
    ``w_down_t`` (down projection transposed) ``[F, D]``; ``b_up`` ``[F]``, ``b_down`` ``[D]``.
    Gated when ``w_gate`` is given: ``act(x Wg^T) * (x Wu^T)``; plain otherwise:
    ``act(x W1^T + b1)``. Returns ``[..., D]`` in x's dtype (fp32 accumulation).
    """
    num_exp = _validate_ffn(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation)
    model_width = x.shape[-1]
    x2 = x.reshape(-1, model_width).contiguous()  # [T, D]
    m2 = mask.reshape(-1, num_exp).contiguous()  # [T, E]
    y = torch.ops.lte.sparse_ffn(x2, m2, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation)
    return y.reshape(x.shape)  # [..., D]


def masked_dense_ffn(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    expert_size: int = 32,
    activation: str = "silu",
) -> torch.Tensor:
    """``sparse_ffn``'s function with every neuron computed: cuBLAS for the projections, one launch for
    ``act(g) * u * m`` (``lte::masked_activation``). Arguments and result as ``sparse_ffn``."""
    num_exp = _validate_ffn(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation)
    m2 = mask.reshape(-1, num_exp).contiguous()  # [T, E]
    return _dense_projections(x, w_up, w_down_t, w_gate, b_up, b_down, lambda gate, up: torch.ops.lte.masked_activation(
        gate, up, m2, expert_size, activation))


def _dense_projections(x, w_up, w_down_t, w_gate, b_up, b_down, middle) -> torch.Tensor:
    """The masked dense FFN around its elementwise middle: cuBLAS gate/up [T, F], ``h = middle(gate, up)``,
    cuBLAS down projection; y ``[..., D]``."""
    x2 = x.reshape(-1, x.shape[-1])  # [T, D]
    up = F_.linear(x2, w_up, b_up)  # [T, F]
    gate = None if w_gate is None else F_.linear(x2, w_gate)  # [T, F]
    h = middle(gate, up)
    y = torch.mm(h, w_down_t) if b_down is None else torch.addmm(b_down, h, w_down_t)  # [T, D]
    return y.reshape(x.shape)


def routed_masked_dense_ffn(
    x: torch.Tensor,
    w_router: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    tau: float = 0.5,
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    expert_size: int = 32,
    activation: str = "silu",
) -> torch.Tensor:
    """``masked_dense_ffn(x, router_mask(x, w_router, tau), ...)`` in fewer launches, for prefill: the
    router logits come from one cuBLAS GEMM (in x's dtype, as ``LTEModel``'s hard routing computes
    them) and the elementwise launch of ``act(g) * u * m`` compares them with the threshold itself.
    The mask is ``logit > log(tau / (1 - tau))`` (``sigmoid(logit) > tau`` up to rounding at the
    threshold). Returns y ``[..., D]``; arguments as ``routed_sparse_ffn``."""
    _validate_routed(x, w_router, tau, 0, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation)
    logits = F_.linear(x.reshape(-1, x.shape[-1]), w_router)  # [T, E]
    return _dense_projections(x, w_up, w_down_t, w_gate, b_up, b_down, lambda gate, up: (
        torch.ops.lte.masked_activation_logits(gate, up, logits, float(tau), expert_size, activation)))


def stack_ffn_inputs(w_gate: torch.Tensor, w_up: torch.Tensor, w_router: torch.Tensor) -> torch.Tensor:
    """The matrix ``stacked_masked_dense_ffn`` reads: ``cat([W_gate, W_up, W_router])`` [2F + E, D]. (Zero rows
    up to a multiple of 256 were tried on 2026-12-07 and timed on an H100 the next day: no faster at B = 1, 8, 32
    and 3.5 us slower at B = 64; docs/benchmarks.md.)"""
    if w_gate.shape != w_up.shape or w_router.dim() != 2 or w_router.shape[1] != w_up.shape[1]:
        raise ValueError(f"stack_ffn_inputs: W_gate and W_up must both be [F, D] and W_router [E, D], got "
                         f"{list(w_gate.shape)}, {list(w_up.shape)}, {list(w_router.shape)}")
    return torch.cat([w_gate, w_up, w_router])


def stacked_masked_dense_ffn(
    x: torch.Tensor,
    w_in: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    tau: float = 0.5,
    mask: torch.Tensor | None = None,
    topk: int = 0,
    b_down: torch.Tensor | None = None,
    expert_size: int = 32,
    activation: str = "silu",
) -> torch.Tensor:
    """``routed_masked_dense_ffn`` of a gated FFN whose gate, up and router rows are one matrix
    ``w_in = cat([W_gate, W_up, W_router])`` [2F + E, D] (F from ``w_down_t`` [F, D], E = ceil(F / S);
    ``stack_ffn_inputs``): gate, up and the router logits come from one cuBLAS product, then the same masked activation launch
    and down projection. The function is ``routed_masked_dense_ffn``'s (logits in x's dtype).
    ``mask`` [..., E] (a mask chosen elsewhere, e.g. top-k routing's): the product covers the gate and up
    rows only and ``masked_dense_ffn``'s function is computed with that mask (``tau`` unused). ``topk = k > 0``
    (top-k routing, no ``mask``): each token keeps its k experts of largest logit (ties to the lower index,
    ``topk_keep``), ranked inside the masked activation launch (``lte::masked_activation_topk``), so the router
    costs no launch of its own; the logits are those of the product, in x's dtype, where ``router_topk_mask``
    ranks fp32 ones (near a tie the two may keep different experts). Returns y ``[..., D]``."""
    if w_in.dim() != 2 or w_down_t.dim() != 2:
        raise ValueError(f"w_in and w_down_t must be 2-D, got {list(w_in.shape)} and {list(w_down_t.shape)}")
    ffn_width = w_down_t.shape[0]
    if not isinstance(expert_size, int) or expert_size < 1:
        raise ValueError(f"expert_size must be a positive int, got {expert_size!r}")
    num_exp = num_experts(ffn_width, expert_size)
    rows = 2 * ffn_width + num_exp
    if w_in.shape[0] != rows:
        raise ValueError(f"w_in must hold the gate, up and router rows: [2F + E, D] = [{rows}, D] for F = "
                         f"{ffn_width}, S = {expert_size}, got {list(w_in.shape)}")
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 0:
        raise ValueError(f"topk must be an int >= 0 (0: threshold routing or the given mask), got {topk!r}")
    if topk and mask is not None:
        raise ValueError("stacked_masked_dense_ffn takes a mask or topk, not both")
    w_gate, w_up, w_router = w_in.split([ffn_width, ffn_width, num_exp])  # row slices: [F, D], [F, D], [E, D]
    x2 = x.reshape(-1, x.shape[-1])  # [T, D]
    if topk:
        _validate_routed(x, w_router, tau, 0, w_up, w_down_t, w_gate, None, b_down, expert_size, activation)
        gate, up, logits = F_.linear(x2, w_in).split([ffn_width, ffn_width, num_exp], dim=-1)  # [T, F], [T, F], [T, E]
        h = torch.ops.lte.masked_activation_topk(gate, up, logits, topk, expert_size, activation)  # [T, F]
    elif mask is not None:
        _validate_ffn(x, mask, w_up, w_down_t, w_gate, None, b_down, expert_size, activation)
        gate, up = F_.linear(x2, w_in[: 2 * ffn_width]).split(ffn_width, dim=-1)  # [T, F] each
        h = torch.ops.lte.masked_activation(gate, up, mask.reshape(-1, num_exp).contiguous(), expert_size, activation)
    else:
        _validate_routed(x, w_router, tau, 0, w_up, w_down_t, w_gate, None, b_down, expert_size, activation)
        gate, up, logits = F_.linear(x2, w_in).split([ffn_width, ffn_width, num_exp], dim=-1)  # [T, F], [T, F], [T, E]
        h = torch.ops.lte.masked_activation_logits(gate, up, logits, float(tau), expert_size, activation)  # [T, F]
    y = torch.mm(h, w_down_t) if b_down is None else torch.addmm(b_down, h, w_down_t)  # [T, D]
    return y.reshape(x.shape)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """Attention of one query token's heads, grouped by the KV head they read: q ``[B, Hkv, G, d]`` over the
    cache k, v ``[B, Hkv, L, d]``, the slots where ``keep`` ``[B, L]`` (bool) is False left out; ``scale``
    defaults to d^-0.5. Returns ``[B, Hkv, G, d]`` in q's dtype (a sequence with no slot kept gets 0). On CUDA
    a split-KV Triton kernel (each KV head's keys and values read once, the cache cut into slices so that one
    sequence fills the GPU); elsewhere the fp32 reference."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"q must be [B, Hkv, G, d] and k, v the same [B, Hkv, L, d]; got q {list(q.shape)}, "
                         f"k {list(k.shape)}, v {list(v.shape)}")
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k [B, Hkv, L, d] must match q [B, Hkv, G, d] in B, Hkv and d; got q {list(q.shape)}, "
                         f"k {list(k.shape)}")
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if keep is not None and (keep.dtype != torch.bool or keep.shape != (k.shape[0], k.shape[2])):
        raise ValueError(f"keep must be a bool [B, L] = [{k.shape[0]}, {k.shape[2]}] mask, got {keep.dtype} "
                         f"{list(keep.shape)}")
    return torch.ops.lte.decode_attention(q, k, v, keep, float(q.shape[-1] ** -0.5 if scale is None else scale))


def _validate_routed(x, w_router, tau, budget, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
                     fp8: bool = False) -> int:
    """The checks of an FFN with its router (tau, budget, the FFN, w_router [E, D]); returns E."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an int >= 0 (0 = no budget), got {budget!r}")
    num_exp = _validate_ffn(x, None, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation, fp8)
    _check_matrix("w_router", w_router, x, num_exp)
    return num_exp


def router_mask(x: torch.Tensor, w_router: torch.Tensor, tau: float = 0.5) -> torch.Tensor:
    """Hard expert mask ``sigmoid(x Wr^T) > tau`` for x ``[..., D]`` and w_router ``[E, D]``; bool ``[..., E]``."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    _check_matrix("w_router", w_router, x, None)
    model_width = x.shape[-1]
    x2 = x.reshape(-1, model_width).contiguous()  # [T, D]
    out = torch.ops.lte.router_mask(x2, w_router, float(tau))  # [T, E]
    return out.reshape(*x.shape[:-1], w_router.shape[0])


def router_topk_mask(x: torch.Tensor, w_router: torch.Tensor, k: int, budget: int = 0) -> torch.Tensor:
    """Top-k routing's expert mask for x ``[..., D]`` and w_router ``[E, D]``: bool ``[..., E]`` with,
    for every token, exactly ``min(k, E)`` experts on: those of largest router logit ``x . Wr[e]``
    (fp32 accumulation), ties to the lower expert index (``topk_keep``). ``budget = n > 0`` is a
    per-batch expert budget: of the experts some token of the call switched on, the n with the
    largest summed sigmoid score are the call's (``budget_keep``), and each token keeps its top k
    among them (``topk_among``: min(k, n) experts). On CUDA up to 64 tokens run the router and top-k
    kernels (with a budget also one kernel that cuts the union and re-ranks each token; no host sync:
    CUDA-graph safe); elsewhere, and for more tokens, the reference."""
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have shape [..., D]")
    _check_matrix("w_router", w_router, x, None)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1 (the experts every token keeps), got {k!r}")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 0:
        raise ValueError(f"budget must be an int >= 0 (0 = no budget), got {budget!r}")
    model_width = x.shape[-1]
    x2 = x.reshape(-1, model_width).contiguous()  # [T, D]
    out = torch.ops.lte.router_topk_mask(x2, w_router, k, budget)  # [T, E]
    return out.reshape(*x.shape[:-1], w_router.shape[0])


def routed_sparse_ffn(
    x: torch.Tensor,
    w_router: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    tau: float = 0.5,
    w_gate: torch.Tensor | None = None,
    b_up: torch.Tensor | None = None,
    b_down: torch.Tensor | None = None,
    expert_size: int = 32,
    activation: str = "silu",
    budget: int = 0,
    scales: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``router_mask`` and ``sparse_ffn`` in one op: returns ``(y [..., D], mask [..., E] bool)``.

    The same function as ``sparse_ffn(x, router_mask(x, w_router, tau), ...)`` when ``budget`` is 0.
    ``budget = k > 0`` is a per-batch expert budget: of the experts some token of the call switched
    on, only the k with the largest summed score ``sum_tokens sigmoid(x Wr^T)`` stay on (for every
    token), so the union over the batch never exceeds k experts; the returned mask is the one used.
    w_router ``[E, D]`` with E = ceil(F / expert_size); other arguments as in ``sparse_ffn``.
    On CUDA up to 64 tokens run the router, budget and FFN kernels; more tokens (prefill) the
    masked dense path through cuBLAS.
    ``scales`` = (s_up, s_gate, s_down): w_up, w_gate and w_down_t are float8_e4m3fn with one fp32
    scale per row, W = Q * s[:, None] (``quantize_rows_fp8``; s_gate None for a plain FFN). The
    router and biases stay in x's dtype. Prefill then dequantizes the weights for the call.
    """
    fp8 = scales is not None
    num_exp = _validate_routed(x, w_router, tau, budget, w_up, w_down_t, w_gate, b_up, b_down, expert_size,
                               activation, fp8)
    if fp8:
        _check_scales(scales, w_gate, w_up.shape[0], x)
    model_width = x.shape[-1]
    x2 = x.reshape(-1, model_width).contiguous()  # [T, D]
    if fp8:
        s_up, s_gate, s_down = scales
        y, mask = torch.ops.lte.routed_sparse_ffn_fp8(x2, w_router, float(tau), w_up, w_down_t, w_gate, b_up,
                                                      b_down, s_up, s_down, s_gate, expert_size, activation, budget)
    else:
        y, mask = torch.ops.lte.routed_sparse_ffn(x2, w_router, float(tau), w_up, w_down_t, w_gate, b_up, b_down,
                                                  expert_size, activation, budget)
    return y.reshape(x.shape), mask.reshape(*x.shape[:-1], num_exp)  # [..., D], [..., E]


def routed_ffn_in(
    x: torch.Tensor,
    w_router: torch.Tensor,
    w_up: torch.Tensor,
    *,
    b_up: torch.Tensor | None = None,
    tau: float = 0.5,
    expert_size: int = 32,
    budget: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First half of a plain FFN: router (+ budget) and ``z = x W1^T + b1`` for the union's experts.

    x ``[..., D]``, w_router ``[E, D]``, w_up ``[F, D]``, b_up ``[F]``. Returns ``(z [..., F], mask
    [..., E] bool, union [E] int8)``; z is 0 where a token's expert is off, and undefined for experts
    no token uses (``sparse_ffn_out`` never reads them). Apply the activation to z, then call
    ``sparse_ffn_out(act(z), mask, union, ...)``."""
    num_exp = _validate_routed(x, w_router, tau, budget, w_up, w_up, None, b_up, None, expert_size, "relu")
    model_width = x.shape[-1]
    x2 = x.reshape(-1, model_width).contiguous()  # [T, D]
    z, mask, union = torch.ops.lte.routed_ffn_in(x2, w_router, float(tau), w_up, b_up, expert_size, budget)
    return z.reshape(*x.shape[:-1], w_up.shape[0]), mask.reshape(*x.shape[:-1], num_exp), union


def sparse_ffn_out(
    h: torch.Tensor,
    mask: torch.Tensor,
    union: torch.Tensor,
    w_down_t: torch.Tensor,
    *,
    b_down: torch.Tensor | None = None,
    expert_size: int = 32,
) -> torch.Tensor:
    """Second half: ``y = (h * m) Wd_t + b2`` for h ``[..., F]`` (the activated z of ``routed_ffn_in``),
    its mask ``[..., E]`` and union ``[E]``; w_down_t ``[F, D]``, b_down ``[D]``. Returns ``[..., D]``."""
    ffn_width, model_width = w_down_t.shape
    if h.shape[-1] != ffn_width or h.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"h must be a float [..., {ffn_width}] tensor, got {h.dtype} {list(h.shape)}")
    num_exp = num_experts(ffn_width, expert_size)
    if mask.dtype != torch.bool or mask.shape != (*h.shape[:-1], num_exp):
        raise ValueError(f"mask must be bool {[*h.shape[:-1], num_exp]}, got {mask.dtype} {list(mask.shape)}")
    if union.dtype != torch.int8 or union.shape != (num_exp,):
        raise ValueError(f"union must be int8 [{num_exp}], got {union.dtype} {list(union.shape)}")
    if not w_down_t.is_contiguous() or w_down_t.device != h.device:
        raise ValueError("w_down_t must be a contiguous [F, D] tensor on h's device")
    _check_bias("b_down", b_down, model_width, h.new_empty(0, dtype=w_down_t.dtype))
    h2 = h.reshape(-1, ffn_width).contiguous()  # [T, F]
    y = torch.ops.lte.sparse_ffn_out(h2, mask.reshape(-1, num_exp).contiguous(), union, w_down_t, b_down,
                                     expert_size)
    return y.reshape(*h.shape[:-1], model_width)
