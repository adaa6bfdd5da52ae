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

_LLAMA_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_BERT_ATTENTION = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")

#: Each family's attention projections, the other half of its adapter targets (`adapter_targets`):
#: dotted names matched as suffixes of the module names inside a block (decoder / encoder layer) that
#: holds one of its FFNs (so a vision tower's attention is not one).
ATTENTION: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA_ATTENTION,
    "mistral": _LLAMA_ATTENTION,
    "qwen2": _LLAMA_ATTENTION,
    "qwen3": _LLAMA_ATTENTION,
    "gemma": _LLAMA_ATTENTION,
    "gemma2": _LLAMA_ATTENTION,
    "gemma3_text": _LLAMA_ATTENTION,
    "gemma3": _LLAMA_ATTENTION,
    "phi3": ("self_attn.qkv_proj", "self_attn.o_proj"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"),
    "gpt_neox": ("attention.query_key_value", "attention.dense"),
    "bert": _BERT_ATTENTION,
    "roberta": _BERT_ATTENTION,
    "mpnet": ("attention.attn.q", "attention.attn.k", "attention.attn.v", "attention.attn.o"),
}

#: Which projections `adapter_targets` names: both halves, or one.
TARGET_GROUPS = ("all", "attention", "ffn")

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


def register_architecture(model_type: str, spec: FFNSpec, overwrite: bool = False,
                          attention: tuple[str, ...] | None = None) -> None:
    """Add a family to the table (at run time, for this process).

    `attention`: its attention projections (suffixes of their module names, e.g. ("self_attn.q_proj",
    ...)), which adapters target together with the FFN projections; without it, adapters need
    explicit targets or the "ffn" group.
    """
    if model_type in ARCHITECTURES and not overwrite:
        raise LTEError(f"{model_type!r} is already in the table; pass overwrite=True to replace it")
    ARCHITECTURES[model_type] = spec
    if attention is not None:
        ATTENTION[model_type] = tuple(attention)


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


def adapter_targets(model_type: str, spec: FFNSpec, group: str = "all") -> dict[str, tuple[str, ...]]:
    """The projections adapters (LoRA) train in a family: {"attention": suffixes, "ffn": names}.

    "ffn" names are relative to the FFN container (`spec`); "attention" names are suffixes of module
    names (`ATTENTION`). `group` "all", "attention" or "ffn" keeps both halves or one.
    """
    if group not in TARGET_GROUPS:
        raise LTEError(f"unknown adapter target group {group!r}; choose one of {', '.join(TARGET_GROUPS)} "
                       "or name the modules")
    ffn = tuple(n for n in (spec.gate_up, spec.gate, spec.up, spec.down) if n)
    attention: tuple[str, ...] = ()
    if group in ("all", "attention"):
        if model_type not in ATTENTION:
            raise LTEError(
                f"lte does not know the attention projections of the model family {model_type!r}, so it cannot "
                "choose the adapter targets: pass them (--lora-targets q_proj,v_proj,... or "
                "LoraConfig(target_modules=[...])), use --lora-targets ffn (the FFN projections only), or "
                "register them: lte.register_architecture(model_type, spec, attention=(...), overwrite=True)"
            )
        attention = ATTENTION[model_type]
    return {"attention": attention, "ffn": ffn if group in ("all", "ffn") else ()}


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
