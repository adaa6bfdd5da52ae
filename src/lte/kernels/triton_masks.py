"""The Triton kernels (``@triton.jit``) that make an LTE FFN's expert masks on the GPU (launch 0 of
``triton_jit``'s list): the router's per-token masks and their union in one pass (``_router_kernel``),
the union of masks a caller brings (``_union_kernel``), a per-batch expert budget over the union
(``_budget_kernel``) and top-k routing's per-token masks from the router's fp32 logits
(``_router_kernel`` with LOGITS, then ``_topk_kernel``), and, with ``KernelConfig.active_list``, the union as
a list of expert ids (``_compact_kernel``). Same dimensions and PDL conventions as ``triton_jit``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_jit import gdc_launch_dependents, gdc_wait


@triton.jit
def _router_kernel(
    x_ptr, wr_ptr, mask_ptr, union_ptr, score_ptr, logits_ptr,
    B, D, E, threshold,
    stride_xb, stride_mb, stride_lb,
    B_PAD: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, ONE_STEP: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PREC: tl.constexpr, WITH_SCORE: tl.constexpr, PDL: tl.constexpr,
    TRIGGER: tl.constexpr, LOGITS: tl.constexpr,
):
    """mask[b, e] = x[b] . Wr[e] > threshold, union[e] = any_b mask[b, e] (and the summed sigmoid
    scores when WITH_SCORE) for one block of BLOCK_E experts; fp32 accumulation. With LOGITS it
    writes the fp32 logits [B, E] instead (top-k routing: ``_topk_kernel`` reads them), and with
    WITH_SCORE too the summed scores and a union of zeros (top-k under a budget) and nothing else.

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
    if LOGITS:
        tl.store(logits_ptr + toks[:, None] * stride_lb + experts[None, :], logits.to(tl.float32), mask=valid)
        if WITH_SCORE:  # top-k under a budget: the batch's summed scores, and a cleared union for the top-k kernel
            tl.store(score_ptr + experts, tl.sum(tl.where(valid, tl.sigmoid(logits), 0.0), axis=0), mask=e_ok)
            tl.store(union_ptr + experts, tl.zeros([BLOCK_E], dtype=tl.int8), mask=e_ok)
    else:
        hit = (logits > threshold) & valid
        tl.store(mask_ptr + toks[:, None] * stride_mb + experts[None, :], hit.to(tl.int8), mask=valid)
        tl.store(union_ptr + experts, tl.max(hit.to(tl.int32), axis=0).to(tl.int8), mask=e_ok)
        if WITH_SCORE:
            score = tl.where(valid, tl.sigmoid(logits), 0.0)
            tl.store(score_ptr + experts, tl.sum(score, axis=0), mask=e_ok)


@triton.jit
def _union_kernel(mask_ptr, union_ptr, B, E, stride_mb, B_PAD: tl.constexpr, BLOCK_E: tl.constexpr,
                  TRIGGER: tl.constexpr):
    """union[e] = any_b mask[b, e] for one block of BLOCK_E experts of a mask the caller brings (so it
    waits on nothing); TRIGGER lets the next (PDL-launched) kernel start early."""
    if TRIGGER:
        gdc_launch_dependents()
    experts = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = experts < E
    toks = tl.arange(0, B_PAD)
    valid = (toks < B)[:, None] & e_ok[None, :]
    m = tl.load(mask_ptr + toks[:, None] * stride_mb + experts[None, :], mask=valid, other=0).to(tl.int32)
    tl.store(union_ptr + experts, tl.max(m, axis=0).to(tl.int8), mask=e_ok)  # [B_PAD, BLOCK_E] -> [BLOCK_E]


@triton.jit
def _compact_kernel(union_ptr, list_ptr, E, E_PAD: tl.constexpr, PDL: tl.constexpr):
    """The union as a list (``KernelConfig.active_list``; one program): list[0] = n, the number of experts
    on, and list[1 .. n] their ids in increasing order, so that a program of the gate/up or down kernel
    finds its expert with one load instead of a prefix sum over all E flags. Entries past n are stale."""
    if PDL:
        gdc_wait()  # the union comes from the previous launch
        gdc_launch_dependents()  # the gate/up kernel waits for this one before it reads the list
    e_idx = tl.arange(0, E_PAD)
    on = tl.load(union_ptr + e_idx, mask=e_idx < E, other=0) != 0
    csum = tl.cumsum(on.to(tl.int32), axis=0)  # an expert's 1-based place in the list
    tl.store(list_ptr + csum, e_idx, mask=on)
    tl.store(list_ptr, tl.sum(on.to(tl.int32), axis=0))


@triton.jit
def _budget_cut(bits, budget):
    """A cut for the ``budget`` largest of ``bits`` (non-negative fp32 bit patterns, -1 for experts out
    of the running; more than ``budget`` in it), by bisection: returns (cut, count above the cut).
    Experts above the cut are kept; those at it fill up to ``budget`` in expert order.

    The search runs between the smallest and the largest key in the running (count(bits >= lo) >=
    budget holds from the start) and stops as soon as a probe counts exactly ``budget`` keys at or
    above it: then those are the budget (none tie at that probe's cut). Otherwise it ends at the
    budget-th largest key, ties and all. About log2(range / gap at the cut) steps instead of 31."""
    lo = tl.min(tl.where(bits >= 0, bits, 0x7F800000), axis=0)
    hi = tl.max(bits, axis=0)
    while lo < hi:  # invariant: count(bits >= lo) >= budget and the answer lies in [lo, hi]
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum((bits >= mid).to(tl.int32), axis=0)
        lo = tl.where(count >= budget, mid, lo)
        hi = tl.where(count == budget, mid, tl.where(count > budget, hi, mid - 1))
    return lo, tl.sum((bits > lo).to(tl.int32), axis=0)


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
    lo, above = _budget_cut(bits, budget)  # above: kept for sure; ties at lo fill up to budget
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
def _order_key(v):
    """int32 keys of fp32 values that order like the values over the whole line: negative values have their
    magnitude bits flipped, and -0.0 is made +0.0 first (the two are equal, so they tie)."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _topk_row(v, e_ok, k):
    """keep [E_PAD]: the k largest of one token's fp32 logits v (ties at the cut to the lower index).

    The cut is found by bisection on order-preserving integer keys of the fp32 bit patterns (negative
    values have their magnitude bits flipped, so the keys order like the values over the whole line;
    -0.0 is made +0.0 first, as the two are equal), between the row's smallest and largest key. It
    stops as soon as a probe counts exactly k keys at or above it (those are the k, no tie at the
    cut), else ends at the k-th largest key. Experts above the cut are kept; of those at the cut, the
    lowest-indexed ones fill up to k (rank by prefix sum)."""
    key = _order_key(v).to(tl.int64)  # [E_PAD], ordered like v
    lo = tl.min(tl.where(e_ok, key, 2147483647), axis=0)
    hi = tl.max(tl.where(e_ok, key, -2147483648), axis=0)
    while lo < hi:  # invariant: count(key >= lo) >= k and the k-th largest key lies in [lo, hi]
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum((e_ok & (key >= mid)).to(tl.int32), axis=0)
        lo = tl.where(count >= k, mid, lo)
        hi = tl.where(count == k, mid, tl.where(count > k, hi, mid - 1))
    above = e_ok & (key > lo)  # kept for sure (fewer than k)
    tie = e_ok & (key == lo)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1-based rank among the ties, in expert order
    return above | (tie & (tie_rank <= k - tl.sum(above.to(tl.int32), axis=0)))


@triton.jit
def _topk_kernel(logits_ptr, mask_ptr, union_ptr, E, k, stride_lb, stride_mb, E_PAD: tl.constexpr,
                 PDL: tl.constexpr, UNION: tl.constexpr):
    """mask[b, e] = 1 for the k experts of largest fp32 logit of token b (1 <= k <= E), one program
    per token; ties at the cut go to the lower expert index (``reference.topk_keep``'s rule). With
    UNION each program also sets its token's k experts in the batch's union [E] (cleared by the
    router; every writer stores the same 1, so no atomics are needed)."""
    if PDL:
        gdc_wait()  # the logits come from the router
        gdc_launch_dependents()
    row = tl.program_id(0)
    e_idx = tl.arange(0, E_PAD)
    e_ok = e_idx < E
    v = tl.load(logits_ptr + row * stride_lb + e_idx, mask=e_ok, other=0.0)
    keep = _topk_row(v, e_ok, k)
    tl.store(mask_ptr + row * stride_mb + e_idx, keep.to(tl.int8), mask=e_ok)
    if UNION:
        tl.store(union_ptr + e_idx, tl.full([E_PAD], 1, dtype=tl.int8), mask=e_ok & keep)


@triton.jit
def _topk_budget_kernel(logits_ptr, union_ptr, score_ptr, mask_ptr, E, k, budget, stride_lb, stride_mb,
                        E_PAD: tl.constexpr, PDL: tl.constexpr):
    """Top-k routing under a per-batch budget, one program per token, after the router wrote the
    batch's summed sigmoid scores and ``_topk_kernel`` (UNION) every token's own top k to mask [B, E]
    and their union: where the union holds at most ``budget`` experts the rows stand (each token's
    own top k is its top k among the union). Otherwise each program keeps the union's ``budget``
    experts of largest score (``_budget_cut``; ``reference.budget_keep``; the same cut in every
    program, from E values) and rewrites its token's row with its top k among them
    (``reference.topk_among``); a token keeps min(k, budget) experts."""
    if PDL:
        gdc_wait()  # the rows and the union come from the top-k kernel
        gdc_launch_dependents()
    row = tl.program_id(0)
    e_idx = tl.arange(0, E_PAD)
    e_ok = e_idx < E
    union = tl.load(union_ptr + e_idx, mask=e_ok, other=0) != 0
    if tl.sum(union.to(tl.int32), axis=0) > budget:  # the budget binds
        score = tl.load(score_ptr + e_idx, mask=e_ok, other=0.0)
        bits = tl.where(union, score.to(tl.int32, bitcast=True), -1)  # [E_PAD]; -1: not in the union
        cut, above = _budget_cut(bits, budget)
        tie = bits == cut
        kept = union & ((bits > cut) | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= budget - above)))
        v = tl.load(logits_ptr + row * stride_lb + e_idx, mask=e_ok, other=0.0)
        v = tl.where(kept, v, float("-inf"))  # only the budget's experts compete
        keep = _topk_row(v, e_ok, k) & kept
        tl.store(mask_ptr + row * stride_mb + e_idx, keep.to(tl.int8), mask=e_ok)
