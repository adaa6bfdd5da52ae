"""The `sketch` baseline's predictor: expert scores from a low-bit copy of the FFN's own weights.

A learned router (LTE's, MoEfication's, Deja Vu's) is fitted on some text and chooses worse on text
of another domain (docs/results.md, "Where LTE loses off its training text"). A sketch learns
nothing: it estimates each expert's output energy from the FFN's input projections rounded to a few
bits, so it is as good on any text as the rounding allows. For expert e and FFN input x:

    gated FFN:  score_e(x) = sum over e's neurons j of (act(g~_j . x) * (u~_j . x))^2 * |W_down[:, j]|^2
    plain FFN:  score_e(x) = sum over e's neurons j of  act(w~_j . x + b_j)^2      * |W_down[:, j]|^2

where g~, u~ (w~) are the rows of the gate and up (W1) projections rounded to `bits` bits,
symmetrically, in groups of `group` input channels (one scale per group, as int4 weight formats
store them). Dims: T tokens, D model width, F neurons, U units (experts).

The rounded copies are derived from the current weights, not stored: they are rebuilt whenever a
weight changes (fine-tuning), so the masks always follow the weights being served.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..conversion.permute import in_rows, out_cols
from ..errors import LTEError

__all__ = ["WeightSketch", "round_groups", "unit_sums"]


def round_groups(w: torch.Tensor, bits: int, group: int = 64) -> torch.Tensor:
    """What a `bits`-bit copy of w [N, D] holds (dequantized, float32).

    Symmetric rounding to the integers -(2^(b-1) - 1) .. 2^(b-1) - 1 times one scale per `group`
    consecutive input channels (the group's largest magnitude / the top integer); bits = 1 keeps the
    signs times the group's mean magnitude. A D that `group` does not divide uses one group per row.
    """
    if bits < 1 or bits > 8:
        raise LTEError(f"sketch bits must be between 1 and 8, got {bits}")
    rows, cols = w.shape
    size = group if group > 0 and cols % group == 0 else cols
    g = w.detach().float().reshape(rows, cols // size, size)
    if bits == 1:
        return (torch.sign(g) * g.abs().mean(-1, keepdim=True)).reshape(rows, cols)
    top = 2 ** (bits - 1) - 1
    scale = g.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
    return (torch.round(g / scale).clamp(-top, top) * scale).reshape(rows, cols)


def unit_sums(values: torch.Tensor, unit_sizes: torch.Tensor) -> torch.Tensor:
    """[.., F] -> [.., U]: the sum of each unit's consecutive entries (units of `unit_sizes` neurons)."""
    sizes = unit_sizes.to(values.device)
    if sizes.numel() == values.shape[-1]:
        return values
    if bool((sizes == sizes[0]).all()):
        return values.reshape(*values.shape[:-1], sizes.numel(), int(sizes[0])).sum(-1)
    ends = torch.cumsum(sizes, 0)
    upto = torch.cumsum(values, dim=-1).index_select(-1, ends - 1)
    return torch.diff(upto, dim=-1, prepend=torch.zeros_like(upto[..., :1]))


class WeightSketch(nn.Module):
    """Expert scores [.., U] for FFN inputs x [.., D], from `bits`-bit copies of the input projections.

    Args:
        first: the projection that sees x (gate, fused gate_up [2F, D], or W1).
        up: the separate up projection of a gated FFN (None when fused or plain).
        down: the output projection.
        activation: the FFN's activation, as a function.
        gated: whether the FFN is gated. unit_sizes: neurons per unit (the sparsifier's).
        bits, group: the rounding (see `round_groups`).

    The projections are held by reference (not as submodules): the sketch reads their current
    weights and rounds them again when a weight's version changes.
    """

    def __init__(self, first: nn.Module, up: nn.Module | None, down: nn.Module, activation: Callable,
                 gated: bool, unit_sizes: torch.Tensor, bits: int = 4, group: int = 64) -> None:
        super().__init__()
        object.__setattr__(self, "_projections", (first, up, down))
        self.activation, self.gated, self.bits, self.group = activation, gated, bits, group
        self.register_buffer("unit_sizes", unit_sizes.clone(), persistent=False)
        self._cache: tuple | None = None
        self._key: tuple | None = None

    def _weights(self) -> tuple[torch.Tensor, ...]:
        return tuple(p.weight for p in self._projections if p is not None)

    def _rounded(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """(gate or W1 rows [F, D], up rows [F, D] or None, W1 bias [F] or None, |W_down[:, j]|^2 [F])."""
        key = tuple((w.data_ptr(), w._version) for w in self._weights())
        if self._cache is not None and key == self._key:
            return self._cache
        first, up, down = self._projections
        rows = in_rows(first)
        width = out_cols(down).shape[1]
        if self.gated:
            gate = rows[:width]
            up_rows = rows[width:] if up is None else in_rows(up)
            g, u, bias = round_groups(gate, self.bits, self.group), round_groups(up_rows, self.bits, self.group), None
        else:
            g, u = round_groups(rows, self.bits, self.group), None
            b = getattr(first, "bias", None)
            bias = None if b is None else b.detach().float()
        down_sq = out_cols(down).detach().float().square().sum(0)
        dtype = rows.dtype  # the rounded values kept in the weights' dtype (bf16 on a GPU: half the memory)
        g, u = g.to(dtype), None if u is None else u.to(dtype)
        self._cache, self._key = (g, u, bias, down_sq), key
        return self._cache

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, bias, down_sq = self._rounded()
        xg = x.to(g.dtype)
        z = (xg @ g.t()).float()
        if bias is not None:
            z = z + bias
        h = self.activation(z)
        if u is not None:
            h = h * (xg @ u.t()).float()
        return unit_sums(h.square() * down_sq, self.unit_sizes)

    def flops(self) -> int:
        """Multiply-adds x 2 per token: the rounded gate and up (or W1) products."""
        hidden, width = out_cols(self._projections[2]).shape  # W_down [D, F]
        return 2 * hidden * width * (2 if self.gated else 1)

    def read_share(self) -> float:
        """The weight bytes it reads per token, as a share of the dense FFN's 16-bit weights."""
        mats = 2 if self.gated else 1
        return mats * self.bits / 16 / (3 if self.gated else 2)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group={self.group}, gated={self.gated}"
