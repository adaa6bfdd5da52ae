"""`LTEConfig`: every knob of the LTE method, saved with the model as versioned JSON."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import LTEError

#: Bump when the saved format changes; loaders accept every version up to this one.
CONFIG_FORMAT_VERSION = 1

GROUPINGS = ("kmeans", "random", "contiguous")


@dataclass
class LTEConfig:
    """Settings of an LTE conversion and of its losses (method.md sections 1-4).

    Attributes:
        expert_size: neurons per expert (32 in the paper). When the FFN width is not a multiple,
            the last expert of each layer is smaller.
        grouping: how neurons are grouped into experts: "kmeans" (balanced k-means on the
            L2-normalised gate / W1 rows), "random" or "contiguous" (no permutation).
        grouping_iters: k-means iterations.
        eta: weight of the efficiency loss (the sparsity knob; larger = sparser).
        lam: weight of the separability loss.
        tau: routing threshold on the sigmoid scores.
        eps: added to the separability loss denominator so it stays finite at G == tau.
        topk: experts per token in "topk" routing (baselines); None means unset.
        router_init_std: standard deviation of the router init; None = 1/sqrt(D), which spreads
            the initial scores around 0.5 instead of putting them all at exactly 0.5.
        seed: seed for grouping and router init.
        loss_to_model: whether the gradients of L_eff and L_sep also flow into the model's own
            weights (through the router input x), as in a fully joint loss. Default False (ours):
            they train only the routers, while the task loss trains model and routers through
            the gated FFN. On SmolLM2 and MiniLM the joint version let L_sep's large early gradient
            swamp the task gradient (after clipping) and damaged the model.
        ffn_spec: optional description of the FFN of a model family missing from the built-in
            table (see `lte.conversion.architectures.FFNSpec`), as a dict.
    """

    expert_size: int = 32
    grouping: str = "kmeans"
    grouping_iters: int = 15
    eta: float = 0.5
    lam: float = 0.5
    tau: float = 0.5
    eps: float = 1e-3
    topk: int | None = None
    router_init_std: float | None = None
    seed: int = 0
    loss_to_model: bool = False
    ffn_spec: dict[str, Any] | None = field(default=None)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.expert_size, int) or self.expert_size < 1:
            raise LTEError(f"expert_size must be a positive integer, got {self.expert_size!r}")
        if self.grouping not in GROUPINGS:
            raise LTEError(f"unknown grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if not 0.0 < self.tau < 1.0:
            raise LTEError(f"tau is a threshold on sigmoid scores and must lie in (0, 1), got {self.tau}")
        if self.eta < 0 or self.lam < 0:
            raise LTEError(f"eta and lam must be >= 0, got eta={self.eta}, lam={self.lam}")
        if self.eps <= 0:
            raise LTEError(f"eps must be > 0, got {self.eps}")
        if self.topk is not None and self.topk < 0:
            raise LTEError(f"topk must be >= 0, got {self.topk}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LTEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LTEError(
                f"unknown LTEConfig field(s) {unknown}; valid fields are {sorted(known)}. "
                "The file may come from a newer lte: upgrade lte."
            )
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format_version": CONFIG_FORMAT_VERSION, **self.to_dict()}, indent=2))

    @classmethod
    def load(cls, path: str | Path) -> LTEConfig:
        path = Path(path)
        if not path.is_file():
            raise LTEError(f"no LTE config at {path}")
        data = json.loads(path.read_text())
        version = data.pop("format_version", 1)
        if version > CONFIG_FORMAT_VERSION:
            raise LTEError(f"{path} has format version {version}, newer than this lte ({CONFIG_FORMAT_VERSION}); upgrade lte")
        return cls.from_dict(data)
