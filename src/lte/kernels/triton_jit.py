"""The Triton kernels (``@triton.jit``) of one LTE FFN at decode time (B = 1..64 tokens).

The launch side (tile choice, scratch buffers, grids, the entry points) is ``triton_ffn``; the
kernels of launch 0 (router, union, budget) are in ``triton_masks``.
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
   scratch. At a full union the items are every row in order: a dense GEMV/GEMM schedule. With
   ``KernelConfig.active_list`` a one-program launch before it (``triton_masks._compact_kernel``) writes the
   union as a list of expert ids, and each program (of this kernel and the next) loads its experts' ids
   instead of taking the prefix sum.
2. ``_ffn_out_kernel``: the down projection as a split-K reduction over the active list. Program
   (d, s) owns ``BLOCK_D`` output columns and the s-th equal share of the active experts, and
   stores its fp32 partial sum to ``part[s, b, d]`` (plain stores, no atomics, no zeroing).
3. ``_ffn_finish_kernel``: ``y[b, d] = sum_s part[s, b, d] (+ b2)``, cast to the output dtype.

On Hopper, launches 1-3 (and the budget kernel) use programmatic dependent launch (PDL): they
start while the previous kernel drains and wait (``gdc_wait``) before reading its output. Launch 1
triggers its dependents only after its own wait, so the down kernel may read the union (written
before launch 1 started) before it waits for ``h``. Every wait comes before any loop whose loads
Triton may pipeline (issue ahead of the loop body).
B = 1 accumulates with broadcast multiply-adds; B >= 2 pads the tokens to 16+ and uses ``tl.dot``.

The masked dense path's elementwise kernel (every neuron through cuBLAS, for a union too full for skipping
to pay) is in ``triton_masked_act``.
This module imports triton at import time: import it lazily (through ``triton_ffn``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .reference import ACTIVATIONS

try:  # grid dependency control (programmatic dependent launch, Hopper+), Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None

#: whether this triton has the grid dependency control ops the PDL path of the kernels calls
HAS_GDC = gdc_wait is not None


#: activation codes of ``_activation``: the public ones (silu 0, gelu 1, gelu_tanh 2, relu 3) and "identity" (4)
#: for FFNs whose activation the model applies itself between our two halves.
ACT_CODE = {name: code for code, name in enumerate((*ACTIVATIONS, "identity"))}


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
def _active_experts(union_ptr, list_ptr, E, E_PAD: tl.constexpr, LIST: tl.constexpr):
    """(prefix sum of the union flags [E_PAD], number of active experts). LIST: the count comes from the
    union's list (``triton_masks._compact_kernel``: list[0] = n, list[1 + j] = the j-th active expert) and
    no prefix sum is taken (zeros stand in for it)."""
    if LIST:
        csum = tl.zeros([E_PAD], dtype=tl.int32)
        n_active = tl.load(list_ptr)
    else:
        csum, n_active = _active_list(union_ptr, E, E_PAD)
    return csum, n_active


@triton.jit
def _active_ids(csum, list_ptr, first, n_active, SLOTS: tl.constexpr, LIST: tl.constexpr):
    """Expert ids [SLOTS] of the active experts first, first + 1, ... (past the last: E_PAD from the prefix
    sum, 0 from the list; callers mask those slots)."""
    if LIST:
        want = first + tl.arange(0, SLOTS)
        ids = tl.load(list_ptr + 1 + want, mask=want < n_active, other=0)
    else:
        ids = _nth_active(csum, first, SLOTS)
    return ids


@triton.jit
def _ffn_in_rows(
    x_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, rows, row_ok, toks, tok_ok, D, stride_xb,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    B_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, SCALED: tl.constexpr, W_EVICT: tl.constexpr,
):
    """act(x @ W_gate[rows].T) * (x @ W_up[rows].T + b) for BLOCK_F rows, all B tokens: [B_PAD, BLOCK_F],
    fp32, before any token's mask.

    W_EVICT: the weight loads' L2 eviction policy ("" as usual, "evict_first": each weight is read once, so it
    may leave L2 first and x, h and the partial sums stay; ``KernelConfig.stream_weights``).

    SCALED: fp8 weights with one fp32 scale per row (``lte.kernels.quant``): a row's dot product is
    multiplied by its scale (before the bias); for ``tl.dot`` the fp8 tile is widened to x's dtype."""
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
        wu = tl.load(wu_ptr + w_off, mask=w_ok, other=0.0, eviction_policy=W_EVICT)
        if SCALED:
            wu = wu.to(xt.dtype)  # e4m3 values are exact in fp16, bf16 and fp32
        if USE_DOT:
            acc_u = tl.dot(xt, tl.trans(wu), acc_u, input_precision=DOT_PREC)
        else:
            acc_u3 += xt.to(tl.float32)[:, None, :] * wu.to(tl.float32)[None, :, :]
        if GATED:
            wg = tl.load(wg_ptr + w_off, mask=w_ok, other=0.0, eviction_policy=W_EVICT)
            if SCALED:
                wg = wg.to(xt.dtype)
            if USE_DOT:
                acc_g = tl.dot(xt, tl.trans(wg), acc_g, input_precision=DOT_PREC)
            else:
                acc_g3 += xt.to(tl.float32)[:, None, :] * wg.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc_u = tl.sum(acc_u3, axis=2)  # [B_PAD, BLOCK_F]
        acc_g = tl.sum(acc_g3, axis=2)
    if SCALED:
        acc_u = acc_u * tl.load(su_ptr + rows, mask=row_ok, other=0.0)[None, :]
        if GATED:
            acc_g = acc_g * tl.load(sg_ptr + rows, mask=row_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc_u += tl.load(bu_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        h = _activation(acc_g, ACT) * acc_u
    else:
        h = _activation(acc_u, ACT)
    return h


@triton.jit
def _ffn_in_item(
    x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, h_ptr, expert, block,
    B, D, F, S, stride_xb, stride_mb, stride_hb,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    B_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, SCALED: tl.constexpr, W_EVICT: tl.constexpr,
):
    """One work item: h[b, rows] for row block ``block`` of ``expert``, all B tokens."""
    toks = tl.arange(0, B_PAD)  # [B_PAD]
    tok_ok = toks < B
    local = block * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F] rows within the expert
    rows = expert * S + local
    row_ok = (local < S) & (rows < F)
    m = tl.load(mask_ptr + toks * stride_mb + expert, mask=tok_ok, other=0)  # [B_PAD]
    h = _ffn_in_rows(x_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, rows, row_ok, toks, tok_ok, D, stride_xb,
                     GATED, HAS_BIAS, ACT, B_PAD, BLOCK_F, BLOCK_K, USE_DOT, DOT_PREC, SCALED, W_EVICT)
    h = tl.where(m[:, None] != 0, h, 0.0)  # a token only uses its own experts
    tl.store(h_ptr + toks[:, None] * stride_hb + rows[None, :], h.to(h_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _ffn_in_group_item(
    x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, h_ptr, experts, g_ok,
    B, D, F, S, stride_xb, stride_mb, stride_hb,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    B_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, SCALED: tl.constexpr, G: tl.constexpr, W_EVICT: tl.constexpr,
):
    """One work item of G small experts ``experts`` [G] (those with ``g_ok``): all rows of each,
    BLOCK_F / G per expert, all B tokens (experts smaller than BLOCK_F, e.g. 8 neurons under
    ``tl.dot``'s 16 rows). 32-neuron experts never come here: the index grid below compiles to
    slower loads than ``_ffn_in_item``'s (measured on an H200, docs/benchmarks.md)."""
    R: tl.constexpr = BLOCK_F // G  # rows of each expert
    toks = tl.arange(0, B_PAD)  # [B_PAD]
    tok_ok = toks < B
    local = tl.arange(0, R)  # [R] rows within an expert
    rows2 = experts[:, None] * S + local[None, :]  # [G, R]
    ok2 = g_ok[:, None] & (local[None, :] < S) & (rows2 < F)
    rows = tl.reshape(rows2, (BLOCK_F,))
    row_ok = tl.reshape(ok2, (BLOCK_F,))
    m = tl.load(mask_ptr + toks[:, None] * stride_mb + experts[None, :],
                mask=tok_ok[:, None] & g_ok[None, :], other=0)  # [B_PAD, G]
    m = tl.reshape(tl.broadcast_to(m[:, :, None], (B_PAD, G, R)), (B_PAD, BLOCK_F))
    h = _ffn_in_rows(x_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, rows, row_ok, toks, tok_ok, D, stride_xb,
                     GATED, HAS_BIAS, ACT, B_PAD, BLOCK_F, BLOCK_K, USE_DOT, DOT_PREC, SCALED, W_EVICT)
    h = tl.where(m != 0, h, 0.0)  # a token only uses its own experts
    tl.store(h_ptr + toks[:, None] * stride_hb + rows[None, :], h.to(h_ptr.dtype.element_ty),
             mask=tok_ok[:, None] & row_ok[None, :])


@triton.jit
def _ffn_in_kernel(
    x_ptr, mask_ptr, union_ptr, list_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, h_ptr,
    B, D, F, S, E, RB,
    stride_xb, stride_mb, stride_hb,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    B_PAD: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr, E_PAD: tl.constexpr,
    SLOTS: tl.constexpr, PERSISTENT: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr, SCALED: tl.constexpr, G: tl.constexpr, W_EVICT: tl.constexpr, LIST: tl.constexpr,
):
    """h for the (active expert, row block) items: an item is BLOCK_F rows of one expert
    (RB = ceil(S / BLOCK_F) items per expert), or with G > 1 (then RB = 1) the rows of G consecutive
    active experts; a token whose mask is off for an expert gets h = 0 there.

    PERSISTENT: each program takes a contiguous equal share of the items (SLOTS bounds the experts
    a share can span); otherwise program i does item i, if there is one. LIST: the active experts come
    from the union's list (one load a program) instead of each program's prefix sum over the E flags."""
    if PDL:
        gdc_wait()  # the union and the masks come from the previous launch
        gdc_launch_dependents()  # only now: the down kernel reads the union before it waits
    pid = tl.program_id(0)
    csum, n_active = _active_experts(union_ptr, list_ptr, E, E_PAD, LIST)
    if G == 1:
        n_items = n_active * RB
        if PERSISTENT:
            share = tl.cdiv(n_items, tl.num_programs(0))
            i0 = pid * share
            i1 = tl.minimum(i0 + share, n_items)
            j_first = i0 // RB
            ids = _active_ids(csum, list_ptr, j_first, n_active, SLOTS, LIST)  # the experts this share can touch
            for item in range(i0, i1):
                j = item // RB
                _ffn_in_item(x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, h_ptr,
                             _pick(ids, j - j_first, SLOTS), item - j * RB, B, D, F, S, stride_xb, stride_mb,
                             stride_hb, GATED, HAS_BIAS, ACT, B_PAD, BLOCK_F, BLOCK_K, USE_DOT, DOT_PREC, SCALED, W_EVICT)
        else:
            if LIST:  # issued beside the count's load; a program past the items does not use it
                listed = tl.load(list_ptr + 1 + tl.minimum(pid // RB, E - 1))
            if pid < n_items:
                j = pid // RB
                if LIST:
                    expert = listed
                else:
                    expert = tl.sum((csum <= j).to(tl.int32), axis=0)  # the j-th active expert
                _ffn_in_item(x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, h_ptr, expert, pid - j * RB,
                             B, D, F, S, stride_xb, stride_mb, stride_hb,
                             GATED, HAS_BIAS, ACT, B_PAD, BLOCK_F, BLOCK_K, USE_DOT, DOT_PREC, SCALED, W_EVICT)
    else:
        offs_g = tl.arange(0, G)
        n_items = tl.cdiv(n_active, G)  # RB is 1
        if PERSISTENT:
            share = tl.cdiv(n_items, tl.num_programs(0))
            i0 = pid * share
            i1 = tl.minimum(i0 + share, n_items)
            j_first = i0 * G
            ids = _active_ids(csum, list_ptr, j_first, n_active, SLOTS, LIST)  # the experts this share can touch
            slots = tl.arange(0, SLOTS)
            for item in range(i0, i1):
                j = item * G + offs_g  # [G] the item's active-expert indices
                experts = tl.sum(tl.where(slots[None, :] == (j - j_first)[:, None], ids[None, :], 0), axis=1)
                _ffn_in_group_item(x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, h_ptr,
                                   experts, j < n_active, B, D, F, S, stride_xb, stride_mb, stride_hb,
                                   GATED, HAS_BIAS, ACT, B_PAD, BLOCK_F, BLOCK_K, USE_DOT, DOT_PREC, SCALED, G, W_EVICT)
        else:
            if pid < n_items:
                j = pid * G + offs_g  # [G]
                if LIST:
                    experts = tl.load(list_ptr + 1 + j, mask=j < n_active, other=0)
                else:
                    experts = tl.sum((csum[None, :] <= j[:, None]).to(tl.int32), axis=1)  # the j-th active experts
                _ffn_in_group_item(x_ptr, mask_ptr, wg_ptr, wu_ptr, bu_ptr, sg_ptr, su_ptr, h_ptr,
                                   experts, j < n_active, B, D, F, S, stride_xb, stride_mb, stride_hb,
                                   GATED, HAS_BIAS, ACT, B_PAD, BLOCK_F, BLOCK_K, USE_DOT, DOT_PREC, SCALED, G, W_EVICT)


@triton.jit
def _ffn_out_tiles(h_ptr, wd_ptr, sd_ptr, rows, row_ok, h_mask, toks, cols, col_ok, D, stride_hb,
                   SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr, W_EVICT: tl.constexpr):
    """The down projection's operands for one step: h [B_PAD, rows] (masked by h_mask) and
    W_down^T[rows] [rows, BLOCK_D]; fp8 rows are scaled into h and widened for ``tl.dot``."""
    w = _ffn_out_w(wd_ptr, rows, row_ok, cols, col_ok, D, W_EVICT)
    h = tl.load(h_ptr + toks[:, None] * stride_hb + rows[None, :], mask=h_mask, other=0.0)  # [B_PAD, rows]
    return _ffn_out_scaled(h, w, sd_ptr, rows, row_ok, SCALED, DOT_DTYPE)


@triton.jit
def _ffn_out_w(wd_ptr, rows, row_ok, cols, col_ok, D, W_EVICT: tl.constexpr):
    """W_down^T[rows] [rows, BLOCK_D], as stored (W_EVICT: the load's L2 eviction policy, as in ``_ffn_in_rows``)."""
    return tl.load(wd_ptr + rows.to(tl.int64)[:, None] * D + cols[None, :],
                   mask=row_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy=W_EVICT)


@triton.jit
def _ffn_out_scaled(h, w, sd_ptr, rows, row_ok, SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """fp8 rows: their scales into h, and w widened for ``tl.dot``; otherwise h and w as they are."""
    if SCALED:
        h = h.to(tl.float32) * tl.load(sd_ptr + rows, mask=row_ok, other=0.0)[None, :]
        if DOT_DTYPE == 0:
            w = w.to(tl.bfloat16)
        elif DOT_DTYPE == 1:
            w = w.to(tl.float16)
        else:
            w = w.to(tl.float32)
    return h, w


@triton.jit
def _ffn_out_kernel(
    h_ptr, union_ptr, list_ptr, mask_ptr, wd_ptr, sd_ptr, part_ptr,
    B, D, F, S, E,
    stride_hb, stride_mb,
    B_PAD: tl.constexpr, S_PAD: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr, TOKEN_MASK: tl.constexpr, USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
    PDL: tl.constexpr, SCALED: tl.constexpr, DOT_DTYPE: tl.constexpr, G: tl.constexpr, PREFETCH: tl.constexpr,
    W_EVICT: tl.constexpr, LIST: tl.constexpr,
):
    """Partial down projection part[s, b, cols] over the s-th equal share of the active experts.

    Each step takes one expert (G = 1: S_PAD rows, the expert size padded), or G small experts
    (S_PAD rows, S_PAD // G per expert; e.g. four 8-neuron experts for 32 rows a step).

    With PDL the kernel starts while the gate/up kernel runs: it reads the union (complete before
    that kernel triggered this launch) and finds its share, then waits (gdc_wait) before its loop.
    The wait must come before the loop, not inside it: Triton's software pipelining issues the
    loads of the first iterations (h included) ahead of the loop body, so a wait inside the loop
    lets h be read before the gate/up kernel wrote it (a race that shows only when launches follow
    each other closely, as in a CUDA graph). The share's expert ids are found CHUNK at a time (a
    [CHUNK, E_PAD] comparison).
    TOKEN_MASK applies each token's mask to h (when h comes from elsewhere than the gate/up
    kernel, which zeroes it). SCALED: fp8 rows with one fp32 scale each, applied to h (the down
    projection's rows are neurons); ``tl.dot`` then runs in DOT_DTYPE (0 bf16, 1 fp16, 2 fp32: x's).
    PREFETCH (G = 1 only): the share's first expert's rows of W_down^T are read before the wait (they do
    not depend on h), so a program started early by PDL spends the gate/up kernel's tail loading weights;
    that expert is then taken out of the loop. LIST: the ids come from the union's list (as in the gate/up
    kernel)."""
    if PDL:
        gdc_launch_dependents()
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    nsplit = tl.num_programs(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # [BLOCK_D]
    col_ok = cols < D
    toks = tl.arange(0, B_PAD)
    tok_ok = toks < B
    csum, n_active = _active_experts(union_ptr, list_ptr, E, E_PAD, LIST)
    j0 = (n_active * pid_s) // nsplit
    j1 = (n_active * (pid_s + 1)) // nsplit
    if USE_DOT:
        acc = tl.zeros([B_PAD, BLOCK_D], dtype=tl.float32)
    else:
        acc3 = tl.zeros([B_PAD, S_PAD, BLOCK_D], dtype=tl.float32)
    offs_s = tl.arange(0, S_PAD)
    if PREFETCH:
        tl.static_assert(G == 1, "PREFETCH takes one expert a step")
        expert0 = _pick(_active_ids(csum, list_ptr, j0, n_active, CHUNK, LIST), 0, CHUNK)  # the share's first expert
        rows0 = expert0 * S + offs_s
        row_ok0 = (offs_s < S) & (rows0 < F) & (offs_s + j0 < j1 + offs_s)  # an empty share reads nothing
        w0 = _ffn_out_w(wd_ptr, rows0, row_ok0, cols, col_ok, D, W_EVICT)
    if PDL:
        gdc_wait()  # h comes from the gate/up kernel; also: never complete before it
    if G == 1:
        if PREFETCH:
            h_ok0 = tok_ok
            if TOKEN_MASK:
                h_ok0 = h_ok0 & (tl.load(mask_ptr + toks * stride_mb + expert0, mask=tok_ok & (toks + j0 < j1 + toks),
                                         other=0) != 0)
            h0 = tl.load(h_ptr + toks[:, None] * stride_hb + rows0[None, :],
                         mask=h_ok0[:, None] & row_ok0[None, :], other=0.0)
            h0, w0 = _ffn_out_scaled(h0, w0, sd_ptr, rows0, row_ok0, SCALED, DOT_DTYPE)
            if USE_DOT:
                acc = tl.dot(h0.to(w0.dtype), w0, acc, input_precision=DOT_PREC)
            else:
                acc3 += h0.to(tl.float32)[:, :, None] * w0.to(tl.float32)[None, :, :]
        for c0 in range(j0 + PREFETCH, j1, CHUNK):
            ids = _active_ids(csum, list_ptr, c0, n_active, CHUNK, LIST)  # the next CHUNK active experts
            for j in range(c0, tl.minimum(c0 + CHUNK, j1)):
                expert = _pick(ids, j - c0, CHUNK)
                rows = expert * S + offs_s  # [S_PAD] the expert's neuron rows
                row_ok = (offs_s < S) & (rows < F)
                h_ok = tok_ok
                if TOKEN_MASK:
                    h_ok = h_ok & (tl.load(mask_ptr + toks * stride_mb + expert, mask=tok_ok, other=0) != 0)
                h, w = _ffn_out_tiles(h_ptr, wd_ptr, sd_ptr, rows, row_ok, h_ok[:, None] & row_ok[None, :],
                                      toks, cols, col_ok, D, stride_hb, SCALED, DOT_DTYPE, W_EVICT)
                if USE_DOT:
                    acc = tl.dot(h.to(w.dtype), w, acc, input_precision=DOT_PREC)
                else:
                    acc3 += h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    else:
        R: tl.constexpr = S_PAD // G  # rows per expert in a step
        offs_g = tl.arange(0, G)
        offs_r = tl.arange(0, R)
        slots = tl.arange(0, CHUNK)
        for c0 in range(j0, j1, CHUNK):
            ids = _active_ids(csum, list_ptr, c0, n_active, CHUNK, LIST)  # the next CHUNK active experts (CHUNK: a multiple of G)
            c1 = tl.minimum(c0 + CHUNK, j1)
            for j in range(c0, c1, G):
                g_ok = (j + offs_g) < c1  # [G] the step's experts that are in this share
                experts = tl.sum(tl.where(slots[None, :] == (j - c0 + offs_g)[:, None], ids[None, :], 0), axis=1)
                rows2 = experts[:, None] * S + offs_r[None, :]  # [G, R] their neuron rows
                ok2 = g_ok[:, None] & (offs_r[None, :] < S) & (rows2 < F)
                rows = tl.reshape(rows2, (S_PAD,))
                row_ok = tl.reshape(ok2, (S_PAD,))
                h_ok = tok_ok[:, None] & row_ok[None, :]  # [B_PAD, S_PAD]
                if TOKEN_MASK:
                    on = tl.load(mask_ptr + toks[:, None] * stride_mb + experts[None, :],
                                 mask=tok_ok[:, None] & g_ok[None, :], other=0) != 0  # [B_PAD, G]
                    on = tl.reshape(tl.broadcast_to(on[:, :, None], (B_PAD, G, R)), (B_PAD, S_PAD))
                    h_ok = h_ok & on
                h, w = _ffn_out_tiles(h_ptr, wd_ptr, sd_ptr, rows, row_ok, h_ok,
                                      toks, cols, col_ok, D, stride_hb, SCALED, DOT_DTYPE, W_EVICT)
                if USE_DOT:
                    acc = tl.dot(h.to(w.dtype), w, acc, input_precision=DOT_PREC)
                else:
                    acc3 += h.to(tl.float32)[:, :, None] * w.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=1)  # [B_PAD, BLOCK_D]
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
