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

GROUPINGS = ("kmeans", "activation", "random", "contiguous")


def _help(text: str) -> dict[str, str]:
    """Field metadata: the help text the docs and the CLI (`lte train --help`) show."""
    return {"help": text}


@dataclass
class LTEConfig:
    """Settings of an LTE conversion and of its losses (method.md sections 1-4).

    Each field's `help` (`dataclasses.fields(LTEConfig)`, `lte train --help`) says what it does.
    `tau` lives here only: routing, the losses, the statistics and the save all read this value
    (`LTEModel.set_routing(mode, tau=...)` changes it). `layer_tau`, when set, gives each layer its
    own routing threshold instead (`calibrate_tau(scope="layer")`); the losses keep reading `tau`.
    """

    expert_size: int = field(default=32, metadata=_help(
        "neurons per expert (32 in the paper); when the FFN width is not a multiple, each layer's last "
        "expert is smaller"))
    grouping: str = field(default="kmeans", metadata=_help(
        "neuron grouping: kmeans (balanced k-means on the L2-normalised gate / W1 rows), activation "
        "(balanced k-means on the neurons' activation profiles over calibration text; needs it), random or "
        "contiguous (no permutation)"))
    grouping_iters: int = field(default=15, metadata=_help("k-means iterations"))
    eta: float = field(default=0.5, metadata=_help(
        "weight of the efficiency loss (the sparsity knob; larger = sparser); the start value with "
        "--target-sparsity"))
    lam: float = field(default=0.0, metadata=_help(
        "weight of the separability loss (the paper: 0.5; 0 by default: lam 0.5 pinned eta at its clamp and kept "
        "less quality on SST-2, 3 seeds, and WikiText-2, 1 seed; docs/results.md)"))
    tau: float = field(default=0.5, metadata=_help("routing threshold on the sigmoid router scores, in (0, 1)"))
    layer_tau: list[float] | None = field(default=None, metadata=_help(
        "one routing threshold per LTE layer, in (0, 1), used instead of tau by routing, the statistics and "
        "serving (set by a per-layer tau calibration; None: every layer routes at tau)"))
    eps: float = field(default=1e-3, metadata=_help(
        "added to the separability loss denominator so it stays finite at G == tau"))
    topk: int | list[int] | None = field(default=None, metadata=_help(
        "experts per token in topk routing: one count for every layer or one per LTE layer (set by a stage 2 "
        "trained with stage2_routing topk)"))
    router_init_std: float | None = field(default=None, metadata=_help(
        "std of the random router init; None: 1/sqrt(D), which spreads the initial scores around 0.5 instead "
        "of putting them all at exactly 0.5"))
    seed: int = field(default=0, metadata=_help("seed of the grouping and the router init"))
    loss_to_model: bool = field(default=False, metadata=_help(
        "let the L_eff / L_sep gradients reach the model weights too (through the router input x), as in a "
        "fully joint loss; default (ours): they train only the routers, the task loss trains model and "
        "routers (on SmolLM2 and MiniLM the joint version let L_sep's early gradient damage the model)"))
    ffn_spec: dict[str, Any] | None = field(default=None, metadata=_help(
        "the FFN layout of a model family missing from the built-in table (lte.conversion.architectures."
        "FFNSpec), as a dict"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.expert_size, int) or self.expert_size < 1:
            raise LTEError(f"expert_size must be a positive integer, got {self.expert_size!r}")
        if self.grouping not in GROUPINGS:
            raise LTEError(f"unknown grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if not 0.0 < self.tau < 1.0:
            raise LTEError(f"tau is a threshold on sigmoid scores and must lie in (0, 1), got {self.tau}")
        if self.layer_tau is not None:
            taus = list(self.layer_tau)
            if not taus or not all(isinstance(t, (int, float)) and 0.0 < t < 1.0 for t in taus):
                raise LTEError(f"layer_tau must be a non-empty list of thresholds in (0, 1), got {self.layer_tau!r}")
            self.layer_tau = [float(t) for t in taus]
        if self.eta < 0 or self.lam < 0:
            raise LTEError(f"eta and lam must be >= 0, got eta={self.eta}, lam={self.lam}")
        if self.eps <= 0:
            raise LTEError(f"eps must be > 0, got {self.eps}")
        if isinstance(self.topk, (list, tuple)):
            if not self.topk or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in self.topk):
                raise LTEError(f"topk per layer must be a non-empty list of counts >= 0, got {self.topk!r}")
            self.topk = list(self.topk)
        elif self.topk is not None and (not isinstance(self.topk, int) or self.topk < 0):
            raise LTEError(f"topk must be a count >= 0 or one per layer, got {self.topk!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["layer_tau"] is None:  # left out when unset, so such files stay readable by older lte
            del data["layer_tau"]
        return data

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
