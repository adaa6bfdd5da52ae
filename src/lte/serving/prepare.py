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

#: Token counts up to this take the decode kernels; more tokens (prefill) take the masked dense path.
DECODE_MAX_TOKENS = 64
#: How `SparseMLP` stores its FFN matrices: as given, or fp8 (e4m3) with one scale per row.
WEIGHT_FORMATS = ("native", "fp8")

#: Families whose FFN container module is the whole FFN (what SparseMLP / DenseMLP replace).
SERVED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gemma3", "phi3",
                   "gpt2", "gpt_neox")
LLAMA_FAMILY = SERVED_FAMILIES  # the former name
#: Families whose FFN container holds more than the FFN (OPT's decoder layer: norm, residual): their
#: input and output projections are replaced by `SparseFFNIn` / `SparseFFNOut`, and the model's own
#: activation runs between them.
SPLIT_FAMILIES = ("opt",)


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
    """An LTE FFN for inference: hard router + sparse-expert FFN, gated or plain.

    forward(x [..., D]) with T = x.numel() / D tokens:
      - T <= `decode_max_tokens` (decode): `lte.kernels.routed_sparse_ffn` (router, optional
        per-batch expert budget and FFN kernels on CUDA; the PyTorch reference elsewhere); the mask
        stays on the GPU. `fuse_router = False` launches `router_mask` and `sparse_ffn` separately.
      - more tokens (prefill): the masked dense path, the same arithmetic as the LTEModel in hard
        routing: y = (act(x Wg^T) * (x Wu^T + b1) * m) Wd_t + b2 (gated), (act(x W1^T + b1) * m) Wd_t + b2 (plain).
        The router is a cuBLAS GEMM; on CUDA `act(g) * u * m` is one launch that thresholds the router
        logits itself (`lte.kernels.routed_masked_dense_ffn`) instead of PyTorch's sigmoid and compare
        over [T, E] and four passes over [T, F] (activation, product, mask expansion, masking).
    Both paths compute the same function (tests check it); a budget applies to decode steps only.

    Args:
        w_gate: [F, D] or None (plain FFN). w_up: [F, D] (W1 of a plain FFN).
        w_down_t: the down projection transposed, [F, D] contiguous. w_router: [E, D].
        tau: threshold on sigmoid(x Wr^T). expert_size: S (last expert may be smaller).
        activation: silu | gelu | gelu_tanh | relu. use_kernels: False forces the masked dense path.
        b_up: [F] or None. b_down: [D] or None.
        budget: 0, or the most experts one decode step may use for the whole batch (the ones with
            the largest summed router score; see `lte.kernels.routed_sparse_ffn`).

    `ffn_path` picks the decode path: "sparse" (the kernels, default) or "dense" (router kernel +
    `lte.kernels.masked_dense_ffn`: every neuron through cuBLAS, the mask applied in one launch; the
    same function, cheaper when the batch's union of masks is nearly full). `lte.serving.dispatch`
    sets it per FFN from a measured union (`StaticDecoder` does so before it captures a step).

    `weights="fp8"` stores the three FFN matrices in float8_e4m3fn with one fp32 scale per row
    (`lte.kernels.quantize_rows_fp8`; the router and biases keep their dtype): decode steps read
    half the bytes of bf16 through the same kernels, always on the sparse path; prefill dequantizes
    the weights for the call. It saves memory, not time yet: on an H200 (docs/benchmarks.md) the fp8
    kernels ran slower than the bf16 ones at every batch size, and at B = 32 with a full union at
    0.39x of the dense bf16 FFN.
    """

    def __init__(self, w_gate: torch.Tensor | None, w_up: torch.Tensor, w_down_t: torch.Tensor,
                 w_router: torch.Tensor, tau: float, expert_size: int, activation: str, use_kernels: bool = True,
                 decode_max_tokens: int = DECODE_MAX_TOKENS, b_up: torch.Tensor | None = None,
                 b_down: torch.Tensor | None = None, budget: int = 0, weights: str = "native") -> None:
        super().__init__()
        if weights not in WEIGHT_FORMATS:
            raise LTEError(f"SparseMLP: weights must be one of {', '.join(WEIGHT_FORMATS)}, got {weights!r}")
        ffn_width, model_width = w_up.shape
        num_exp = -(-ffn_width // expert_size)
        for name, w, rows in (("w_gate", w_gate, ffn_width), ("w_down_t", w_down_t, ffn_width),
                              ("w_router", w_router, num_exp)):
            if w is not None and tuple(w.shape) != (rows, model_width):
                raise LTEError(f"SparseMLP: {name} must be [{rows}, {model_width}], got {list(w.shape)}")
        for name, b, size in (("b_up", b_up, ffn_width), ("b_down", b_down, model_width)):
            if b is not None and tuple(b.shape) != (size,):
                raise LTEError(f"SparseMLP: {name} must be [{size}], got {list(b.shape)}")
        if not 0.0 < tau < 1.0:
            raise LTEError(f"SparseMLP: tau must lie in (0, 1), got {tau}")
        _check_activation(activation)
        self.fp8 = weights == "fp8"
        scales: list[torch.Tensor | None] = [None, None, None]  # s_gate, s_up, s_down
        if self.fp8:
            from ..kernels.quant import quantize_rows_fp8

            (w_up, scales[1]), (w_down_t, scales[2]) = quantize_rows_fp8(w_up), quantize_rows_fp8(w_down_t)
            if w_gate is not None:
                w_gate, scales[0] = quantize_rows_fp8(w_gate)
        for name, scale in zip(("s_gate", "s_up", "s_down"), scales):
            self.register_buffer(name, scale)
        self.w_gate = None if w_gate is None else _frozen(w_gate.contiguous())
        self.w_up = _frozen(w_up.contiguous())
        self.w_down_t = _frozen(w_down_t.contiguous())
        self.w_router = _frozen(w_router.contiguous())
        self.b_up = None if b_up is None else _frozen(b_up.contiguous())
        self.b_down = None if b_down is None else _frozen(b_down.contiguous())
        self.tau = float(tau)
        self.expert_size = int(expert_size)
        self.activation = activation
        self.use_kernels = use_kernels
        self.decode_max_tokens = decode_max_tokens
        self._ffn_path = "sparse"
        self.budget = budget
        self.fuse_router = True  # one op for router + FFN on the decode path (False: two ops, for comparison)
        # When True, eager forwards keep their expert mask in `last_mask` (bench statistics only;
        # leave False inside CUDA graphs).
        self.record_mask = False
        self.last_mask: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.w_router.shape[0]

    @property
    def budget(self) -> int:
        return self._budget

    @budget.setter
    def budget(self, value: int) -> None:
        if not isinstance(value, int) or value < 0:
            raise LTEError(f"SparseMLP: budget must be an int >= 0 (0 = no budget), got {value!r}")
        if value > 0 and getattr(self, "_ffn_path", "sparse") == "dense":
            raise LTEError("SparseMLP: a per-batch budget runs on the sparse path; set ffn_path = 'sparse' first")
        self._budget = value

    @property
    def ffn_path(self) -> str:
        return self._ffn_path

    @ffn_path.setter
    def ffn_path(self, value: str) -> None:
        if value not in ("sparse", "dense"):
            raise LTEError(f"SparseMLP: ffn_path must be 'sparse' or 'dense', got {value!r}")
        if value == "dense" and self.fp8:
            raise LTEError("SparseMLP: fp8 weights are served on the sparse path only (the kernels read fp8; "
                           "cuBLAS would need the weights dequantized at every step)")
        if value == "dense" and self.budget > 0:
            raise LTEError("SparseMLP: the dense path has no per-batch budget (the budget exists to keep the union "
                           "small for the sparse kernels); set budget = 0 first")
        self._ffn_path = value

    def dense_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Expert mask [..., E] exactly as the LTEModel's hard routing computes it."""
        logits = F_.linear(x.to(self.w_router.dtype), self.w_router)  # [..., E]
        return torch.sigmoid(logits.float()) > self.tau

    @staticmethod
    def _project(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T + b [..., F]; fp8 rows are widened to x's dtype for the call and their scales multiply the
        products (W = Q * s[:, None], so x W^T = (x Q^T) * s), with no dequantized copy of W."""
        if scale is None:
            return F_.linear(x, w, bias)
        y = F_.linear(x, w.to(x.dtype)) * scale.to(x.dtype)
        return y if bias is None else y + bias

    def masked_dense(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The FFN with every neuron computed and the per-token mask [..., E] applied (cuBLAS)."""
        up = self._project(x, self.w_up, self.s_up, self.b_up)  # [..., F]
        if self.w_gate is not None:
            h = _activation(self._project(x, self.w_gate, self.s_gate), self.activation) * up
        else:
            h = _activation(up, self.activation)
        neuron_mask = mask.repeat_interleave(self.expert_size, dim=-1)[..., : h.shape[-1]]  # [..., E*S] -> [..., F]
        h = h * neuron_mask.to(h.dtype)
        if self.s_down is not None:  # rows of the down projection are neurons: their scales multiply h
            h = h * self.s_down.to(h.dtype)
        y = h @ self.w_down_t.to(h.dtype)  # [..., D]
        return y if self.b_down is None else y + self.b_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.numel() // x.shape[-1]
        if self.use_kernels and num_tokens <= self.decode_max_tokens:
            from .. import kernels

            ffn = dict(w_gate=self.w_gate, b_up=self.b_up, b_down=self.b_down, expert_size=self.expert_size,
                       activation=self.activation)
            if self.fp8:  # one op: router (+ budget) and the kernels reading fp8 rows
                y, mask = kernels.routed_sparse_ffn(x, self.w_router, self.w_up, self.w_down_t, tau=self.tau,
                                                    budget=self.budget, scales=(self.s_up, self.s_gate, self.s_down),
                                                    **ffn)
            elif self.ffn_path == "dense":  # every neuron through cuBLAS, the same masked function
                mask = kernels.router_mask(x, self.w_router, self.tau)  # [..., E] bool, on the device
                y = kernels.masked_dense_ffn(x, mask, self.w_up, self.w_down_t, **ffn)
            elif self.fuse_router or self.budget:
                y, mask = kernels.routed_sparse_ffn(x, self.w_router, self.w_up, self.w_down_t, tau=self.tau,
                                                    budget=self.budget, **ffn)  # mask [..., E] on the device
            else:
                mask = kernels.router_mask(x, self.w_router, self.tau)  # [..., E] bool, on the device
                y = kernels.sparse_ffn(x, mask, self.w_up, self.w_down_t, **ffn)
        else:
            mask = self.dense_mask(x) if self.record_mask or not (self.use_kernels and x.is_cuda) else None
            if self.use_kernels and x.is_cuda and not self.fp8:  # router, projections and one masked launch
                from .. import kernels

                y = kernels.routed_masked_dense_ffn(x, self.w_router, self.w_up, self.w_down_t, tau=self.tau,
                                                    w_gate=self.w_gate, b_up=self.b_up, b_down=self.b_down,
                                                    expert_size=self.expert_size, activation=self.activation)
            else:
                mask = self.dense_mask(x) if mask is None else mask
                y = self.masked_dense(x, mask)
        if self.record_mask:
            self.last_mask = mask.detach()
        return y

    def extra_repr(self) -> str:
        f, d = self.w_up.shape
        kind = "gated" if self.w_gate is not None else "plain"
        return (f"D={d}, F={f}, experts={self.num_experts}, S={self.expert_size}, tau={self.tau}, {kind}, "
                f"activation={self.activation}, biases={self.b_up is not None or self.b_down is not None}, "
                f"budget={self.budget}, kernels={self.use_kernels}, path={self.ffn_path}"
                + (", weights=fp8" if self.fp8 else ""))


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
    was. The HF model is changed in place and returned; the LTEModel must not be used afterwards
    (its wrappers are no longer in the module tree). Cast the model to its serving dtype and
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
    if getattr(lmodel, "routing", "hard") == "topk":
        raise LTEError("prepare_for_inference implements hard (threshold) routing; this model is in topk routing. "
                       "Call lmodel.set_routing('hard') first.")
    lmodel.merge_adapters()
    hf_model = lmodel.base_model
    split = _check_family(hf_model, allow_split=True) in SPLIT_FAMILIES
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
        )
        _replace(hf_model, name, sparse)
    return hf_model


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
