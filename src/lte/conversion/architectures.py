"""Where each model family keeps its FFNs, and what they are made of.

One `FFNSpec` per `model_type`, in the spirit of PEFT's target-module tables: adding a family is
one entry here plus its tiny test. Module names are relative to the FFN *container*, the module
whose dotted name matches `container` (a regular expression searched in the full module name).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ..errors import LTEError


@dataclass(frozen=True)
class FFNSpec:
    """How one family's FFN is laid out.

    Attributes:
        container: regex matched (with `re.search`) against full module names; every match is
            one FFN, in model order.
        down: the output projection (input: the intermediate activation, width F).
        up: the up projection (gated FFNs) or W1 (plain FFNs); None when fused.
        gate: the gate projection of a gated FFN; None for plain FFNs.
        gate_up: a fused [gate; up] projection (Phi-3) producing 2F features.
        layout: "linear" (nn.Linear, weight [out, in]) or "conv1d" (GPT-2's Conv1D, weight [in, out]).
        act_keys: config attributes that name the activation, tried in order.
    """

    container: str
    down: str
    up: str | None = None
    gate: str | None = None
    gate_up: str | None = None
    layout: str = "linear"
    act_keys: tuple[str, ...] = ("hidden_act", "hidden_activation", "activation_function")

    def __post_init__(self) -> None:
        if self.layout not in ("linear", "conv1d"):
            raise LTEError(f"FFNSpec.layout must be 'linear' or 'conv1d', got {self.layout!r}")
        if self.gate_up is None and self.up is None:
            raise LTEError("FFNSpec needs `up` (W1 or up projection) or `gate_up` (fused projection)")
        if self.gate_up is not None and (self.gate is not None or self.up is not None):
            raise LTEError("FFNSpec: give either `gate_up` alone or `gate`/`up`, not both")
        try:
            re.compile(self.container)
        except re.error as err:
            raise LTEError(f"FFNSpec.container {self.container!r} is not a valid regex: {err}") from err

    @property
    def gated(self) -> bool:
        return self.gate is not None or self.gate_up is not None

    @property
    def input_name(self) -> str:
        """The projection that sees the FFN input and carries the router."""
        return self.gate_up or self.gate or self.up  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FFNSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise LTEError(f"unknown FFNSpec field(s) {unknown}; valid: {sorted(fields)}")
        data = dict(data)
        if "act_keys" in data:
            data["act_keys"] = tuple(data["act_keys"])
        return cls(**data)


_LLAMA_LIKE = FFNSpec(container=r"layers\.\d+\.mlp$", gate="gate_proj", up="up_proj", down="down_proj")
_BERT_LIKE = FFNSpec(container=r"layer\.\d+$", up="intermediate.dense", down="output.dense")

ARCHITECTURES: dict[str, FFNSpec] = {
    # gated SwiGLU
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    # gated GELU (GEGLU)
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": _LLAMA_LIKE,
    # fused gate_up
    "phi3": FFNSpec(container=r"layers\.\d+\.mlp$", gate_up="gate_up_proj", down="down_proj"),
    # plain FFNs
    "gpt2": FFNSpec(container=r"h\.\d+\.mlp$", up="c_fc", down="c_proj", layout="conv1d"),
    "opt": FFNSpec(container=r"layers\.\d+$", up="fc1", down="fc2"),
    "gpt_neox": FFNSpec(container=r"layers\.\d+\.mlp$", up="dense_h_to_4h", down="dense_4h_to_h"),
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "mpnet": _BERT_LIKE,
}

#: HF activation names -> the names our kernels know.
_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_tanh": "gelu_tanh",
    "relu": "relu",
}

_HOW_TO_ADD = (
    "Describe its FFN yourself: LTEConfig(ffn_spec=dict(container=r'layers\\.\\d+\\.mlp$', "
    "gate='gate_proj', up='up_proj', down='down_proj')) for a gated FFN, or "
    "dict(container=..., up='fc1', down='fc2') for a plain one (names relative to the container "
    "module; see lte.conversion.architectures.FFNSpec), or register it for good with "
    "lte.register_architecture(model_type, FFNSpec(...))."
)


def supported() -> list[str]:
    """The `model_type`s lte converts out of the box."""
    return sorted(ARCHITECTURES)


def register_architecture(model_type: str, spec: FFNSpec, overwrite: bool = False) -> None:
    """Add a family to the table (at run time, for this process)."""
    if model_type in ARCHITECTURES and not overwrite:
        raise LTEError(f"{model_type!r} is already in the table; pass overwrite=True to replace it")
    ARCHITECTURES[model_type] = spec


def spec_for(model_type: str, override: dict[str, Any] | FFNSpec | None = None) -> FFNSpec:
    """The FFN spec of a family, or the user's own description of it."""
    if override is not None:
        return override if isinstance(override, FFNSpec) else FFNSpec.from_dict(override)
    if model_type not in ARCHITECTURES:
        raise LTEError(
            f"lte does not know the model family {model_type!r} (supported: {', '.join(supported())}). "
            + _HOW_TO_ADD
        )
    return ARCHITECTURES[model_type]


def activation_name(config: Any, spec: FFNSpec) -> str:
    """The normalised activation of a family's FFN, read from its HF config."""
    configs = [config, getattr(config, "text_config", None)]
    for cfg in configs:
        if cfg is None:
            continue
        for key in spec.act_keys:
            name = getattr(cfg, key, None)
            if isinstance(name, str):
                return _ACTIVATIONS.get(name, name)
    return "unknown"
