"""Triton kernels for one LTE FFN at decode time (B = 1..64 tokens) and their launchers.

Dimensions: B tokens, D model width, F FFN width, S expert size, E = ceil(F / S) experts.
Weights are ``[F, D]`` row-major (gate/up/W1 as PyTorch stores them, the down projection
transposed), so expert ``e`` is the contiguous row slab ``[e*S, min((e+1)*S, F))`` of each matrix.

Launches, all reading masks from GPU memory (no host sync, CUDA-graph capturable):

0. The *union* of the batch's masks, ``union[e] = 1`` when some token needs expert e, comes from
   the router kernel (``_router_kernel``: logits, threshold, per-token mask and union in one pass)
   or, when the caller brings its own mask, from ``_union_kernel``. With a per-batch expert budget
   ``_budget_kernel`` keeps the union's ``k`` experts with the largest summed router score.
1. ``_ffn_in_kernel``: every program loads the union flags and takes their prefix sum, so it knows
   the list of active experts without any host work. The work is the list of (active expert, row
   block) items, split into contiguous equal shares over the grid; a program reads the gate/up rows
   of its items once for all B tokens and writes ``h[b, f] = act(g) * u * m[b, expert(f)]`` to a
   scratch. At a full union the items are every row in order: a dense GEMV/GEMM schedule.
2. ``_ffn_out_kernel``: the down projection as a split-K reduction over the active list. Program
   (d, s) owns ``BLOCK_D`` output columns and the s-th equal share of the active experts, and
   stores its fp32 partial sum to ``part[s, b, d]`` (plain stores, no atomics, no zeroing).
3. ``_ffn_finish_kernel``: ``y[b, d] = sum_s part[s, b, d] (+ b2)``, cast to the output dtype.

On Hopper, launches 1-3 (and the budget kernel) use programmatic dependent launch (PDL): they
start while the previous kernel drains and wait (``gdc_wait``) before reading its output. Launch 1
triggers its dependents only after its own wait, so the down kernel may read the union (written
before launch 1 started) and its first weight slab before it waits for ``h``.
B = 1 accumulates with broadcast multiply-adds; B >= 2 pads the tokens to 16+ and uses ``tl.dot``.
Tile sizes: ``lte.kernels.tuning`` (per GPU and shape, with shape-aware defaults). This module
imports triton at import time: import it lazily.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .reference import ACTIVATIONS
from .tuning import KernelConfig, gpu_key, heuristic_config, lookup

try:  # grid dependency control (programmatic dependent launch, Hopper+), Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

__all__ = ["KernelConfig", "MAX_TOKENS", "default_config", "plan_launch", "routed_ffn_in_triton",
           "routed_sparse_ffn_triton", "router_mask_triton", "sparse_ffn_out_triton", "sparse_ffn_triton"]

MAX_TOKENS = 64  # the decode kernels handle up to this many tokens per call
MAX_EXPERTS = 8192  # the kernels hold the union flags of every expert in registers
DOT_MIN_TOKENS = 1  # tl.dot above this many tokens (broadcast multiply-adds at or below)
#: activation codes: the public ones (silu 0, gelu 1, gelu_tanh 2, relu 3) and "identity" (4) for
#: FFNs whose activation the model applies itself between our two halves.
_ACT_CODE = {name: code for code, name in enumerate((*ACTIVATIONS, "identity"))}


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """act(z) in fp32: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu, 4 identity."""
    if ACT == 0:
        out = z * tl.sigmoid(z)
    elif ACT == 1:
        out = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        # 0.5 * z * (1 + tanh(u)) == z * sigmoid(2u), u = sqrt(2/pi) * (z + 0.044715 z^3)
        out = z * tl.sigmoid(1.5957691216057308 * (z + 0.044715 * z * z * z))
    elif ACT == 3:
        out = tl.maximum(z, 0.0)
    else:
        out = z
    return out


@triton.jit
def _active_list(union_ptr, E, E_PAD: tl.constexpr):
    """Union flags -> (inclusive prefix sum [E_PAD], number of active experts).

    The j-th active expert (0-based) is ``sum(csum <= j)``: the count of positions whose running
    total has not yet reached j + 1 (see ``_nth_active``)."""
    e_idx = tl.arange(0, E_PAD)
    flags = tl.load(union_ptr + e_idx, mask=e_idx < E, other=0).to(tl.int32)
    csum = tl.cumsum(flags, axis=0)
    return csum, tl.sum(flags, axis=0)


@triton.jit
def _nth_active(csum, first, SLOTS: tl.constexpr):
    """Expert ids [SLOTS] of the active experts first, first + 1, ... (past the end: E_PAD)."""
    want = first + tl.arange(0, SLOTS)  # [SLOTS]
    return tl.sum((csum[None, :] <= want[:, None]).to(tl.int32), axis=1)


@triton.jit
def _pick(ids, slot, SLOTS: tl.constexpr):
    """ids[slot] for a run-time slot (a masked reduction: registers cannot be indexed at run time)."""
    return tl.sum(tl.where(tl.arange(0, SLOTS) == slot, ids, 0), axis=0)


@triton.jit
def _router_kernel(
    x_ptr, wr_ptr, mask_ptr, union_ptr, score_ptr,
    B, D, E, threshold,
    stride_xb, stride_mb,
    B_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, ONE_STEP: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, WITH_SCORE: tl.constexpr, PDL: tl.constexpr,
    TRIGGER: tl.constexpr,
):
    """mask[b, e] = x[b] . Wr[e] > threshold, union[e] = any_b mask[b, e] (and the summed sigmoid
    scores when WITH_SCORE) for one block of BLOCK_E experts; fp32 accumulation.

    With PDL the kernel may start before the previous kernel (which wrote x) has finished: in one
    step (ONE_STEP, all of D at once) it reads its router rows first and waits only before x.
    TRIGGER lets the next (PDL-launched) kernel start early; it waits for this one before reading."""
    if TRIGGER:
        gdc_launch_dependents()
    pid = tl.program_id(0)
    experts = pid * BLOCK_E + tl.arange(0, BLOCK_E)  # [BLOCK_E]
    e_ok = experts < E
    toks = tl.arange(0, B_PAD)
    tok_ok = toks < B
    w_rows = experts.to(tl.int64) * D
    if ONE_STEP:
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < D
        w = tl.load(wr_ptr + w_rows[:, None] + ks[None, :], mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        if PDL:
            gdc_wait()
        xt = tl.load(x_ptr + toks[:, None] * stride_xb + ks[None, :], mask=tok_ok[:, None] & k_ok[None, :],
                     other=0.0)  # [B_PAD, BLOCK_K]
        if USE_DOT:
            logits = tl.dot(xt, tl.trans(w), input_precision=DOT_PREC)  # [B_PAD, BLOCK_E]
        else:
            logits = tl.sum(xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    else:
        if PDL:
            gdc_wait()
        if USE_DOT:
            logits = tl.zeros([B_PAD, BLOCK_E], dtype=tl.float32)
        else:
            acc3 = tl.zeros([B_PAD, BLOCK_E, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < D
            xt = tl.load(x_ptr + toks[:, None] * stride_xb + ks[None, :], mask=tok_ok[:, None] & k_ok[None, :],
                         other=0.0)  # [B_PAD, BLOCK_K]
            w = tl.load(wr_ptr + w_rows[:, None] + ks[None, :], mask=e_ok[:, None] & k_ok[None, :],
                        other=0.0)  # [BLOCK_E, BLOCK_K]
            if USE_DOT:
                logits = tl.dot(xt, tl.trans(w), logits, input_precision=DOT_PREC)
            else:
                acc3 += xt.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if not USE_DOT:
            logits = tl.sum(acc3, axis=2)  # [B_PAD, BLOCK_E]
    valid = tok_ok[:, None] & e_ok[None, :]
    hit = (logits > threshold) & valid
    tl.store(mask_ptr + toks[:, None] * stride_mb + experts[None, :], hit.to(tl.int8), mask=valid)
    tl.store(union_ptr + experts, tl.max(hit.to(tl.int32), axis=0).to(tl.int8), mask=e_ok)
    if WITH_SCORE:
        score = tl.where(valid, tl.sigmoid(logits), 0.0)
        tl.store(score_ptr + experts, tl.sum(score, axis=0), mask=e_ok)


@triton.jit
def _union_kernel(mask_ptr, union_ptr, B, E, stride_mb, B_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                  TRIGGER: tl.constexpr):
    """union[e] = any_b mask[b, e] for one block of BLOCK_E experts."""
    if TRIGGER:
        gdc_launch_dependents()
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = experts < E
    toks = tl.arange(0, B_PAD)
    m = tl.load(mask_ptr + toks[:, None] * stride_mb + experts[None, :],
                mask=(toks < B)[:, None] & e_ok[None, :], other=0).to(tl.int32)  # [B_PAD, BLOCK_E]
    tl.store(union_ptr + experts, tl.max(m, axis=0).to(tl.int8), mask=e_ok)


@triton.jit
def _budget_kernel(
    union_in_ptr, score_ptr, union_ptr, mask_ptr,
    B, E, budget, stride_mb,
    E_PAD: tl.constexpr, B_PAD: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr,
):
    """Keep the ``budget`` union experts with the largest summed score; write the new union and
    clear dropped experts from every token's mask (this program's block of BLOCK_E experts).

    Every program finds the same cut: the budget-th largest score by bisection on the fp32 bit
    patterns (scores are sums of sigmoids, >= 0, so their bits order like the values); ties at the
    cut go to the lower expert index."""
    if PDL:
        gdc_wait()  # the union and the scores come from the router
        gdc_launch_dependents()
    e_idx = tl.arange(0, E_PAD)
    e_ok = e_idx < E
    on = tl.load(union_in_ptr + e_idx, mask=e_ok, other=0) != 0
    score = tl.load(score_ptr + e_idx, mask=e_ok, other=0.0)
    bits = tl.where(on, score.to(tl.int32, bitcast=True), -1)  # [E_PAD]; -1: not in the union
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.full([], 0x7F800000, dtype=tl.int32)
    for _ in range(31):  # largest t with count(bits >= t) >= budget
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((bits >= mid).to(tl.int32), axis=0) >= budget
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    above = tl.sum((bits > lo).to(tl.int32), axis=0)  # kept for sure; ties at lo fill up to budget
    pid = tl.program_id(0)
    start = pid * BLOCK_E
    ties_before = tl.sum(((bits == lo) & (e_idx < start)).to(tl.int32), axis=0)
    blk = start + tl.arange(0, BLOCK_E)
    blk_ok = blk < E
    on_b = tl.load(union_in_ptr + blk, mask=blk_ok, other=0) != 0
    bits_b = tl.where(on_b, tl.load(score_ptr + blk, mask=blk_ok, other=0.0).to(tl.int32, bitcast=True), -1)
    tie_b = bits_b == lo
    tie_rank = ties_before + tl.cumsum(tie_b.to(tl.int32), axis=0)  # 1-based rank among the ties
    keep = on_b & ((bits_b > lo) | (tie_b & (tie_rank <= budget - above)))
    tl.store(union_ptr + blk, keep.to(tl.int8), mask=blk_ok)
    toks = tl.arange(0, B_PAD)
    mb_ok = (toks < B)[:, None] & blk_ok[None, :]
    m_ptrs = mask_ptr + toks[:, None] * stride_mb + blk[None, :]
    m = tl.load(m_ptrs, mask=mb_ok, other=0)
    tl.store(m_ptrs, tl.where(keep[None, :], m, 0).to(tl.int8), mask=mb_ok)


@triton.jit
def _ffn_in_item(
    x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, h_ptr, expert, block,
    B, D, F, S, stride_xb, stride_mb, stride_hb,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    B_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One work item: h[b, rows] for row block ``block`` of ``expert``, all B tokens."""
    toks = tl.arange(0, B_PAD)  # [B_PAD]
    tok_ok = toks < B
    local = block * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F] rows within the expert
    rows = expert * S + local
    row_ok = (local < S) & (rows < F)
    m = tl.load(mask_ptr + toks * stride_mb + expert, mask=tok_ok, other=0)  # [B_PAD]
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
    h = tl.where(m[:, None] != 0, h, 0.0)  # a token only uses its own experts
    tl.store(h_ptr + toks[:, None] * stride_hb + rows[None, :], h.to(h_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _ffn_in_kernel(
    x_ptr, mask_ptr, union_ptr, wg_ptr, wu_ptr, bu_ptr, h_ptr,
    B, D, F, S, E, RB,
    stride_xb, stride_mb, stride_hb,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    B_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
    SLOTS: tl.constexpr, PERSISTENT: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    """h for the (active expert, row block) items: an item is BLOCK_F rows of one expert
    (RB = ceil(S / BLOCK_F) items per expert); a token whose mask is off for the expert gets h = 0.

    PERSISTENT: each program takes a contiguous equal share of the items (SLOTS bounds the experts
    a share can span); otherwise program i does item i, if there is one."""
    if PDL:
        gdc_wait()  # the union and the masks come from the previous launch
        gdc_launch_dependents()  # only now: the down kernel reads the union before it waits
    pid = tl.program_id(0)
    csum, n_active = _active_list(union_ptr, E, E_PAD)
    n_items = n_active * RB
    if PERSISTENT:
        share = tl.cdiv(n_items, tl.num_programs(0))
        i0 = pid * share
        i1 = tl.minimum(i0 + share, n_items)
        j_first = i0 // RB
        ids = _nth_active(csum, j_first, SLOTS)  # the experts this share can touch
        for item in range(i0, i1):
            j = item // RB
            _ffn_in_item(x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, h_ptr, _pick(ids, j - j_first, SLOTS),
                         item - j * RB, B, D, F, S, stride_xb, stride_mb, stride_hb,
                         GATED, HAS_BIAS, ACT, B_PAD, BLOCK_F, BLOCK_K, USE_DOT, DOT_PREC)
    else:
        if pid < n_items:
            j = pid // RB
            expert = tl.sum((csum <= j).to(tl.int32), axis=0)  # the j-th active expert
            _ffn_in_item(x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, h_ptr, expert, pid - j * RB,
                         B, D, F, S, stride_xb, stride_mb, stride_hb,
                         GATED, HAS_BIAS, ACT, B_PAD, BLOCK_F, BLOCK_K, USE_DOT, DOT_PREC)


@triton.jit
def _ffn_out_kernel(
    h_ptr, union_ptr, mask_ptr, wd_ptr, part_ptr,
    B, D, F, S, E,
    stride_hb, stride_mb,
    B_PAD: tl.constexpr, S_PAD: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, TOKEN_MASK: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr,
):
    """Partial down projection part[s, b, cols] over the s-th equal share of the active experts.

    With PDL the kernel starts while the gate/up kernel runs: it reads the union (complete before
    that kernel triggered this launch) and its first Wd_t slab, and waits (gdc_wait) only before
    it reads h. The share's expert ids are found CHUNK at a time (a [CHUNK, E_PAD] comparison).
    TOKEN_MASK applies each token's mask to h (when h comes from elsewhere than the gate/up
    kernel, which zeroes it)."""
    if PDL:
        gdc_launch_dependents()
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    nsplit = tl.num_programs(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_ok = cols < D
    toks = tl.arange(0, B_PAD)
    tok_ok = toks < B
    csum, n_active = _active_list(union_ptr, E, E_PAD)
    j0 = (n_active * pid_s) // nsplit
    j1 = (n_active * (pid_s + 1)) // nsplit
    offs_s = tl.arange(0, S_PAD)
    if USE_DOT:
        acc = tl.zeros([B_PAD, BLOCK_D], dtype=tl.float32)
    else:
        acc3 = tl.zeros([B_PAD, S_PAD, BLOCK_D], dtype=tl.float32)
    for c0 in range(j0, j1, CHUNK):
        ids = _nth_active(csum, c0, CHUNK)  # the next CHUNK active experts
        for j in range(c0, tl.minimum(c0 + CHUNK, j1)):
            expert = _pick(ids, j - c0, CHUNK)
            rows = expert * S + offs_s  # [S_PAD] the expert's neuron rows
            row_ok = (offs_s < S) & (rows < F)
            w = tl.load(wd_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # [S_PAD, BLOCK_D]
            if PDL:
                gdc_wait()  # h comes from the gate/up kernel (a no-op once it has completed)
            h_ok = tok_ok
            if TOKEN_MASK:
                h_ok = h_ok & (tl.load(mask_ptr + toks * stride_mb + expert, mask=tok_ok, other=0) != 0)
            h = tl.load(h_ptr + toks[:, None] * stride_hb + rows[None, :],
                        mask=h_ok[:, None] & row_ok[None, :], other=0.0)  # [B_PAD, S_PAD]
            if USE_DOT:
                acc = tl.dot(h.to(w.dtype), w, acc, input_precision=DOT_PREC)
            else:
                acc3 += h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=1)  # [B_PAD, BLOCK_D]
    if PDL:
        gdc_wait()  # never complete before the gate/up kernel, even with no expert in this share
    out_off = pid_s * B * D + toks[:, None] * D + cols[None, :]
    tl.store(part_ptr + out_off, acc, mask=tok_ok[:, None] & col_ok[None, :])


@triton.jit
def _ffn_finish_kernel(
    part_ptr, bd_ptr, y_ptr,
    B, D, SPLIT, stride_yb,
    HAS_BIAS: tl.constexpr, SPLIT_PAD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """y[b, cols] = sum over splits of part[s, b, cols] (+ b2), cast to y's dtype (one load round trip)."""
    if PDL:
        gdc_wait()  # the partial sums come from the previous kernel
    pid_d = tl.program_id(0)
    b = tl.program_id(1)
    cols = pid_d * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    col_ok = cols < D
    splits = tl.arange(0, SPLIT_PAD)  # [SPLIT_PAD]
    part = tl.load(part_ptr + splits[:, None] * B * D + b * D + cols[None, :],
                   mask=(splits < SPLIT)[:, None] & col_ok[None, :], other=0.0)  # [SPLIT_PAD, BLOCK]
    acc = tl.sum(part, axis=0)
    if HAS_BIAS:
        acc += tl.load(bd_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * stride_yb + cols, acc.to(y_ptr.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------- planning
def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.cache
def _device_info(device: torch.device) -> tuple[str, int]:
    """(table key of the GPU, number of SMs); ("cpu", 4) off CUDA (Triton's interpreter)."""
    if device.type != "cuda":
        return "cpu", 4
    props = torch.cuda.get_device_properties(device)
    return gpu_key(props.name), props.multi_processor_count


def default_config(num_tokens: int, model_width: int, ffn_width: int,
                   device: torch.device | str | None = None) -> KernelConfig:
    """The settings for this call: the tuned table row for the GPU and shape, else the heuristic."""
    dev = torch.device(device) if device is not None else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    gpu, num_sms = _device_info(dev)
    tuned = lookup(gpu, model_width, ffn_width, num_tokens)
    return tuned if tuned is not None else heuristic_config(num_tokens, model_width, ffn_width, num_sms)


@dataclass
class FFNLaunch:
    """Everything the launches of one call need: inputs, scratch buffers and settings."""

    x: torch.Tensor  # [B, D]
    mask_u8: torch.Tensor  # [B, E] bytes (1 = expert on for the token)
    union: torch.Tensor  # [E] int8, filled by the router / union / budget launch
    w_up: torch.Tensor  # [F, D]
    w_down_t: torch.Tensor  # [F, D]
    w_gate: torch.Tensor | None  # [F, D]
    b_up: torch.Tensor | None  # [F]
    b_down: torch.Tensor | None  # [D]
    expert_size: int
    activation: str
    cfg: KernelConfig
    use_dot: bool
    b_pad: int
    e_pad: int
    block_f: int  # rows per gate/up work item
    row_blocks: int  # RB: items per expert in the gate/up kernel
    max_items: int  # E x RB
    in_grid: int
    in_slots: int
    split: int
    out_chunk: int  # expert ids the down kernel finds at a time
    pdl: bool
    h: torch.Tensor  # [B, F] scratch (fp32, or x's dtype for the identity activation)
    part: torch.Tensor  # [SPLIT, B, D] fp32 partial sums
    y: torch.Tensor  # [B, D] output


def _out_chunk(num_exp: int, split: int) -> int:
    """Expert ids per step of the down kernel: the whole share when small, else what keeps the
    [CHUNK, E_PAD] comparison near 8K elements."""
    share = _next_pow2(triton.cdiv(num_exp, split))
    return max(2, min(share, max(4, 8192 // _next_pow2(num_exp))))


def _slots_for(max_share: int, row_blocks: int) -> int:
    """Experts one contiguous share of at most max_share items can span (power of two, >= 2)."""
    span = (max(max_share, 1) + row_blocks - 2) // row_blocks + 1
    return max(2, _next_pow2(span))


def plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
                config: KernelConfig | None = None, h_dtype: torch.dtype | None = None,
                h: torch.Tensor | None = None, need_out: bool = True) -> FFNLaunch:
    """Pick tiles and allocate the scratch for one call (no kernel runs here).

    mask [B, E] bool (or uint8); ``h_dtype`` defaults to fp32; ``h`` [B, F]: use this tensor as h
    (the down half alone); ``need_out=False``: no down-projection buffers (the gate/up half alone)."""
    num_tokens, model_width = x.shape  # B, D
    ffn_width = w_up.shape[0]  # F
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"the decode kernels take 1 to {MAX_TOKENS} tokens, got {num_tokens}")
    num_exp = triton.cdiv(ffn_width, expert_size)  # E
    if num_exp > MAX_EXPERTS:
        raise ValueError(f"the decode kernels take at most {MAX_EXPERTS} experts, got {num_exp}")
    cfg = config or default_config(num_tokens, model_width, ffn_width, x.device)
    use_dot = cfg.use_dot if cfg.use_dot is not None else num_tokens > DOT_MIN_TOKENS
    if use_dot and x.element_size() == 4:  # fp32: same shared-memory bytes per pipeline stage as 16-bit
        cfg = replace(cfg, in_block_k=max(16, cfg.in_block_k // 2))
    b_pad = max(16, _next_pow2(num_tokens)) if use_dot else _next_pow2(num_tokens)
    block_f = min(cfg.in_block_f, _next_pow2(expert_size))
    if use_dot:
        block_f = max(16, block_f)  # tl.dot needs 16+ on every side
    row_blocks = triton.cdiv(expert_size, block_f)
    max_items = num_exp * row_blocks
    _, num_sms = _device_info(x.device)
    in_grid = max_items if cfg.in_progs_per_sm <= 0 else max(1, min(max_items, num_sms * cfg.in_progs_per_sm))
    in_grid = max(in_grid, triton.cdiv(max_items, 16 * row_blocks))  # a share spans at most ~16 experts
    split = max(1, min(cfg.out_split, num_exp))
    device = x.device
    mask_u8 = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return FFNLaunch(
        x, mask_u8, torch.empty(num_exp, device=device, dtype=torch.int8),
        w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation,
        cfg, use_dot, b_pad, _next_pow2(num_exp), block_f, row_blocks, max_items, in_grid,
        _slots_for(triton.cdiv(max_items, in_grid), row_blocks), split,
        cfg.out_chunk or _out_chunk(num_exp, split), cfg.pdl and _pdl_supported(device),
        h=h if h is not None else torch.empty(num_tokens, ffn_width, device=device, dtype=h_dtype or torch.float32),
        part=torch.empty(split if need_out else 0, num_tokens, model_width, device=device, dtype=torch.float32),
        y=torch.empty(num_tokens, model_width if need_out else 0, device=device, dtype=x.dtype),
    )


@functools.cache
def _pdl_supported(device: torch.device) -> bool:
    """Programmatic dependent launch needs a CUDA GPU of compute capability 9.0+ and triton's GDC ops;
    ``LTE_PDL=0`` turns it off."""
    if device.type != "cuda" or gdc_wait is None or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if os.environ.get("LTE_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def _pdl_kwargs(on: bool) -> dict:
    return {"launch_pdl": True} if on else {}


def _dot_precision(x: torch.Tensor) -> str:
    return "ieee" if x.dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------- launches
def launch_union(p: FFNLaunch) -> None:
    """Union of the caller's per-token masks (the mask-given entry point)."""
    num_tokens = p.x.shape[0]
    num_exp = p.union.shape[0]
    block_e = 256
    _union_kernel[(triton.cdiv(num_exp, block_e),)](
        p.mask_u8, p.union, num_tokens, num_exp, p.mask_u8.stride(0),
        B_PAD=_next_pow2(num_tokens), BLOCK_E=block_e, TRIGGER=p.pdl, num_warps=4,
    )


def launch_router(x: torch.Tensor, w_router: torch.Tensor, threshold: float, mask_u8: torch.Tensor,
                  union: torch.Tensor, score: torch.Tensor | None, cfg: KernelConfig, pdl: bool) -> None:
    """Router logits -> per-token mask (mask_u8 [B, E]), union ([E] int8) and, when ``score`` is
    given, the summed sigmoid scores ([E] fp32)."""
    num_tokens, model_width = x.shape
    num_exp = w_router.shape[0]
    use_dot = num_tokens > 8 and cfg.router_block_e >= 16
    b_pad = max(16, _next_pow2(num_tokens)) if use_dot else _next_pow2(num_tokens)
    block_e = cfg.router_block_e if use_dot else max(1, cfg.router_block_e)
    full_k = _next_pow2(model_width)
    if use_dot:
        block_k = min(max(16, cfg.router_block_k or 128), 256, full_k)
    else:
        fits = full_k * b_pad * block_e <= 16384  # broadcast product held in registers
        block_k = min(cfg.router_block_k or (full_k if fits else max(64, 2048 // b_pad)), full_k)
    wait = cfg.router_pdl and pdl
    _router_kernel[(triton.cdiv(num_exp, block_e),)](
        x, w_router, mask_u8, union, score if score is not None else union,
        num_tokens, model_width, num_exp, threshold,
        x.stride(0), mask_u8.stride(0),
        B_PAD=b_pad, BLOCK_E=block_e, BLOCK_K=block_k, ONE_STEP=block_k >= model_width,
        USE_DOT=use_dot, DOT_PREC=_dot_precision(x), WITH_SCORE=score is not None, PDL=wait, TRIGGER=pdl,
        num_warps=cfg.router_warps, **_pdl_kwargs(wait),
    )


def launch_budget(p: FFNLaunch, union_in: torch.Tensor, score: torch.Tensor, budget: int) -> None:
    """Cut the union to its ``budget`` experts of largest summed score (p.union, p.mask_u8 updated)."""
    num_tokens = p.x.shape[0]
    num_exp = p.union.shape[0]
    block_e = 128
    _budget_kernel[(triton.cdiv(num_exp, block_e),)](
        union_in, score, p.union, p.mask_u8,
        num_tokens, num_exp, budget, p.mask_u8.stride(0),
        E_PAD=p.e_pad, B_PAD=_next_pow2(num_tokens), BLOCK_E=block_e, PDL=p.pdl,
        num_warps=4, **_pdl_kwargs(p.pdl),
    )


def launch_in(p: FFNLaunch) -> None:
    """Gate/up kernel: h = act(gate) * up * mask for the rows of the union's experts."""
    num_tokens, model_width = p.x.shape
    ffn_width = p.w_up.shape[0]
    cfg = p.cfg
    _ffn_in_kernel[(p.in_grid,)](
        p.x, p.mask_u8, p.union, p.w_gate if p.w_gate is not None else p.w_up, p.w_up,
        p.b_up if p.b_up is not None else p.w_up, p.h,
        num_tokens, model_width, ffn_width, p.expert_size, p.union.shape[0], p.row_blocks,
        p.x.stride(0), p.mask_u8.stride(0), p.h.stride(0),
        GATED=p.w_gate is not None, HAS_BIAS=p.b_up is not None, ACT=_ACT_CODE[p.activation],
        B_PAD=p.b_pad, BLOCK_F=p.block_f,
        BLOCK_K=cfg.in_block_k, E_PAD=p.e_pad, SLOTS=p.in_slots, PERSISTENT=p.in_grid < p.max_items,
        USE_DOT=p.use_dot, DOT_PREC=_dot_precision(p.x), PDL=p.pdl,
        num_warps=cfg.in_warps, num_stages=cfg.in_stages, **_pdl_kwargs(p.pdl),
    )


def launch_out(p: FFNLaunch, token_mask: bool = False) -> None:
    """Down kernel: partial down projections over equal shares of the union's experts
    (``token_mask``: apply each token's mask to h, for an h the gate/up kernel did not write)."""
    num_tokens, model_width = p.x.shape
    ffn_width = p.w_up.shape[0]
    cfg = p.cfg
    _ffn_out_kernel[(triton.cdiv(model_width, cfg.out_block_d), p.split)](
        p.h, p.union, p.mask_u8, p.w_down_t, p.part,
        num_tokens, model_width, ffn_width, p.expert_size, p.union.shape[0],
        p.h.stride(0), p.mask_u8.stride(0),
        B_PAD=p.b_pad, S_PAD=max(16, _next_pow2(p.expert_size)), E_PAD=p.e_pad, CHUNK=p.out_chunk,
        BLOCK_D=cfg.out_block_d, TOKEN_MASK=token_mask, USE_DOT=p.use_dot, DOT_PREC=_dot_precision(p.x),
        PDL=p.pdl,
        num_warps=cfg.out_warps, num_stages=cfg.out_stages, **_pdl_kwargs(p.pdl),
    )


def launch_finish(p: FFNLaunch) -> None:
    """Finish kernel: sum the partials, add b2, cast."""
    num_tokens, model_width = p.x.shape
    _ffn_finish_kernel[(triton.cdiv(model_width, p.cfg.finish_block), num_tokens)](
        p.part, p.b_down if p.b_down is not None else p.part, p.y,
        num_tokens, model_width, p.split, p.y.stride(0),
        HAS_BIAS=p.b_down is not None, SPLIT_PAD=_next_pow2(p.split), BLOCK=p.cfg.finish_block,
        PDL=p.pdl, **_pdl_kwargs(p.pdl),
    )


def run_ffn(p: FFNLaunch) -> torch.Tensor:
    """The three FFN launches after the union is in place; returns y [B, D]."""
    launch_in(p)
    launch_out(p)
    launch_finish(p)
    return p.y


# --------------------------------------------------------------------------- entry points
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
    """Union launch + the three FFN launches for x [B, D] (B <= 64) and mask [B, E] (bool); y [B, D].

    Inputs must already be validated (see ``lte.kernels.sparse_ffn``): contiguous, same device
    and dtype for x and the weights.
    """
    p = plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation, config)
    launch_union(p)
    return run_ffn(p)


def router_mask_triton(x: torch.Tensor, w_router: torch.Tensor, threshold: float,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """Fused router GEMV + threshold on the logits for x [B, D] (B <= 64); returns bool [B, E]."""
    num_tokens, model_width = x.shape  # B, D
    num_exp = w_router.shape[0]  # E
    if not 1 <= num_tokens <= MAX_TOKENS:
        raise ValueError(f"the router kernel takes 1 to {MAX_TOKENS} tokens, got {num_tokens}")
    cfg = config or default_config(num_tokens, model_width, num_exp * 32, x.device)
    out = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    union = torch.empty(num_exp, device=x.device, dtype=torch.int8)
    launch_router(x, w_router, threshold, out.view(torch.uint8), union, None, cfg, _pdl_supported(x.device))
    return out


def routed_sparse_ffn_triton(
    x: torch.Tensor,
    w_router: torch.Tensor,
    threshold: float,
    w_up: torch.Tensor,
    w_down_t: torch.Tensor,
    w_gate: torch.Tensor | None,
    b_up: torch.Tensor | None,
    b_down: torch.Tensor | None,
    expert_size: int,
    activation: str,
    config: KernelConfig | None = None,
    budget: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router (+ budget) then the FFN launches: mask = (x Wr^T > threshold) on the GPU.

    x [B, D] (B <= 64), w_router [E, D]; ``budget > 0`` keeps at most that many experts for the
    whole batch (those with the largest summed sigmoid score among the experts some token wants).
    Returns (y [B, D], mask [B, E] bool: the experts each token used). Validated inputs only (see
    ``lte.kernels.routed_sparse_ffn``).
    """
    num_tokens = x.shape[0]
    num_exp = w_router.shape[0]
    mask = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    p = plan_launch(x, mask, w_up, w_down_t, w_gate, b_up, b_down, expert_size, activation, config)
    _route(p, x, w_router, threshold, budget)
    return run_ffn(p), mask


def _route(p: FFNLaunch, x: torch.Tensor, w_router: torch.Tensor, threshold: float, budget: int) -> None:
    """Router (+ budget) launches into p.mask_u8 / p.union."""
    num_exp = w_router.shape[0]
    if 0 < budget < num_exp:
        score = torch.empty(num_exp, device=x.device, dtype=torch.float32)
        final_union = p.union
        p.union = torch.empty_like(final_union)  # the router's union; the budget kernel writes the final one
        launch_router(x, w_router, threshold, p.mask_u8, p.union, score, p.cfg, p.pdl)
        raw_union, p.union = p.union, final_union
        launch_budget(p, raw_union, score, budget)
    else:
        launch_router(x, w_router, threshold, p.mask_u8, p.union, None, p.cfg, p.pdl)


def routed_ffn_in_triton(
    x: torch.Tensor,
    w_router: torch.Tensor,
    threshold: float,
    w_up: torch.Tensor,
    b_up: torch.Tensor | None,
    expert_size: int,
    budget: int = 0,
    config: KernelConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first half of a plain FFN whose model applies the activation itself (OPT's decoder layer):
    router (+ budget), then ``z = x W1^T + b1`` for the union's experts (0 for a token's off experts).

    x [B, D] (B <= 64), w_router [E, D], w_up [F, D]. Returns (z [B, F] in x's dtype; rows of experts
    outside the union are not written), mask [B, E] bool, union [E] int8). Validated inputs only."""
    num_tokens = x.shape[0]
    num_exp = w_router.shape[0]
    mask = torch.empty(num_tokens, num_exp, device=x.device, dtype=torch.bool)  # [B, E]
    p = plan_launch(x, mask, w_up, w_up, None, b_up, None, expert_size, "identity", config,
                    h_dtype=x.dtype, need_out=False)
    _route(p, x, w_router, threshold, budget)
    launch_in(p)
    return p.h, mask, p.union


def sparse_ffn_out_triton(
    h: torch.Tensor,
    mask: torch.Tensor,
    union: torch.Tensor,
    w_down_t: torch.Tensor,
    b_down: torch.Tensor | None,
    expert_size: int,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """The second half: ``y = (h * m) Wd_t + b2`` over the union's experts, for h [B, F] (any rows
    outside the union are never read), mask [B, E] bool, union [E] int8, w_down_t [F, D]; y [B, D]."""
    num_tokens = h.shape[0]
    model_width = w_down_t.shape[1]
    shape_x = h.new_empty(num_tokens, model_width, dtype=w_down_t.dtype)  # gives the plan B, D and dtype
    p = plan_launch(shape_x, mask, w_down_t, w_down_t, None, None, b_down, expert_size, "identity", config, h=h)
    p.union = union
    launch_out(p, token_mask=True)
    launch_finish(p)
    return p.y
