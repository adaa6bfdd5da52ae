"""Triton kernels for one LTE FFN at decode time (B = 1..16 tokens) and their launcher.

Dimensions: B tokens, D model width, F FFN width, S expert size, E = ceil(F / S) experts.
Weights are ``[F, D]`` row-major (gate/up/W1 as PyTorch stores them, the down projection
transposed), so expert ``e`` is the contiguous row slab ``[e*S, min((e+1)*S, F))`` of each matrix.

Three launches, all reading the per-token expert mask on the GPU (no host sync, graph-capturable):

1. ``_ffn_in_kernel``: one program per block of ``BLOCK_F`` neuron rows. If no token of the batch
   needs any row of the block it reads nothing and returns; otherwise it reads the gate/up rows
   once for all B tokens and writes ``h[b, f] = act(g) * u * m[b, expert(f)]`` (fp32) to a scratch.
2. ``_ffn_out_kernel``: the down projection as a split-K reduction. Program (d, s) owns
   ``BLOCK_D`` output columns and the s-th slice of neuron rows; it walks the slice in blocks of
   ``BLOCK_R`` rows, skips blocks that no token needs (union), and accumulates ``h @ Wd_t`` in fp32
   registers. It stores its partial sum to ``part[s, b, d]`` (plain stores, no atomics).
3. ``_ffn_finish_kernel``: ``y[b, d] = sum_s part[s, b, d] (+ b2)``, cast to the output dtype.

Small batches (B <= 4) accumulate with broadcast multiply-adds; larger ones pad the tokens to 16
and use ``tl.dot``. This module imports triton at import time: import it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .reference import ACTIVATIONS

MAX_TOKENS = 16  # the decode kernels handle up to this many tokens per call
_ACT_CODE = {name: code for code, name in enumerate(ACTIVATIONS)}  # silu 0, gelu 1, gelu_tanh 2, relu 3


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """act(z) in fp32: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu."""
    if ACT == 0:
        out = z * tl.sigmoid(z)
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        # 0.5 * z * (1 + tanh(u)) == z * sigmoid(2u), u = sqrt(2/pi) * (z + 0.044715 z^3)
        out = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    else:
        out = tl.maximum(z, 0.0)
    return out


@triton.jit
def _ffn_in_kernel(
    x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, h_ptr,
    B, D, F, S,
    stride_xb, stride_mb, stride_hb,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    B_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """h[b, rows] for one block of BLOCK_F neuron rows, for all B tokens (see module doc)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
    row_ok = rows < F
    toks = tl.arange(0, B_PAD)  # [B_PAD]
    tok_ok = toks < B
    bf_ok = tok_ok[:, None] & row_ok[None, :]  # [B_PAD, BLOCK_F]
    experts = rows // S
    m = tl.load(mask_ptr + toks[:, None] * stride_mb + experts[None, :], mask=bf_ok, other=0)
    needed = tl.max(tl.max(m.to(tl.int32), axis=1), axis=0)
    if needed > 0:
        w_rows = rows.to(tl.int64) * D  # [BLOCK_F] row offsets into [F, D]
        if USE_DOT:
            acc_u = tl.zeros([B_PAD, BLOCK_F], dtype=tl.float32)
            acc_g = tl.zeros([B_PAD, BLOCK_F], dtype=tl.float32)
        else:
            acc_u3 = tl.zeros([B_PAD, BLOCK_F, BLOCK_K], dtype=tl.float32)
            acc_g3 = tl.zeros([B_PAD, BLOCK_F, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # [BLOCK_K]
            k_ok = ks < D
            xt = tl.load(x_ptr + toks[:, None] * stride_xb + ks[None, :],
                         mask=tok_ok[:, None] & k_ok[None, :], other=0.0)  # [B_PAD, BLOCK_K]
            w_off = w_rows[:, None] + ks[None, :]  # [BLOCK_F, BLOCK_K]
            w_ok = row_ok[:, None] & k_ok[None, :]
            wu = tl.load(wu_ptr + w_off, mask=w_ok, other=0.0)
            if USE_DOT:
                acc_u = tl.dot(xt, tl.trans(wu), acc_u, input_precision=DOT_PREC)
            else:
                acc_u3 += xt.to(tl.float32)[:, None, :] * wu.to(tl.float32)[None, :, :]
            if GATED:
                wg = tl.load(wg_ptr + w_off, mask=w_ok, other=0.0)
                if USE_DOT:
                    acc_g = tl.dot(xt, tl.trans(wg), acc_g, input_precision=DOT_PREC)
                else:
                    acc_g3 += xt.to(tl.float32)[:, None, :] * wg.to(tl.float32)[None, :, :]
        if not USE_DOT:
            acc_u = tl.sum(acc_u3, axis=2)  # [B_PAD, BLOCK_F]
            acc_g = tl.sum(acc_g3, axis=2)
        if HAS_BIAS:
            acc_u += tl.load(bu_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
        if GATED:
            h = _activation(acc_g, ACT) * acc_u
        else:
            h = _activation(acc_u, ACT)
        h = tl.where(m != 0, h, 0.0)  # a token only uses its own experts
        tl.store(h_ptr + toks[:, None] * stride_hb + rows[None, :], h, mask=bf_ok)


@triton.jit
def _ffn_out_kernel(
    h_ptr, mask_ptr, wd_ptr, part_ptr,
    B, D, F, S, rows_per_split,
    stride_hb, stride_mb,
    B_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Partial down projection part[s, b, cols] over the s-th slice of neuron rows (see module doc)."""
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_ok = cols < D
    toks = tl.arange(0, B_PAD)
    tok_ok = toks < B
    row_start = pid_s * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, F)
    if USE_DOT:
        acc = tl.zeros([B_PAD, BLOCK_D], dtype=tl.float32)
    else:
        acc3 = tl.zeros([B_PAD, BLOCK_R, BLOCK_D], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)  # [BLOCK_R]
        row_ok = rows < row_end
        br_ok = tok_ok[:, None] & row_ok[None, :]  # [B_PAD, BLOCK_R]
        m = tl.load(mask_ptr + toks[:, None] * stride_mb + (rows // S)[None, :], mask=br_ok, other=0)
        needed = tl.max(tl.max(m.to(tl.int32), axis=1), axis=0)
        if needed > 0:
            h = tl.load(h_ptr + toks[:, None] * stride_hb + rows[None, :], mask=br_ok, other=0.0)
            h = tl.where(m != 0, h, 0.0)  # rows the first kernel skipped hold garbage
            w = tl.load(wd_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_D]
            if USE_DOT:
                acc = tl.dot(h.to(w.dtype), w, acc, input_precision=DOT_PREC)
            else:
                acc3 += h[:, :, None] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=1)  # [B_PAD, BLOCK_D]
    out_off = pid_s * B * D + toks[:, None] * D + cols[None, :]
    tl.store(part_ptr + out_off, acc, mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def _ffn_finish_kernel(
    part_ptr, bd_ptr, y_ptr,
    B, D, SPLIT, stride_yb,
    HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """y[b, cols] = sum over splits of part[s, b, cols] (+ b2), cast to y's dtype."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * B * D + b * D + cols, mask=col_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * stride_yb + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the three launches (None: chosen from the shapes by ``default_config``)."""

    in_block_f: int = 16
    in_block_k: int = 256
    in_warps: int = 4
    in_stages: int = 3
    out_block_r: int = 32
    out_block_d: int = 256
    out_split: int = 16
    out_warps: int = 4
    out_stages: int = 3
    finish_block: int = 512
    use_dot: bool | None = None  # None: dot when B > DOT_MIN_TOKENS


DOT_MIN_TOKENS = 4


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(num_tokens: int, model_width: int, ffn_width: int) -> KernelConfig:
    """Heuristic tile sizes: enough programs for 132 SMs, wide rows for coalesced loads."""
    cfg = KernelConfig()
    if num_tokens > DOT_MIN_TOKENS:
        cfg = replace(cfg, in_block_k=128, out_block_d=128, out_split=8)
    elif num_tokens > 1:
        cfg = replace(cfg, in_block_f=8, in_block_k=256, out_block_d=128)
    return cfg


def sparse_ffn_triton(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    expert_size: int,
    activation: str,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Launch the three kernels for x [B, D] (B <= 16) and mask [B, E] (bool); returns y [B, D].

    Inputs must already be validated (see ``lte.kernels.sparse_ffn``): contiguous, same device
    and dtype for x and the weights.
    """
    num_tokens, model_width = x.shape  # B, D
    ffn_width = w_up.shape[0]  # F
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"the decode kernels take at most {MAX_TOKENS} tokens, got {num_tokens}")
    cfg = config or default_config(num_tokens, model_width, ffn_width)
    use_dot = cfg.use_dot if cfg.use_dot is not None else num_tokens > DOT_MIN_TOKENS
    b_pad = max(16, _next_pow2(num_tokens)) if use_dot else _next_pow2(num_tokens)
    dot_prec = "ieee" if x.dtype == torch.float32 else "tf32"
    mask_u8 = mask.view(torch.uint8)  # [B, E], bool -> bytes without a copy
    device = x.device

    h = torch.empty(num_tokens, ffn_width, device=device, dtype=torch.float32)  # [B, F] scratch
    _ffn_in_kernel[(triton.cdiv(ffn_width, cfg.in_block_f),)](
        x, mask_u8, w_gate if w_gate is not None else w_up, w_up, b_up if b_up is not None else w_up, h,
        num_tokens, model_width, ffn_width, expert_size,
        x.stride(0), mask_u8.stride(0), h.stride(0),
        GATED=w_gate is not None, HAS_BIAS=b_up is not None, ACT=_ACT_CODE[activation],
        B_PAD=b_pad, BLOCK_F=cfg.in_block_f, BLOCK_K=cfg.in_block_k,
        USE_DOT=use_dot, DOT_PREC=dot_prec,
        num_warps=cfg.in_warps, num_stages=cfg.in_stages,
    )

    row_blocks = triton.cdiv(ffn_width, cfg.out_block_r)
    split = max(1, min(cfg.out_split, row_blocks))
    rows_per_split = triton.cdiv(row_blocks, split) * cfg.out_block_r
    split = triton.cdiv(ffn_width, rows_per_split)  # drop empty slices
    part = torch.empty(split, num_tokens, model_width, device=device, dtype=torch.float32)  # [SPLIT, B, D]
    _ffn_out_kernel[(triton.cdiv(model_width, cfg.out_block_d), split)](
        h, mask_u8, w_down_t, part,
        num_tokens, model_width, ffn_width, expert_size, rows_per_split,
        h.stride(0), mask_u8.stride(0),
        B_PAD=b_pad, BLOCK_R=cfg.out_block_r, BLOCK_D=cfg.out_block_d,
        USE_DOT=use_dot, DOT_PREC=dot_prec,
        num_warps=cfg.out_warps, num_stages=cfg.out_stages,
    )

    y = torch.empty(num_tokens, model_width, device=device, dtype=x.dtype)  # [B, D]
    _ffn_finish_kernel[(triton.cdiv(model_width, cfg.finish_block), num_tokens)](
        part, b_down if b_down is not None else part, y,
        num_tokens, model_width, split, y.stride(0),
        HAS_BIAS=b_down is not None, BLOCK=cfg.finish_block,
    )
    return y


@triton.jit
def _router_mask_kernel(
    x_ptr, wr_ptr, out_ptr,
    B, D, E, threshold,
    stride_xb, stride_ob,
    B_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b, e] = (x[b] . Wr[e] > threshold) for one block of BLOCK_E experts, fp32 accumulation."""
    pid = tl.program_id(0)
    experts = pid * BLOCK_E + tl.arange(0, BLOCK_E)  # [BLOCK_E]
    e_ok = experts < E
    toks = tl.arange(0, B_PAD)
    tok_ok = toks < B
    w_rows = experts.to(tl.int64) * D
    acc3 = tl.zeros([B_PAD, BLOCK_E, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < D
        xt = tl.load(x_ptr + toks[:, None] * stride_xb + ks[None, :],
                     mask=tok_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [B_PAD, BLOCK_K]
        w = tl.load(wr_ptr + w_rows[:, None] + ks[None, :],
                    mask=e_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)  # [BLOCK_E, BLOCK_K]
        acc3 += xt[:, None, :] * w[None, :, :]
    logits = tl.sum(acc3, axis=2)  # [B_PAD, BLOCK_E]
    hit = (logits > threshold).to(tl.int8)
    tl.store(out_ptr + toks[:, None] * stride_ob + experts[None, :], hit,
             mask=tok_ok[:, None] & e_ok[None, :])


def router_mask_triton(x: torch.Tensor, w_router: torch.Tensor, threshold: float) -> torch.Tensor:
    """Fused router GEMV + threshold on the logits for x [B, D] (B <= 16); returns bool [B, E]."""
    num_tokens, model_width = x.shape  # B, D
    num_exp = w_router.shape[0]  # E
    if num_tokens > MAX_TOKENS:
        raise ValueError(f"the router kernel takes at most {MAX_TOKENS} tokens, got {num_tokens}")
    out = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    out_u8 = out.view(torch.uint8)
    b_pad = _next_pow2(num_tokens)
    block_e = 8 if b_pad <= 4 else 4
    block_k = max(32, 1024 // b_pad) if b_pad <= 4 else 64
    _router_mask_kernel[(triton.cdiv(num_exp, block_e),)](
        x, w_router, out_u8,
        num_tokens, model_width, num_exp, threshold,
        x.stride(0), out_u8.stride(0),
        B_PAD=b_pad, BLOCK_E=block_e, BLOCK_K=block_k,
        num_warps=4,
    )
    return out
