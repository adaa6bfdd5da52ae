"""Finding a model's FFNs through the architecture table, and swapping their modules."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LTEError
from .architectures import FFNSpec, activation_name, spec_for
from .grouping import group_neurons
from .permute import (
    check_finite,
    check_projection,
    ffn_width,
    in_rows,
    permute_input_projection,
    permute_output_projection,
)


@dataclass
class FFNHandle:
    """One FFN of a model: its container and its projections (before any wrapping)."""

    name: str  # dotted name of the container
    container: nn.Module
    spec: FFNSpec
    activation: str

    def get(self, rel: str) -> nn.Module:
        return get_submodule(self.container, rel, self.name)

    def set(self, rel: str, module: nn.Module) -> None:
        set_submodule(self.container, rel, module)

    @property
    def input(self) -> nn.Module:
        """The projection that sees the FFN input x (gate, fused gate_up, or W1)."""
        return self.get(self.spec.input_name)

    @property
    def down(self) -> nn.Module:
        return self.get(self.spec.down)

    @property
    def up(self) -> nn.Module | None:
        """The separate up projection of a gated FFN (None otherwise)."""
        return self.get(self.spec.up) if self.spec.gate and self.spec.up else None

    @property
    def width(self) -> int:
        return ffn_width(self.down)

    def projections(self) -> list[tuple[str, nn.Module]]:
        """(name relative to the container, module) of every projection: input, down, separate up."""
        found = [(self.spec.input_name, self.input), (self.spec.down, self.down)]
        return found + ([(self.spec.up, self.up)] if self.up is not None else [])

    def grouping_features(self) -> torch.Tensor:
        """The features neurons are grouped by: the gate rows (gated FFNs) or W1 rows, [F, D]."""
        rows = in_rows(self.input)  # [F or 2F, D]
        return rows[: self.width] if self.spec.gate_up else rows

    def group(self, expert_size: int, method: str, seed: int, n_iter: int,
              features: torch.Tensor | None = None) -> torch.Tensor:
        """perm [F] (CPU) grouping this FFN's neurons into experts (`lte.conversion.grouping`).

        method "activation": k-means on `features` [F, k], the neurons' activation profiles
        (`lte.conversion.activations`); the other methods use the weights (`grouping_features`).
        """
        if method == "activation":
            if features is None or features.shape[0] != self.width:
                raise LTEError(f"{self.name}: grouping 'activation' needs activation profiles [F={self.width}, k]")
            return group_neurons(features, expert_size, method="kmeans", seed=seed, n_iter=n_iter).cpu()
        return group_neurons(self.grouping_features().detach(), expert_size, method=method, seed=seed,
                             n_iter=n_iter).cpu()

    def permute(self, perm: torch.Tensor) -> None:
        """Reorder the neurons of every projection by `perm`, in place (the function stays the same)."""
        permute_input_projection(self.input, perm, halves=2 if self.spec.gate_up else 1)
        if self.up is not None:
            permute_input_projection(self.up, perm)
        permute_output_projection(self.down, perm)

    def check(self) -> None:
        """Refuse an FFN lte cannot convert: a projection that is not nn.Linear / Conv1D, or NaN weights."""
        for rel, module in self.projections():
            check_projection(module, f"{self.name}.{rel}")
            check_finite(module, f"{self.name}.{rel}")


def get_submodule(container: nn.Module, rel: str, where: str = "the FFN") -> nn.Module:
    try:
        return container.get_submodule(rel)
    except AttributeError as err:
        raise LTEError(f"{where} has no submodule {rel!r}; the FFN spec does not fit this model") from err


def set_submodule(container: nn.Module, rel: str, module: nn.Module) -> None:
    parent_name, _, child = rel.rpartition(".")
    parent = container.get_submodule(parent_name) if parent_name else container
    setattr(parent, child, module)


def find_ffns(model: nn.Module, spec: FFNSpec | None = None) -> list[FFNHandle]:
    """Every FFN of an HF model, in model order (spec: from the table when None)."""
    if spec is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type is None:
            raise LTEError(f"expected a Hugging Face model with a .config.model_type, got {type(model).__name__}")
        spec = spec_for(model_type)
    pattern = re.compile(spec.container)
    found = [(name, m) for name, m in model.named_modules() if name and pattern.search(name)]
    if not found:
        raise LTEError(
            f"no FFN found: no module name matches {spec.container!r} in this "
            f"{type(model).__name__}. Pass LTEConfig(ffn_spec=...) describing where its FFNs are."
        )
    act = activation_name(model.config, spec)
    return [FFNHandle(name, m, spec, act) for name, m in found]
