"""LoRA adapters (the `peft` library) on the frozen base of a converted model.

Conversion has already permuted the FFN weights and wrapped the FFN's input and output projections
in `LTEInput` / `LTEOutput` (`lte.routing.layers`). The adapters go on the **permuted** layers: an
FFN projection's target is the wrapper's `base_layer` (the nn.Linear / Conv1D inside it), so a LoRA
update lives in the same neuron order as the weight it adds to, and merging it (`merge`) gives
exactly the permuted weights that `lte.serving.prepare_for_inference` hands to the kernels. The
routers stay outside the adapters: they are trained (stage 1) or frozen (stage 2) as they are.

Targets come from the family table (`lte.conversion.architectures.adapter_targets`: the attention
projections, `ATTENTION`, and the FFN projections, `FFNSpec`), a group of it ("attention", "ffn"),
or the user's names (peft's rule: a module's full name or a suffix after a dot; a single string
that is no group is a regular expression on full names). Every target resolves to full module
names before peft sees them, checked (a plain layer, rank <= its width) on the converted model or on
the plain one before conversion (the same names, without `.base_layer`).

`peft` is imported on first use only.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .conversion.architectures import TARGET_GROUPS, FFNSpec, adapter_targets
from .conversion.locate import find_ffns
from .conversion.permute import in_rows, is_conv1d, plain_layer
from .errors import LTEError
from .routing.layers import WrappedLayer

__all__ = ["ADAPTER_NAME", "adapter_parameters", "adapter_state", "check_config", "config_from_dict",
           "config_to_dict", "inject", "load_adapter_state", "lora_config", "merge", "resolve_targets"]

#: The (only) adapter's name inside peft's layers.
ADAPTER_NAME = "default"
_BLOCK = re.compile(r"^(.*?\.\d+)(?:\.|$)")  # a container's block: its name up to the first numeric part


def _peft():
    try:
        import peft
    except ImportError as err:
        raise LTEError("adapters need the peft library: pip install 'lte[peft]' (or pip install peft)") from err
    return peft


def lora_config(r: int = 16, alpha: float | None = None, dropout: float = 0.0,
                targets: str | Iterable[str] | None = None):
    """A `peft.LoraConfig`: rank `r`, scale alpha / r (alpha default 2r), `targets` a group
    ("all", "attention", "ffn"), module names, or a comma-separated string of either."""
    if isinstance(targets, str) and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(r, int) or r < 1:
        raise LTEError(f"the LoRA rank must be an integer >= 1, got {r!r}")
    if not 0.0 <= dropout < 1.0:
        raise LTEError(f"the LoRA dropout must lie in [0, 1), got {dropout}")
    return _peft().LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout,
                              target_modules=list(targets) if isinstance(targets, (list, tuple)) else targets,
                              bias="none")


# --------------------------------------------------------------------------- targets
def _blocks(model: nn.Module, spec: FFNSpec) -> tuple[list[str], list[str]]:
    """(FFN container names, the blocks holding them), in model order."""
    containers = [ffn.name for ffn in find_ffns(model, spec)]
    blocks = []
    for name in containers:
        match = _BLOCK.match(name)
        block = match.group(1) if match else name
        if block not in blocks:
            blocks.append(block)
    return containers, blocks


def _matches_user(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def resolve_targets(model: nn.Module, spec: FFNSpec, model_type: str,
                    targets: str | Iterable[str] | None = None) -> list[str]:
    """Full names of the layers adapters go on, in model order (converted or not yet converted model).

    An FFN projection wrapped by LTE resolves to its `base_layer`. Raises `LTEError` when a target is
    unknown, matches nothing, or is not a plain nn.Linear / Conv1D.
    """
    if targets is None:
        targets = "all"
    if isinstance(targets, (set, tuple)):
        targets = sorted(targets)
    modules = dict(model.named_modules())
    if isinstance(targets, str) and targets in TARGET_GROUPS:
        table = adapter_targets(model_type, spec, targets)
        containers, blocks = _blocks(model, spec)
        wanted = {f"{c}.{rel}" for c in containers for rel in table["ffn"]}
        for name in modules:
            block = next((b for b in blocks if name.startswith(b + ".")), None)
            if block and any(name == f"{block}.{s}" or name.endswith("." + s) for s in table["attention"]):
                wanted.add(name)
        described = f"the {targets} projections of the family table ({model_type})"
    else:
        if isinstance(targets, str) and targets == "all-linear":
            raise LTEError("'all-linear' would put adapters on the routers too; use 'all' (attention + FFN "
                           "projections of the family table) or name the modules")
        users = targets if isinstance(targets, str) else list(targets)
        wanted = {n for n in modules if n and _matches_user(n, users) and not _inside_adapter(n)
                  and not n.endswith((".router", ".base_layer"))}
        described = f"the target modules {users!r}"
    names = []
    for name in modules:  # model order
        if name not in wanted:
            continue
        module = modules[name]
        if isinstance(module, WrappedLayer):
            name, module = name + ".base_layer", module.base_layer
        if _is_adapter_layer(module):
            raise LTEError(f"{name} already has an adapter; add adapters once (or merge them first)")
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise LTEError(f"adapter target {name} is a {type(module).__name__}; adapters go on nn.Linear / "
                           "Conv1D projections only: leave it out of the targets")
        names.append(name)
    if not names:
        raise LTEError(f"{described} match no module of this {type(model).__name__}; check the names "
                       "(full module names or their last parts, e.g. q_proj)")
    return names


#: Name parts of peft's LoRA sub-modules and parameters.
_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_dropout", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def _inside_adapter(name: str) -> bool:
    return any(part in _ADAPTER_PARTS for part in name.split("."))


def _is_adapter_layer(module: nn.Module) -> bool:
    return callable(getattr(module, "get_base_layer", None))


def check_rank(model: nn.Module, names: list[str], r: int) -> None:
    """Refuse a LoRA rank larger than a target's width (the smaller of its inputs and outputs)."""
    for name in names:
        out_f, in_f = in_rows(model.get_submodule(name)).shape
        width = min(in_f, out_f)
        if r > width:
            raise LTEError(f"LoRA rank {r} is larger than the width {width} of {name} ({in_f} inputs, {out_f} "
                           f"outputs): pick a rank <= {width} (--lora-r), or leave that layer out of the targets")


def check_config(config: Any) -> None:
    """Refuse what lte does not support: another adapter type than LoRA, modules_to_save."""
    peft = _peft()
    if not isinstance(config, peft.LoraConfig):
        raise LTEError(f"lte adapters are LoRA: pass a peft.LoraConfig, got {type(config).__name__}")
    if config.modules_to_save:
        raise LTEError("modules_to_save is not supported: the base (its head too) stays frozen. Start from a "
                       "model whose head is trained on the task (the dense stage's output)")


def plan(model: nn.Module, spec: FFNSpec, model_type: str, config: Any):
    """The config peft gets: a copy of `config` with its targets resolved to full names (checked)."""
    check_config(config)
    names = resolve_targets(model, spec, model_type, config.target_modules)
    check_rank(model, names, int(config.r))
    resolved = copy.deepcopy(config)
    resolved.target_modules = names
    resolved.fan_in_fan_out = any(is_conv1d(plain_layer(model.get_submodule(n))) for n in names)
    return resolved


# --------------------------------------------------------------------------- inject, state, merge
def inject(model: nn.Module, resolved: Any) -> None:
    """Put LoRA layers (peft) on `resolved.target_modules` of `model`, in place. peft freezes every
    parameter that is not an adapter's; adapters of bf16/fp16 layers are kept in fp32."""
    peft = _peft()
    peft.inject_adapter_in_model(resolved, model, adapter_name=ADAPTER_NAME)


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every adapter weight of `model`."""
    return [(n, p) for n, p in model.named_parameters() if _inside_adapter(n)]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under peft's names (adapter name removed), contiguous, on the CPU."""
    state = _peft().get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Load saved adapter weights into adapters `inject` put in place; every adapter must get its weights."""
    expected = set(adapter_state(model))
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise LTEError(f"{where}: the saved adapters do not fit the model (missing {missing[:3]}, unexpected "
                       f"{extra[:3]}); the save is damaged or was made for another model")
    _peft().set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Add every adapter's update to its layer's weight and put the plain layer back; returns how many."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in names:
        layer = model.get_submodule(name)
        layer.merge(safe_merge=True)  # refuses a merge that would put NaN / inf in the weights
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if "peft_config" in vars(model):
        del model.peft_config
    return len(names)


def config_to_dict(config: Any) -> dict[str, Any]:
    """A peft config as plain JSON values (sets become sorted lists)."""
    raw = config.to_dict()
    return json.loads(json.dumps(raw, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def config_from_dict(data: dict[str, Any]):
    """The peft config `config_to_dict` wrote."""
    peft = _peft()
    fields = set(peft.LoraConfig.__dataclass_fields__)
    unknown = sorted(set(data) - fields)
    if unknown:
        raise LTEError(f"the saved adapter config has fields this peft ({peft.__version__}) does not know: "
                       f"{unknown}; upgrade peft")
    return peft.LoraConfig(**{k: v for k, v in data.items() if k in fields and k != "peft_type"})
