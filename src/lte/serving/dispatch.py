"""Which decode path each served FFN takes: the sparse kernels, or the masked dense path.

At a batch of B tokens a `SparseMLP` reads the weights of every expert some token of the batch
needs (the union of the masks). When that union is nearly the whole FFN, the kernels cost more
than cuBLAS reading everything (the H200 suite measured 0.65-0.88x of dense at a full union), so
the masked dense path (`lte.kernels.masked_dense_ffn`: the same function) is the faster one.

The choice is made outside the decode step's CUDA graph, from the masks of one eager warm-up step
at the same batch size, and frozen into the captured graph: nothing is read back to the host while
decoding. `StaticDecoder(..., ffn_dispatch="auto")` does this before each capture. The union of
later steps varies around the warm-up's; a layer near its threshold may take the slower path for
some steps.

Dimensions: T tokens of one decode step (the batch size), E experts, F FFN width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LTEError
from .sparse_mlp import SparseMLP

__all__ = ["DENSE_ABOVE", "DENSE_ABOVE_BY_GPU", "PathChoice", "choose_ffn_paths", "dense_crossing", "dense_table",
           "dense_threshold", "set_ffn_path", "union_fraction"]

#: (tokens, fraction): at this many tokens and more, a union holding more than `fraction` of the
#: FFN's neurons takes the masked dense path. First estimate from the H200 quick suite
#: (docs/benchmarks.md: the FFN ratios at 0% and 50% off, taken as linear in the active fraction,
#: crossing dense at about 0.80-0.86 for B = 1-8, 0.51-0.57 at B = 32, 0.61-0.71 at B = 64),
#: rounded down: the masked dense path also pays for the router and the mask. GPUs without a row
#: of their own in `DENSE_ABOVE_BY_GPU` use it.
DENSE_ABOVE: tuple[tuple[int, float], ...] = ((1, 0.80), (8, 0.75), (32, 0.50), (64, 0.60))
#: Per GPU (`lte.kernels.tuning.gpu_key`), from where the sparse kernels' time crosses the stacked dense
#: path's in `benchmarks/ffn_kernel.py` (its "dispatch" line; fixed masks, Llama-3-8B's FFN):
#: h100: three runs of 2026-12-07 (benchmarks/results/h100/speed_0c4a7ef/ and speed_8c55f6b/, shipped/ too):
#: crossings at 0.943-0.959 (B = 1), 0.949-0.991 (B = 8), 0.753-0.781 (B = 32), the lowest rounded down by about
#: 0.04; a fourth run (2026-12-08, benchmarks/results/h100/speed_779cfb9/) crossed at 0.975 / 0.951 / 0.749 and, the
#: first time B = 64 was timed, at 0.807 there: rounded down the same way, 0.76.
DENSE_ABOVE_BY_GPU: dict[str, tuple[tuple[int, float], ...]] = {
    "h100": ((1, 0.90), (8, 0.90), (32, 0.72), (64, 0.76)),
}


def dense_table(device: torch.device | str) -> tuple[tuple[int, float], ...]:
    """The dispatch table of a device: its GPU's row of `DENSE_ABOVE_BY_GPU`, else `DENSE_ABOVE`."""
    device = torch.device(device)
    if device.type != "cuda":
        return DENSE_ABOVE
    from ..kernels.tuning import gpu_key

    return DENSE_ABOVE_BY_GPU.get(gpu_key(torch.cuda.get_device_name(device)), DENSE_ABOVE)


def dense_threshold(num_tokens: int, table: tuple[tuple[int, float], ...] = DENSE_ABOVE) -> float:
    """The union fraction above which `num_tokens` tokens take the masked dense path (the table's row
    with the most tokens not above `num_tokens`; its first row below that)."""
    if num_tokens < 1:
        raise LTEError(f"num_tokens must be >= 1, got {num_tokens}")
    rows = sorted(table)
    if not rows or any(not 0.0 <= frac <= 1.0 for _, frac in rows):
        raise LTEError(f"a dispatch table needs (tokens, fraction in [0, 1]) rows, got {table!r}")
    chosen = rows[0][1]
    for tokens, frac in rows:
        if tokens <= num_tokens:
            chosen = frac
    return chosen


def dense_crossing(points: list[tuple[float, float]], dense_us: float) -> float:
    """The union fraction at which the sparse kernels cost as much as the dense path: `points` are measured
    (active fraction, time) pairs of the kernels, taken as linear between neighbours; `dense_us` the dense
    path's time. 1.0 when the kernels stay cheaper everywhere; the smallest measured fraction when they
    are already dearer there."""
    pts = sorted(points)
    if not pts:
        raise LTEError("dense_crossing needs at least one measured (active fraction, time) point")
    if pts[0][1] >= dense_us:
        return pts[0][0]
    for (a0, t0), (a1, t1) in zip(pts, pts[1:]):
        if t1 >= dense_us:
            return a0 + (a1 - a0) * (dense_us - t0) / (t1 - t0)
    return 1.0


def union_fraction(mask: torch.Tensor, ffn_width: int, expert_size: int) -> float:
    """Fraction of the FFN's F neurons in the union of a step's masks [..., E] (the last expert may be smaller)."""
    union = mask.reshape(-1, mask.shape[-1]).any(dim=0)  # [E]
    num_exp = union.numel()
    sizes = torch.full((num_exp,), float(expert_size))
    sizes[-1] = ffn_width - expert_size * (num_exp - 1)
    return float((union.cpu().float() * sizes).sum()) / ffn_width


@dataclass
class PathChoice:
    """One FFN's decision: its module name, the union fraction it saw, the threshold and the path."""

    name: str
    union: float
    threshold: float
    path: str


def choose_ffn_paths(model: nn.Module, num_tokens: int,
                     table: tuple[tuple[int, float], ...] | None = None) -> list[PathChoice]:
    """Set `ffn_path` of every `SparseMLP` in `model` from the mask its last recorded forward kept
    (`record_mask = True` during one eager decode step of `num_tokens` tokens); returns the choices.
    `table`: the thresholds per token count; None: `dense_table` of the device the FFNs' weights are on.

    A module with a per-batch budget, or with fp8 weights, stays on the sparse path (the budget bounds
    its union; fp8 is read by the kernels only). A
    module with no recorded mask is an error: run one eager step with `record_mask` on first.
    """
    choices = []
    for name, module in model.named_modules():
        if not isinstance(module, SparseMLP):
            continue
        threshold = dense_threshold(num_tokens, dense_table(module.w_up.device) if table is None else table)
        if module.last_mask is None:
            raise LTEError(f"{name}: no recorded mask; run one eager decode step with record_mask = True first")
        frac = union_fraction(module.last_mask, module.w_up.shape[0], module.expert_size)
        path = "dense" if (module.budget == 0 and not module.fp8 and frac > threshold) else "sparse"
        module.ffn_path = path
        choices.append(PathChoice(name, frac, threshold, path))
    return choices


def set_ffn_path(model: nn.Module, path: str) -> int:
    """Put every `SparseMLP` of `model` on `path` ("sparse" or "dense"); returns how many there are."""
    modules = [m for m in model.modules() if isinstance(m, SparseMLP)]
    for module in modules:
        module.ffn_path = path
    return len(modules)
