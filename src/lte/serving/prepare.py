"""Ready a model for fast inference: replace every FFN container by `SparseMLP` or `DenseMLP`.

`prepare_for_inference(lmodel)` takes a converted `LTEModel` of the LLaMA family (gated FFNs with
gate/up/down projections) and puts a `SparseMLP` in place of each FFN container module (e.g.
`LlamaMLP`), on the HF model itself (the parent's attribute is replaced; no patched forwards).
`prepare_dense(model)` does the same with `DenseMLP`, so that a dense model runs through the same
decode loop and the comparison is fair.

Dimensions: T tokens, D model width, F FFN width, S expert size, E = ceil(F / S) experts.
Weights are kept in the kernel layout: gate/up `[F, D]` (shared with the original modules, no copy),
the down projection transposed `[F, D]` (one contiguous copy, made once here).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F_
from torch import nn

from ..errors import LTEError

#: Token counts up to this take the decode kernels; more tokens (prefill) take the masked dense path.
DECODE_MAX_TOKENS = 16

#: Families whose FFN is gated with gate_proj / up_proj / down_proj (what SparseMLP implements).
LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")


def _activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """The FFN nonlinearity by its normalised name (silu, gelu, gelu_tanh, relu)."""
    from ..kernels.reference import apply_activation

    return apply_activation(z, name)


def _check_activation(name: str) -> None:
    from ..kernels.reference import ACTIVATIONS

    if name not in ACTIVATIONS:
        raise LTEError(
            f"the FFN activation {name!r} has no fast kernel (supported: {', '.join(ACTIVATIONS)}); "
            "run this model through the LTEModel's masked dense path instead"
        )


def _frozen(t: torch.Tensor) -> nn.Parameter:
    """A parameter sharing `t`'s storage that no optimizer will touch."""
    return nn.Parameter(t.detach(), requires_grad=False)


class SparseMLP(nn.Module):
    """A gated LTE FFN for inference: hard router + sparse-expert FFN.

    forward(x [..., D]) with T = x.numel() / D tokens:
      - T <= `decode_max_tokens` (decode): `lte.kernels.routed_sparse_ffn`, router and FFN as one op
        (on CUDA the router's own Triton launch, then the FFN kernels; the PyTorch reference
        elsewhere); the mask stays on the GPU. `fuse_router = False` calls the `router_mask` and
        `sparse_ffn` ops separately instead.
      - more tokens (prefill): the masked dense path, the same arithmetic as the LTEModel in hard
        routing: y = (act(x Wg^T) * (x Wu^T) * m) Wd_t.
    Both paths compute the same function (tests check it).

    Args:
        w_gate, w_up: [F, D]. w_down_t: the down projection transposed, [F, D] contiguous.
        w_router: [E, D]. tau: threshold on sigmoid(x Wr^T). expert_size: S (last expert may be smaller).
        activation: silu | gelu | gelu_tanh | relu. use_kernels: False forces the masked dense path.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down_t: torch.Tensor, w_router: torch.Tensor,
                 tau: float, expert_size: int, activation: str, use_kernels: bool = True,
                 decode_max_tokens: int = DECODE_MAX_TOKENS) -> None:
        super().__init__()
        ffn_width, model_width = w_up.shape
        num_exp = -(-ffn_width // expert_size)
        for name, w, rows in (("w_gate", w_gate, ffn_width), ("w_down_t", w_down_t, ffn_width),
                              ("w_router", w_router, num_exp)):
            if tuple(w.shape) != (rows, model_width):
                raise LTEError(f"SparseMLP: {name} must be [{rows}, {model_width}], got {list(w.shape)}")
        if not 0.0 < tau < 1.0:
            raise LTEError(f"SparseMLP: tau must lie in (0, 1), got {tau}")
        _check_activation(activation)
        self.w_gate = _frozen(w_gate.contiguous())
        self.w_up = _frozen(w_up.contiguous())
        self.w_down_t = _frozen(w_down_t.contiguous())
        self.w_router = _frozen(w_router.contiguous())
        self.tau = float(tau)
        self.expert_size = int(expert_size)
        self.activation = activation
        self.use_kernels = use_kernels
        self.decode_max_tokens = decode_max_tokens
        self.fuse_router = True  # one op for router + FFN on the decode path (False: two ops, for comparison)
        # When True, eager forwards keep their expert mask in `last_mask` (bench statistics only;
        # leave False inside CUDA graphs).
        self.record_mask = False
        self.last_mask: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w_router.shape[0]

    def dense_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Expert mask [..., E] exactly as the LTEModel's hard routing computes it."""
        logits = F_.linear(x.to(self.w_router.dtype), self.w_router)  # [..., E]
        return torch.sigmoid(logits.float()) > self.tau

    def masked_dense(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """y = (act(x Wg^T) * (x Wu^T) * m) Wd_t for x [..., D] and mask [..., E] (cuBLAS, all neurons)."""
        h = _activation(F_.linear(x, self.w_gate), self.activation) * F_.linear(x, self.w_up)  # [..., F]
        neuron_mask = mask.repeat_interleave(self.expert_size, dim=-1)[..., : h.shape[-1]]  # [..., E*S] -> [..., F]
        return (h * neuron_mask.to(h.dtype)) @ self.w_down_t  # [..., D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.numel() // x.shape[-1]
        if self.use_kernels and num_tokens <= self.decode_max_tokens:
            from .. import kernels

            if self.fuse_router:
                y, mask = kernels.routed_sparse_ffn(x, self.w_router, self.w_up, self.w_down_t, tau=self.tau,
                                                    w_gate=self.w_gate, expert_size=self.expert_size,
                                                    activation=self.activation)  # mask [..., E] on the device
            else:
                mask = kernels.router_mask(x, self.w_router, self.tau)  # [..., E] bool, on the device
                y = kernels.sparse_ffn(x, mask, self.w_up, self.w_down_t, w_gate=self.w_gate,
                                       expert_size=self.expert_size, activation=self.activation)
        else:
            mask = self.dense_mask(x)
            y = self.masked_dense(x, mask)
        if self.record_mask:
            self.last_mask = mask.detach()
        return y

    def extra_repr(self) -> str:
        f, d = self.w_up.shape
        return (f"D={d}, F={f}, experts={self.num_experts}, S={self.expert_size}, tau={self.tau}, "
                f"activation={self.activation}, kernels={self.use_kernels}")


class DenseMLP(nn.Module):
    """A gated dense FFN in the same decode loop: y = (act(x Wg^T) * (x Wu^T)) Wd^T (cuBLAS).

    Args: w_gate, w_up [F, D]; w_down [D, F] (PyTorch's own layout; shared, not copied); activation.
    """

    def __init__(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, activation: str) -> None:
        super().__init__()
        _check_activation(activation)
        ffn_width, model_width = w_up.shape
        if tuple(w_gate.shape) != (ffn_width, model_width) or tuple(w_down.shape) != (model_width, ffn_width):
            raise LTEError(
                f"DenseMLP: expected w_gate/w_up [F, D] and w_down [D, F], got {list(w_gate.shape)}, "
                f"{list(w_up.shape)}, {list(w_down.shape)}"
            )
        self.w_gate = _frozen(w_gate)
        self.w_up = _frozen(w_up)
        self.w_down = _frozen(w_down)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _activation(F_.linear(x, self.w_gate), self.activation) * F_.linear(x, self.w_up)  # [..., F]
        return F_.linear(h, self.w_down)  # [..., D]

    def extra_repr(self) -> str:
        f, d = self.w_up.shape
        return f"D={d}, F={f}, activation={self.activation}"


# --------------------------------------------------------------------------- module replacement
def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at dotted path `name` of `root` (setattr on the parent module)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _is_lte_model(model: Any) -> bool:
    from ..model import LTEModel

    return isinstance(model, LTEModel)


def _check_family(hf_model: nn.Module) -> str:
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    if model_type not in LLAMA_FAMILY:
        raise LTEError(
            f"the fast decode path supports the LLaMA family ({', '.join(LLAMA_FAMILY)}: gated FFNs with "
            f"gate_proj/up_proj/down_proj), not {model_type!r}. Use the LTEModel itself (masked dense path)."
        )
    return model_type


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
def prepare_for_inference(lmodel: Any, use_kernels: bool = True) -> nn.Module:
    """Replace each FFN of a converted LLaMA-family `LTEModel` by a `SparseMLP`; return the HF model.

    Routing is hard (`sigmoid(x Wr^T) > tau`, each layer's own tau) whatever the LTEModel's mode
    was. The HF model is changed in place and returned; the LTEModel must not be used afterwards
    (its wrappers are no longer in the module tree). Cast the model to its serving dtype and
    device *before* calling this. `use_kernels=False` keeps the masked dense path for every shape.
    """
    if not _is_lte_model(lmodel):
        raise LTEError(
            f"prepare_for_inference expects an lte.LTEModel (from lte.get_lte_model or LTEModel.from_pretrained), "
            f"got {type(lmodel).__name__}; for a plain HF model use prepare_dense(model)"
        )
    if getattr(lmodel, "routing", "hard") == "topk":
        raise LTEError("prepare_for_inference implements hard (threshold) routing; this model is in topk routing. "
                       "Call lmodel.set_routing('hard') first.")
    hf_model = lmodel.base_model
    _check_family(hf_model)
    expert_size = lmodel.lte_config.expert_size
    names = {id(m): n for n, m in hf_model.named_modules()}
    for layer in lmodel.lte_layers():
        if not layer.spec.gated or layer.spec.gate is None:
            raise LTEError(f"FFN {layer.name} is not a gated gate/up/down FFN; SparseMLP cannot replace it")
        _check_expert_sizes(layer.expert_sizes, expert_size, layer.name)
        name = names.get(id(layer.container))
        if name is None:
            raise LTEError(f"FFN {layer.name} is no longer in the model: was prepare_for_inference called twice?")
        sparse = SparseMLP(
            w_gate=layer.gate_weight().detach(),  # [F, D]
            w_up=layer.up_weight().detach(),  # [F, D]
            w_down_t=layer.down_weight().detach().t().contiguous(),  # [D, F] -> [F, D]
            w_router=layer.router.weight.detach(),  # [E, D]
            tau=layer.tau,
            expert_size=expert_size,
            activation=layer.activation,
            use_kernels=use_kernels,
        )
        _replace(hf_model, name, sparse)
    return hf_model


def _plain_ffns(hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, container) of every FFN of a plain LLaMA-family HF model, via the architecture table."""
    from ..conversion.architectures import spec_for

    spec = spec_for(hf_model.config.model_type)
    pattern = re.compile(spec.container)
    found = [(n, m) for n, m in hf_model.named_modules() if n and pattern.search(n)]
    if not found:
        raise LTEError(f"no FFN matching {spec.container!r} found in this {type(hf_model).__name__}")
    return found


@torch.no_grad()
def dense_modules(model: Any) -> dict[str, DenseMLP]:
    """A `DenseMLP` for every FFN of a LLaMA-family model, by dotted container name (nothing replaced yet).

    Accepts a plain HF model or an `LTEModel` (its routers are ignored: dense function). The
    DenseMLPs share the model's weights (no copy), the down projection in its own [D, F] layout.
    """
    if _is_lte_model(model):
        hf_model = model.base_model
        _check_family(hf_model)
        names = {id(m): n for n, m in hf_model.named_modules()}
        items = [(names[id(layer.container)], layer.gate_weight(), layer.up_weight(), layer.down_weight(),
                  layer.activation) for layer in model.lte_layers()]
    else:
        from ..conversion.architectures import activation_name, spec_for

        hf_model = model
        model_type = _check_family(hf_model)
        act = activation_name(hf_model.config, spec_for(model_type))
        items = [(name, c.gate_proj.weight, c.up_proj.weight, c.down_proj.weight, act)
                 for name, c in _plain_ffns(hf_model)]
    return {name: DenseMLP(wg.detach(), wu.detach(), wd.detach(), act) for name, wg, wu, wd, act in items}


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
    """Replace each FFN of a LLaMA-family model by a `DenseMLP`; return the HF model (changed in place).

    Accepts a plain HF model or an `LTEModel` (its routers are dropped: the result computes the
    dense function). Used to run a dense model through the same decode loop as `SparseMLP`.
    """
    modules = dense_modules(model)
    hf_model = model.base_model if _is_lte_model(model) else model
    swap_modules(hf_model, modules)
    return hf_model


def sparse_modules(model: nn.Module) -> list[SparseMLP]:
    """The `SparseMLP`s of a prepared model, in model order."""
    return [m for m in model.modules() if isinstance(m, SparseMLP)]
