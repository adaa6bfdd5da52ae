"""Reading FFN weights and applying a neuron permutation to them.

A permutation `perm` [F] reorders the FFN's intermediate neurons: new neuron j is old neuron
perm[j]. It changes rows of the input projections (and their biases) and columns of the output
projection together, so the FFN computes exactly the same function.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import LTEError


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D: weight [in, out] (without importing transformers here)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def check_projection(module: nn.Module, name: str) -> None:
    """Refuse an FFN projection lte cannot read or permute (a quantised or otherwise replaced layer)."""
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise LTEError(
            f"FFN projection {name!r} is a {type(module).__name__}; lte handles nn.Linear and Conv1D. "
            "Quantised or otherwise replaced layers must be converted back to plain layers first."
        )


def plain_layer(module: nn.Module) -> nn.Module:
    """The nn.Linear / Conv1D under an adapter layer (a `peft` LoRA layer: `get_base_layer()`), else `module`.

    Its weight is the base weight, without the unmerged adapter.
    """
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def in_rows(module: nn.Module) -> torch.Tensor:
    """Weight of an input projection as [out_features, in_features] (a view or a transpose)."""
    module = plain_layer(module)
    return module.weight.t() if is_conv1d(module) else module.weight


def out_cols(module: nn.Module) -> torch.Tensor:
    """Weight of an output projection as [out_features (D), in_features (F)]."""
    module = plain_layer(module)
    return module.weight.t() if is_conv1d(module) else module.weight


def ffn_width(down: nn.Module) -> int:
    """F, the number of intermediate neurons, read off the output projection."""
    return out_cols(down).shape[1]


@torch.no_grad()
def permute_input_projection(module: nn.Module, perm: torch.Tensor, halves: int = 1) -> None:
    """Reorder the output features (neurons) of an input projection.

    `halves=2` is for a fused [gate; up] projection: the same perm applies to both halves.
    """
    f = perm.numel()
    idx = torch.cat([perm + h * f for h in range(halves)]).to(module.weight.device)
    if is_conv1d(module):  # weight [D, halves*F]
        module.weight.copy_(module.weight[:, idx])
    else:  # weight [halves*F, D]
        module.weight.copy_(module.weight[idx])
    if getattr(module, "bias", None) is not None:
        module.bias.copy_(module.bias[idx])


@torch.no_grad()
def permute_output_projection(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the input features (neurons) of the output projection."""
    idx = perm.to(module.weight.device)
    if is_conv1d(module):  # weight [F, D]
        module.weight.copy_(module.weight[idx])
    else:  # weight [D, F]
        module.weight.copy_(module.weight[:, idx])


def check_finite(module: nn.Module, name: str) -> None:
    """Refuse a projection whose weights hold NaN or inf."""
    for pname, p in module.named_parameters(recurse=False):
        if not torch.isfinite(p).all():
            raise LTEError(
                f"{name}.{pname} holds NaN or inf values; the model is broken (check the checkpoint "
                "or the training run that produced it) and cannot be converted"
            )
