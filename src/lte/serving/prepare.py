"""Ready a model for fast inference: replace every FFN container by `SparseMLP`.

`prepare_for_inference(lmodel)` takes a converted `LTEModel` whose FFN container module is the
FFN alone (input projection(s), activation, output projection: `LlamaMLP`, `GemmaMLP`, `Phi3MLP`,
`GPT2MLP`, `GPTNeoXMLP`, ...; see `SERVED_FAMILIES`) and puts a `SparseMLP` in its place, on the HF
model itself (the parent's attribute is replaced; no patched forwards). Gated (SwiGLU, GEGLU, fused
gate_up) and plain FFNs with biases (GPT-2's Conv1D, GPT-NeoX) all run through the same kernels.
`lte.serving.dense.prepare_dense(model)` does the same with `DenseMLP`, so that a dense model runs
through the same decode loop and the comparison is fair.

Dimensions: T tokens, D model width, F FFN width, S expert size, E = ceil(F / S) experts.
Weights are kept in the kernel layout: gate/up/W1 `[F, D]` (shared with the original modules when
they are nn.Linear, one contiguous copy for Conv1D), the down projection transposed `[F, D]` (one
contiguous copy, made once here).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F_
from torch import nn

from ..errors import LTEError
from ..routing.layers import LTEInput
from .sparse_mlp import DECODE_MAX_TOKENS, WEIGHT_FORMATS, SparseMLP, _frozen

#: Families whose FFN container module is the whole FFN (what SparseMLP / DenseMLP replace).
SERVED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3",
                   "gpt2", "gpt_neox")
LLAMA_FAMILY = SERVED_FAMILIES  # the former name
#: Families whose FFN container holds more than the FFN (OPT's decoder layer: norm, residual): their
#: input and output projections are replaced by `SparseFFNIn` / `SparseFFNOut`, and the model's own
#: activation runs between them.
SPLIT_FAMILIES = ("opt",)


class SparseFFNIn(nn.Module):
    """First half of a plain LTE FFN inside a bigger container (OPT): replaces the input projection W1.

    forward(x [..., D]) -> z [..., F] = x W1^T + b1 for the experts the hard router (and budget)
    turns on; the model applies its activation to z and calls the paired `SparseFFNOut`, which reads
    the mask this module left in `state` (as `LTEInput` / `LTEOutput` share the gate). Decode
    (T <= `decode_max_tokens`): `lte.kernels.routed_ffn_in`; prefill: cuBLAS for every neuron.
    Attributes as `SparseMLP` (w_up, b_up, w_router, tau, expert_size, budget, use_kernels, ...).
    """

    def __init__(self, w_up: torch.Tensor, b_up: torch.Tensor | None, w_router: torch.Tensor, tau: float,
                 expert_size: int, use_kernels: bool = True, decode_max_tokens: int = DECODE_MAX_TOKENS,
                 budget: int = 0) -> None:
        super().__init__()
        ffn_width, model_width = w_up.shape
        num_exp = -(-ffn_width // expert_size)
        if tuple(w_router.shape) != (num_exp, model_width):
            raise LTEError(f"SparseFFNIn: w_router must be [{num_exp}, {model_width}], got {list(w_router.shape)}")
        if b_up is not None and tuple(b_up.shape) != (ffn_width,):
            raise LTEError(f"SparseFFNIn: b_up must be [{ffn_width}], got {list(b_up.shape)}")
        if not 0.0 < tau < 1.0:
            raise LTEError(f"SparseFFNIn: tau must lie in (0, 1), got {tau}")
        self.w_up = _frozen(w_up.contiguous())
        self.b_up = None if b_up is None else _frozen(b_up.contiguous())
        self.w_router = _frozen(w_router.contiguous())
        self.tau = float(tau)
        self.expert_size = int(expert_size)
        self.use_kernels = use_kernels
        self.decode_max_tokens = decode_max_tokens
        self.budget = budget
        self.topk = 0  # threshold routing only: `dense_mask` (shared with SparseMLP) reads it
        self.record_mask = False
        self.last_mask: torch.Tensor | None = None
        self.state: tuple[torch.Tensor, torch.Tensor | None, bool] | None = None  # (mask, union, kernel path)

    num_experts = SparseMLP.num_experts
    budget = SparseMLP.budget
    dense_mask = SparseMLP.dense_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.numel() // x.shape[-1]
        if self.use_kernels and num_tokens <= self.decode_max_tokens:
            from .. import kernels

            z, mask, union = kernels.routed_ffn_in(x, self.w_router, self.w_up, b_up=self.b_up, tau=self.tau,
                                                   expert_size=self.expert_size, budget=self.budget)
            self.state = (mask, union, True)
        else:
            mask = self.dense_mask(x)
            z = F_.linear(x, self.w_up, self.b_up)  # [..., F]; the second half applies the mask
            self.state = (mask, None, False)
        if self.record_mask:
            self.last_mask = mask.detach()
        return z

    def extra_repr(self) -> str:
        f, d = self.w_up.shape
        return f"D={d}, F={f}, experts={self.num_experts}, S={self.expert_size}, tau={self.tau}, budget={self.budget}"


class SparseFFNOut(nn.Module):
    """Second half of a plain LTE FFN inside a bigger container: replaces the output projection W2.

    forward(h [..., F]) -> (h * m) Wd_t + b2 with the mask its `SparseFFNIn` computed for the same
    tokens (kernel path: only the union's experts are read)."""

    def __init__(self, source: SparseFFNIn, w_down_t: torch.Tensor, b_down: torch.Tensor | None) -> None:
        super().__init__()
        if tuple(w_down_t.shape[:1]) != (source.w_up.shape[0],):
            raise LTEError(f"SparseFFNOut: w_down_t must be [F={source.w_up.shape[0]}, D], got {list(w_down_t.shape)}")
        object.__setattr__(self, "_source", source)  # a plain reference: the router appears once in the tree
        self.w_down_t = _frozen(w_down_t.contiguous())
        self.b_down = None if b_down is None else _frozen(b_down.contiguous())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        state = self._source.state
        if state is None or state[0].shape[:-1] != h.shape[:-1]:
            raise LTEError("SparseFFNOut: its SparseFFNIn did not run on these tokens (call the FFN's input "
                           "projection, then its output projection, once each per forward)")
        mask, union, kernel_path = state
        self._source.state = None
        if kernel_path:
            from .. import kernels

            return kernels.sparse_ffn_out(h, mask, union, self.w_down_t, b_down=self.b_down,
                                          expert_size=self._source.expert_size)
        neuron_mask = mask.repeat_interleave(self._source.expert_size, dim=-1)[..., : h.shape[-1]]  # [..., F]
        y = (h * neuron_mask.to(h.dtype)) @ self.w_down_t  # [..., D]
        return y if self.b_down is None else y + self.b_down


# --------------------------------------------------------------------------- module replacement
def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` of `root` (setattr on the parent module)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _is_lte_model(model: Any) -> bool:
    from ..model import LTEModel

    return isinstance(model, LTEModel)


def _check_family(hf_model: nn.Module, allow_split: bool = False) -> str:
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type in SERVED_FAMILIES or (allow_split and model_type in SPLIT_FAMILIES):
        return model_type
    served = SERVED_FAMILIES + (SPLIT_FAMILIES if allow_split else ())
    raise LTEError(
        f"the fast decode path serves {', '.join(served)}, not {model_type!r}. "
        "Use the LTEModel itself (masked dense path)."
    )


def _replace_split(hf_model: nn.Module, names: dict[int, str], layer: Any, expert_size: int, use_kernels: bool,
                   budget: int) -> None:
    """Put a SparseFFNIn / SparseFFNOut pair in place of one FFN's input and output projections."""
    if layer.spec.gated:
        raise LTEError(f"FFN {layer.name}: gated FFNs inside a bigger container are not served")
    container = names.get(id(layer.container))
    if container is None or not isinstance(hf_model.get_submodule(f"{container}.{layer.spec.input_name}"),
                                           LTEInput):
        raise LTEError(f"FFN {layer.name} is no longer in the model: was prepare_for_inference called twice?")
    up_bias, down_bias = layer.up_bias(), layer.down_bias()
    first = SparseFFNIn(layer.up_weight().detach(), None if up_bias is None else up_bias.detach(),
                        layer.router.weight.detach(), layer.tau, expert_size, use_kernels, budget=budget)
    second = SparseFFNOut(first, layer.down_weight().detach().t().contiguous(),  # [D, F] -> [F, D]
                          None if down_bias is None else down_bias.detach())
    _replace(hf_model, f"{container}.{layer.spec.input_name}", first)
    _replace(hf_model, f"{container}.{layer.spec.down}", second)


def _check_expert_sizes(sizes: list[int], expert_size: int, where: str) -> None:
    """SparseMLP needs experts of S neurons, the last one possibly smaller."""
    ffn_width = sum(sizes)
    num_exp = -(-ffn_width // expert_size)
    expected = [expert_size] * (num_exp - 1) + [ffn_width - expert_size * (num_exp - 1)]
    if sizes != expected:
        raise LTEError(
            f"{where}: expert sizes {sizes[:4]}... are not blocks of {expert_size} neurons (last one smaller); "
            "the kernels need the layout made by lte.get_lte_model"
        )


@torch.no_grad()
def prepare_for_inference(lmodel: Any, use_kernels: bool = True, budget: int = 0, weights: str = "native") -> nn.Module:
    """Replace each FFN of a converted `LTEModel` by a `SparseMLP`; return the HF model.

    Routing is hard (`sigmoid(x Wr^T) > tau`, each layer's own tau) whatever the LTEModel's mode
    was, except for a model in topk routing (a stage 2 trained with `stage2_routing="topk"`): its
    FFNs keep their per-layer expert counts (`SparseMLP(topk=k)`, with the budget too). The HF model is changed in place and returned; the LTEModel must not be used afterwards
    (its wrappers are no longer in the module tree, and their FFN parameters are emptied to free the memory the
    served FFNs copied). Cast the model to its serving dtype and
    device *before* calling this. `use_kernels=False` keeps the masked dense path for every shape.
    `budget > 0` caps the experts one decode step uses per layer for the whole batch (see
    `SparseMLP`); 0 keeps every expert some token wants (the LTEModel's function). LoRA adapters
    are merged into the (permuted) weights first (`LTEModel.merge_adapters`). `weights="fp8"` stores
    the FFN matrices in fp8 with row scales (`SparseMLP`; not for split FFNs such as OPT's).
    """
    if weights not in WEIGHT_FORMATS:
        raise LTEError(f"prepare_for_inference: weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
    if not _is_lte_model(lmodel):
        raise LTEError(
            f"prepare_for_inference expects an lte.LTEModel (from lte.get_lte_model or LTEModel.from_pretrained), "
            f"got {type(lmodel).__name__}; for a plain HF model use prepare_dense(model)"
        )
    topk = getattr(lmodel, "routing", "hard") == "topk"
    lmodel.merge_adapters()
    hf_model = lmodel.base_model
    split = _check_family(hf_model, allow_split=True) in SPLIT_FAMILIES
    if topk and (split or weights != "native"):
        raise LTEError("prepare_for_inference serves a model in topk routing (a stage 2 trained with stage2_routing "
                       f"topk) for FFNs in their own module ({', '.join(SERVED_FAMILIES)}), with native weights; "
                       "drop weights='fp8', or call lmodel.set_routing('hard') to serve its thresholds (the experts "
                       "it trained with may then differ)")
    if split and weights != "native":
        raise LTEError(f"prepare_for_inference: weights={weights!r} is served for FFNs in their own module "
                       f"({', '.join(SERVED_FAMILIES)}), not for {hf_model.config.model_type!r}; use weights='native'")
    expert_size = lmodel.lte_config.expert_size
    names = {id(m): n for n, m in hf_model.named_modules()}
    for layer in lmodel.lte_layers():
        _check_expert_sizes(layer.expert_sizes, expert_size, layer.name)
        if split:
            _replace_split(hf_model, names, layer, expert_size, use_kernels, budget)
            continue
        name = names.get(id(layer.container))
        if name is None:
            raise LTEError(f"FFN {layer.name} is no longer in the model: was prepare_for_inference called twice?")
        gate, up_bias, down_bias = layer.gate_weight(), layer.up_bias(), layer.down_bias()
        sparse = SparseMLP(
            w_gate=None if gate is None else gate.detach(),  # [F, D] (a row slice of Phi-3's fused gate_up)
            w_up=layer.up_weight().detach(),  # [F, D]
            w_down_t=layer.down_weight().detach().t().contiguous(),  # [D, F] -> [F, D]
            w_router=layer.router.weight.detach(),  # [E, D]
            tau=layer.tau,
            expert_size=expert_size,
            activation=layer.activation,
            use_kernels=use_kernels,
            b_up=None if up_bias is None else up_bias.detach(),
            b_down=None if down_bias is None else down_bias.detach(),
            budget=budget,
            weights=weights,
            topk=int(layer.input.k) if topk else 0,
        )
        _replace(hf_model, name, sparse)
        _release(layer.container, layer.router)
    return hf_model


def _release(*modules: nn.Module) -> None:
    """Empty the parameters of an FFN the served model no longer holds (the LTEModel is spent once prepared), so
    that the memory of what `SparseMLP` copied (the stacked `w_in`, the transposed down projection) is not held
    twice while the caller keeps the LTEModel; storage `SparseMLP` shares stays alive through it."""
    for module in modules:
        for param in module.parameters():
            param.data = param.data.new_empty(0)


def sparse_modules(model: nn.Module) -> list[SparseMLP | SparseFFNIn]:
    """The modules holding the routers of a prepared model (`SparseMLP`, or `SparseFFNIn` of a split
    FFN), in model order."""
    return [m for m in model.modules() if isinstance(m, (SparseMLP, SparseFFNIn))]


def ffn_weights(module: nn.Module) -> list[torch.Tensor]:
    """The FFN weight matrices a served FFN module reads (empty for other modules)."""
    if isinstance(module, SparseMLP):  # with fp8 weights, their row scales too
        return [w for w in (module.w_gate, module.w_up, module.w_down_t, module.s_gate, module.s_up, module.s_down)
                if w is not None]
    if isinstance(module, SparseFFNIn):
        return [module.w_up]
    if isinstance(module, SparseFFNOut):
        return [module.w_down_t]
    return []
