"""A dense FFN in the same decode loop, so that LTE is timed against a fair baseline.

`DenseMLP` runs an FFN through cuBLAS; `prepare_dense(model)` puts one in place of every FFN of a
served family's model (plain HF or `LTEModel`, whose routers are then ignored), `dense_modules`
builds them without replacing anything, and `swap_modules` moves a model between its `SparseMLP`s
and `DenseMLP`s without copying weights (benchmarks).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F_
from torch import nn

from ..errors import LTEError
from .prepare import SPLIT_FAMILIES, _check_family, _is_lte_model, _replace
from .sparse_mlp import _activation, _check_activation, _frozen

__all__ = ["DenseMLP", "dense_modules", "prepare_dense", "swap_modules"]


class DenseMLP(nn.Module):
    """A dense FFN in the same decode loop (cuBLAS): y = (act(x Wg^T) * (x Wu^T + b1)) Wd^T + b2 when
    gated, act(x W1^T + b1) Wd^T + b2 when plain.

    Args: w_gate [F, D] or None; w_up [F, D]; w_down [D, F] (PyTorch's own layout; shared, not
    copied; transposed views of Conv1D weights are fine); activation; b_up [F], b_down [D] or None.
    """

    def __init__(self, w_gate: torch.Tensor | None, w_up: torch.Tensor, w_down: torch.Tensor, activation: str,
                 b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None) -> None:
        super().__init__()
        _check_activation(activation)
        ffn_width, model_width = w_up.shape
        if (w_gate is not None and tuple(w_gate.shape) != (ffn_width, model_width)) or \
                tuple(w_down.shape) != (model_width, ffn_width):
            raise LTEError(
                f"DenseMLP: expected w_gate/w_up [F, D] and w_down [D, F], got "
                f"{None if w_gate is None else list(w_gate.shape)}, {list(w_up.shape)}, {list(w_down.shape)}"
            )
        self.w_gate = None if w_gate is None else _frozen(w_gate)
        self.w_up = _frozen(w_up)
        self.w_down = _frozen(w_down)
        self.b_up = None if b_up is None else _frozen(b_up)
        self.b_down = None if b_down is None else _frozen(b_down)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F_.linear(x, self.w_up, self.b_up)  # [..., F]
        if self.w_gate is not None:
            h = _activation(F_.linear(x, self.w_gate), self.activation) * up
        else:
            h = _activation(up, self.activation)
        return F_.linear(h, self.w_down, self.b_down)  # [..., D]

    def extra_repr(self) -> str:
        f, d = self.w_up.shape
        return f"D={d}, F={f}, gated={self.w_gate is not None}, activation={self.activation}"


@torch.no_grad()
def dense_modules(model: Any) -> dict[str, nn.Module]:
    """A `DenseMLP` for every FFN of a served family's model, by dotted container name (nothing replaced yet).

    Accepts a plain HF model or an `LTEModel` (its routers are ignored: dense function; its adapters
    are merged first). The DenseMLPs share the model's weights (no copy), the down projection in its
    own [D, F] layout.
    """
    from ..conversion.permute import in_rows, out_cols

    def detach(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach()

    if _is_lte_model(model):
        model.merge_adapters()
        hf_model = model.base_model
        if _check_family(hf_model, allow_split=True) in SPLIT_FAMILIES:  # the original projections
            names = {id(m): n for n, m in hf_model.named_modules()}
            out: dict[str, nn.Module] = {}
            for layer in model.lte_layers():
                container = names[id(layer.container)]
                out[f"{container}.{layer.spec.input_name}"] = layer.input.base_layer
                out[f"{container}.{layer.spec.down}"] = layer.output.base_layer
            return out
        names = {id(m): n for n, m in hf_model.named_modules()}
        items = [(names[id(layer.container)], layer.gate_weight(), layer.up_weight(), layer.down_weight(),
                  layer.activation, layer.up_bias(), layer.down_bias()) for layer in model.lte_layers()]
    else:
        from ..conversion.locate import find_ffns

        hf_model = model
        if _check_family(hf_model, allow_split=True) in SPLIT_FAMILIES:
            return {}  # a plain model of a split family already runs its dense FFN through cuBLAS
        items = []
        for ffn in find_ffns(hf_model):
            first, down, spec = ffn.input, ffn.down, ffn.spec
            width = out_cols(down).shape[1]  # F
            rows = in_rows(first)  # [F, D], or [2F, D] for a fused gate_up
            if spec.gate_up:
                gate, up, up_bias = rows[:width], rows[width:], None
            elif spec.gate:
                gate, up, up_bias = rows, in_rows(ffn.up), None
            else:
                gate, up, up_bias = None, rows, getattr(first, "bias", None)
            items.append((ffn.name, gate, up, out_cols(down), ffn.activation, up_bias, getattr(down, "bias", None)))
    return {name: DenseMLP(detach(wg), wu.detach(), wd.detach(), act, detach(bu), detach(bd))
            for name, wg, wu, wd, act, bu, bd in items}


def swap_modules(hf_model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module of `modules` at its dotted name in `hf_model`; return the ones taken out.

    Lets a benchmark switch one model between its SparseMLPs and DenseMLPs without copying weights.
    """
    previous = {}
    for name, module in modules.items():
        previous[name] = hf_model.get_submodule(name)
        _replace(hf_model, name, module)
    return previous


def prepare_dense(model: Any) -> nn.Module:
    """Replace each FFN of a served family's model by a `DenseMLP`; return the HF model (changed in place).

    Accepts a plain HF model or an `LTEModel` (its routers are dropped: the result computes the
    dense function). Used to run a dense model through the same decode loop as `SparseMLP`.
    """
    modules = dense_modules(model)
    hf_model = model.base_model if _is_lte_model(model) else model
    swap_modules(hf_model, modules)
    return hf_model
