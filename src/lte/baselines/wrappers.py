"""Modules that put a baseline's sparsity rule in place of an FFN's projections.

Like LTE's own wrappers (`lte.routing.layers`), they replace modules, never `forward`s:

- `SparseInput` wraps the projection that sees the FFN input x (gate, fused gate_up, or W1). It
  owns the layer's `Sparsifier` (thresholds, predictor) and, depending on the rule, masks x
  (TEAL), or picks the neurons from the gate output (CATS) or from a predictor (top-k).
- `SparseUp` wraps the separate up projection of a gated FFN (TEAL masks its input too).
- `SparseOutput` wraps the output projection: it masks the intermediate activation h [..., F]
  (TEAL threshold, the picked neurons, or the oracle's top-k experts) before calling it.

Rules (one per baseline family):
    "input-threshold"  TEAL: |x| > t_x on the inputs of gate/up (W1), |h| > t_h on the input of down
    "gate-threshold"   CATS: neuron j kept when |act(gate_j(x))| > t
    "predictor-topk"   Deja Vu (units = neurons) / MoEfication MLP router (units = experts)
    "oracle-topk"      MoEfication oracle: top-k experts by their true mass sum_j |h_j|

Each forward leaves on the `Sparsifier` what it skipped, as "parts": (kept mask [T, N] or None
for "all read", share of the FFN's weight reads). The FFN weight reads skipped by one token are
sum(share * fraction of the part's N columns not kept). See docs/study.md for the accounting.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LTEError
from ..routing.layers import WrappedLayer
from .sketch import unit_sums

RULES = ("input-threshold", "gate-threshold", "predictor-topk", "oracle-topk")
STATES = ("off", "on", "collect", "record")


def activation_fn(name: str):
    """The FFN activation by its normalised name (`lte.conversion.architectures` maps HF names to
    these; the functions are the kernels' own, `lte.kernels.reference.apply_activation`)."""
    from ..kernels.reference import ACTIVATIONS, apply_activation

    if name not in ACTIVATIONS:
        raise LTEError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}; the CATS rule needs a known one")
    return functools.partial(apply_activation, activation=name)


class Context:
    """What every layer of one model shares during a forward: the real-token mask."""

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None  # [T] bool, or None when every token is real

    def real(self, flat: torch.Tensor) -> torch.Tensor:
        """Rows of a [T, N] tensor that belong to real tokens."""
        m = self.token_mask
        if m is None or m.numel() != flat.shape[0]:
            return flat
        return flat[m.to(flat.device)]


class LowRankPredictor(nn.Module):
    """Deja Vu's predictor: x [.., D] -> r -> scores [.., N], two bias-free linear maps."""

    def __init__(self, hidden: int, rank: int, units: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, units, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))

    def flops(self) -> int:
        return 2 * (self.down.in_features * self.down.out_features + self.up.in_features * self.up.out_features)


class MLPRouter(nn.Module):
    """MoEfication's MLP router: x [.., D] -> ReLU(hidden) -> expert scores [.., E]."""

    def __init__(self, hidden: int, width: int, experts: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, width)
        self.fc2 = nn.Linear(width, experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.to(self.fc1.weight.dtype))))

    def flops(self) -> int:
        return 2 * (self.fc1.in_features * self.fc1.out_features + self.fc2.in_features * self.fc2.out_features)


class Sparsifier(nn.Module):
    """One FFN's baseline state: its rule, thresholds or predictor, and what the last forward skipped.

    Args:
        rule: one of RULES.
        gated: whether the FFN is gated (3 weight matrices) or plain (2).
        fused: whether gate and up are one fused [2F, D] projection.
        activation: normalised activation name (CATS needs it).
        hidden: D. width: F.
        unit_sizes: neurons per unit for the top-k rules (experts; all ones = neurons).
        context: the model's shared `Context`.
    """

    def __init__(self, rule: str, gated: bool, fused: bool, activation: str, hidden: int, width: int,
                 unit_sizes: list[int] | None, context: Context) -> None:
        super().__init__()
        if rule not in RULES:
            raise LTEError(f"unknown sparsity rule {rule!r}; choose one of {', '.join(RULES)}")
        self.rule, self.gated, self.fused, self.activation = rule, gated, fused, activation
        self.hidden, self.width = hidden, width
        self.register_buffer("x_threshold", torch.zeros(()))  # TEAL, on |x|
        self.register_buffer("h_threshold", torch.zeros(()))  # TEAL on |h|; CATS on |act(gate)|
        sizes = unit_sizes if unit_sizes is not None else [1] * width
        if sum(sizes) != width:
            raise LTEError(f"unit sizes sum to {sum(sizes)} but the FFN has {width} neurons")
        self.register_buffer("unit_sizes", torch.tensor(sizes, dtype=torch.long))
        self.predictor: nn.Module | None = None
        self.k: int | None = None
        self.state = "off"
        object.__setattr__(self, "context", context)  # shared, not a submodule
        self.reset_runtime()

    # ------------------------------------------------------------------ runtime state
    def reset_runtime(self) -> None:
        self.neuron_keep: torch.Tensor | None = None  # [.., F] float 0/1 for this forward
        self.parts: list[tuple[torch.Tensor | None, float]] = []
        self.native: list[torch.Tensor] = []  # [T] fractions of the rule's own activations dropped
        self.samples: dict[str, list[torch.Tensor]] = {}  # "collect": values for threshold calibration
        self.records: dict[str, list[torch.Tensor]] = {}  # "record": rows for predictor training

    @property
    def num_units(self) -> int:
        return self.unit_sizes.numel()

    @property
    def by_neuron(self) -> bool:
        return self.num_units == self.width

    @property
    def active(self) -> bool:
        return self.state == "on"

    def predictor_flops(self) -> int:
        return int(self.predictor.flops()) if self.predictor is not None and self.rule == "predictor-topk" else 0

    def ffn_flops(self) -> int:
        return 2 * self.hidden * self.width * (3 if self.gated else 2)

    def read_shares(self) -> tuple[float, float]:
        """(share of FFN weight reads in the input projections, share in the output projection)."""
        return (2 / 3, 1 / 3) if self.gated else (1 / 2, 1 / 2)

    # ------------------------------------------------------------------ helpers used by the wrappers
    def add_part(self, keep: torch.Tensor | None, share: float) -> None:
        flat = None if keep is None else keep.reshape(-1, keep.shape[-1]).bool()
        self.parts.append((flat, share))

    def add_native(self, keep: torch.Tensor) -> None:
        self.native.append(1.0 - keep.reshape(-1, keep.shape[-1]).float().mean(-1))

    def collect(self, key: str, values: torch.Tensor, limit: int = 1 << 16) -> None:
        """Keep a random sample of the magnitudes of real tokens, for quantile calibration."""
        flat = self.context.real(values.detach().reshape(-1, values.shape[-1])).abs().float().reshape(-1)
        if flat.numel() > limit:
            flat = flat[torch.randint(flat.numel(), (limit,), device=flat.device)]
        self.samples.setdefault(key, []).append(flat)

    def record(self, key: str, rows: torch.Tensor) -> None:
        """Keep rows [T, N] of real tokens (predictor training data)."""
        flat = self.context.real(rows.detach().reshape(-1, rows.shape[-1]))
        self.records.setdefault(key, []).append(flat)

    def unit_mass(self, h: torch.Tensor) -> torch.Tensor:
        """Sum of |h| over each unit's neurons: [.., F] -> [.., U]."""
        return unit_sums(h.detach().abs().float(), self.unit_sizes)

    def keep_topk(self, scores: torch.Tensor) -> torch.Tensor:
        """Neuron mask [.., F] (float 0/1) of the top-k units by score [.., U]."""
        if self.k is None:
            raise LTEError("top-k baseline without k: call set_sparsity(target) first")
        k = min(max(self.k, 0), self.num_units)
        unit_keep = torch.zeros_like(scores, dtype=torch.float32)
        if k > 0:
            unit_keep.scatter_(-1, scores.topk(k, dim=-1).indices, 1.0)
        if self.by_neuron:
            neuron_keep = unit_keep
        else:
            neuron_keep = torch.repeat_interleave(unit_keep, self.unit_sizes.to(scores.device), dim=-1,
                                                  output_size=self.width)  # [.., U] -> [.., F]
        self.add_part(neuron_keep, 1.0)
        self.add_native(neuron_keep)
        return neuron_keep

    def extra_repr(self) -> str:
        return f"rule={self.rule}, units={self.num_units}, k={self.k}, state={self.state}"


def _threshold_input(s: Sparsifier, x: torch.Tensor, share: float) -> torch.Tensor:
    """TEAL on an input projection: zero the entries of x with |x| <= t_x."""
    if s.state == "collect":
        s.collect("x", x)
        return x
    if not s.active:
        return x
    keep = x.abs() > s.x_threshold.to(x.dtype)
    s.add_part(keep, share)
    s.add_native(keep)
    return x * keep.to(x.dtype)


class SparseInput(WrappedLayer):
    """An FFN's input projection (gate, fused gate_up, or W1) under a baseline rule."""

    def __init__(self, base_layer: nn.Module, sparsifier: Sparsifier) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.sparsifier = sparsifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.sparsifier
        s.neuron_keep = None
        if s.state == "record":
            s.record("x", x)
        if s.rule == "input-threshold":
            share = s.read_shares()[0] / (2 if s.gated and not s.fused else 1)  # gate and up split it
            x_in = _threshold_input(s, x, share)
            return self.base_layer(x_in)
        y = self.base_layer(x)
        if s.rule == "gate-threshold" and s.state in ("on", "collect"):
            pre = y[..., : s.width] if s.fused else y  # gate half of a fused projection
            a = activation_fn(s.activation)(pre.float()).abs()  # [.., F]
            if s.state == "collect":
                s.collect("gate", a)
            else:
                keep = a > s.h_threshold
                s.add_part(None, 1 / 3 if s.gated else 1 / 2)  # the gate (or W1) is always read
                s.add_part(keep, 2 / 3 if s.gated else 1 / 2)
                s.add_native(keep)
                s.neuron_keep = keep.float()
        elif s.rule == "predictor-topk" and s.active:
            s.neuron_keep = s.keep_topk(s.predictor(x).float())
            extra = getattr(s.predictor, "read_share", None)  # a sketch reads its own low-bit weights
            if extra is not None:  # counted as reads not skipped: a part that every token "skips" negatively
                s.add_part(torch.zeros(*x.shape[:-1], 1, dtype=torch.bool, device=x.device), -extra())
        return y


class SparseUp(WrappedLayer):
    """The separate up projection of a gated FFN: TEAL masks its input like the gate's."""

    def __init__(self, base_layer: nn.Module, sparsifier: Sparsifier) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_sparsifier", sparsifier)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._sparsifier
        if s.rule == "input-threshold" and s.state != "collect":  # the gate's wrapper already sampled x
            x = _threshold_input(s, x, s.read_shares()[0] / 2)
        return self.base_layer(x)


class SparseOutput(WrappedLayer):
    """An FFN's output projection: masks h [.., F] by the layer's rule, then calls the projection."""

    def __init__(self, base_layer: nn.Module, sparsifier: Sparsifier) -> None:
        super().__init__()
        self.base_layer = base_layer
        object.__setattr__(self, "_sparsifier", sparsifier)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        s = self._sparsifier
        if s.state == "record":
            s.record("h", h.abs().to(torch.float16) if s.by_neuron else s.unit_mass(h))
        if s.rule == "input-threshold":
            if s.state == "collect":
                s.collect("h", h)
            elif s.active:
                keep = h.abs() > s.h_threshold.to(h.dtype)
                s.add_part(keep, s.read_shares()[1])
                s.add_native(keep)
                return self.base_layer(h * keep.to(h.dtype))
            return self.base_layer(h)
        if s.rule == "oracle-topk" and s.active:
            s.neuron_keep = s.keep_topk(s.unit_mass(h))
        if s.active and s.neuron_keep is not None:
            if s.neuron_keep.shape[:-1] != h.shape[:-1]:
                raise LTEError(
                    f"the FFN's output projection got {tuple(h.shape)} but its input projection saw "
                    f"{tuple(s.neuron_keep.shape[:-1])} tokens; each must be called once per forward"
                )
            h = h * s.neuron_keep.to(h.dtype)
        return self.base_layer(h)


def quantile(samples: list[torch.Tensor], q: float) -> float:
    """The q-quantile of the concatenated samples (exact, by k-th value)."""
    values = torch.cat([v.float().reshape(-1) for v in samples])
    if values.numel() == 0:
        raise LTEError("no calibration values collected: the calibration data gave no real tokens")
    q = min(max(q, 0.0), 1.0)
    if q <= 0.0:
        return -1.0  # keep everything (magnitudes are >= 0)
    k = max(1, min(values.numel(), math.ceil(q * values.numel())))
    return float(values.kthvalue(k).values)

