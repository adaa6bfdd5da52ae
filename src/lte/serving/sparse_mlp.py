"""`SparseMLP`: one served LTE FFN (hard or top-k router, sparse-expert kernels, masked dense path).

`lte.serving.prepare.prepare_for_inference` puts one in place of every FFN container of a converted
model; `lte.serving.dense.DenseMLP` is its dense counterpart. Dimensions: T tokens, D model width, F FFN
width, S expert size, E = ceil(F / S) experts. Weights are kept in the kernel layout: gate/up/W1 `[F, D]`,
the down projection transposed `[F, D]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_
from torch import nn

from ..errors import LTEError

__all__ = ["DECODE_MAX_TOKENS", "WEIGHT_FORMATS", "SparseMLP"]

#: Token counts up to this take the decode kernels; more tokens (prefill) take the masked dense path.
DECODE_MAX_TOKENS = 64
#: How `SparseMLP` stores its FFN matrices: as given, or fp8 (e4m3) with one scale per row.
WEIGHT_FORMATS = ("native", "fp8")


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
    """An LTE FFN for inference: hard (or top-k) router + sparse-expert FFN, gated or plain.

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
        topk: 0 (threshold routing), or the experts every token keeps, those with the largest router
            scores (a model trained with `stage2_routing="topk"`), ties to the lower expert index. Decode:
            the mask from `lte.kernels.router_topk_mask` (router and top-k kernels on CUDA, ranking the
            fp32 logits; with a budget, each token's top k among the batch's budget experts), then
            `lte.kernels.sparse_ffn`; prefill: `dense_mask` and the masked dense path. No fp8.

    `ffn_path` picks the decode path: "sparse" (the kernels, default) or "dense" (every neuron through
    cuBLAS, the mask applied in one launch; the same function, cheaper when the batch's union of masks is
    nearly full): for a gated FFN stored as one `w_in` (below) the gate, up and router rows in one product
    (`lte.kernels.stacked_masked_dense_ffn`), otherwise the router kernel + `lte.kernels.masked_dense_ffn`.
    A gated FFN without an up bias, with native weights, keeps W_gate, W_up and W_router as one matrix
    `w_in` [2F + E, D]; `w_gate`, `w_up` and `w_router` are its row slices. `lte.serving.dispatch`
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
                 b_down: torch.Tensor | None = None, budget: int = 0, weights: str = "native",
                 topk: int = 0) -> None:
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
        if not isinstance(topk, int) or isinstance(topk, bool) or not 0 <= topk <= num_exp:
            raise LTEError(f"SparseMLP: topk must be an int in [0, {num_exp}] (0 = threshold routing), got {topk!r}")
        if topk and weights != "native":
            raise LTEError("SparseMLP: topk routing is served with native weights; drop weights='fp8'")
        self.topk = topk
        self.fp8 = weights == "fp8"
        scales: list[torch.Tensor | None] = [None, None, None]  # s_gate, s_up, s_down
        if self.fp8:
            from ..kernels.quant import quantize_rows_fp8

            (w_up, scales[1]), (w_down_t, scales[2]) = quantize_rows_fp8(w_up), quantize_rows_fp8(w_down_t)
            if w_gate is not None:
                w_gate, scales[0] = quantize_rows_fp8(w_gate)
        for name, scale in zip(("s_gate", "s_up", "s_down"), scales):
            self.register_buffer(name, scale)
        self._store_inputs(w_gate, w_up, w_router, stack=w_gate is not None and b_up is None and not self.fp8)
        self.w_down_t = _frozen(w_down_t.contiguous())
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

    def _store_inputs(self, w_gate: torch.Tensor | None, w_up: torch.Tensor, w_router: torch.Tensor,
                      stack: bool) -> None:
        """The matrices that read x. A gated FFN without an up bias, with native weights of one dtype and
        device, keeps them as one matrix `w_in` = [W_gate; W_up; W_router] [2F + E, D]
        (`lte.kernels.stack_ffn_inputs`): the kernels read its row slices (`w_gate`, `w_up`, `w_router`, contiguous as before), and the dense path computes all three
        in one cuBLAS product (`lte.kernels.stacked_masked_dense_ffn`). Otherwise three matrices."""
        from ..kernels import stack_ffn_inputs

        parts = (w_gate, w_up, w_router)
        stack = stack and len({(w.dtype, w.device) for w in parts}) == 1
        self.ffn_width = int(w_up.shape[0])
        self.w_in = _frozen(stack_ffn_inputs(*parts)) if stack else None
        self._w_gate = None if stack or w_gate is None else _frozen(w_gate.contiguous())
        self._w_up = None if stack else _frozen(w_up.contiguous())
        self._w_router = None if stack else _frozen(w_router.contiguous())

    @property
    def w_gate(self) -> torch.Tensor | None:
        """[F, D], None for a plain FFN (rows of `w_in` when stacked)."""
        return self._w_gate if self.w_in is None else self.w_in[: self.ffn_width]

    @property
    def w_up(self) -> torch.Tensor:
        """[F, D] (rows of `w_in` when stacked)."""
        return self._w_up if self.w_in is None else self.w_in[self.ffn_width: 2 * self.ffn_width]

    @property
    def w_router(self) -> torch.Tensor:
        """[E, D] (rows of `w_in` when stacked)."""
        return self._w_router if self.w_in is None else self.w_in[2 * self.ffn_width:]

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
        """Expert mask [..., E] as the LTEModel's routing computes it (hard, or top-k).

        Top-k ranks the fp32 logits with the decode kernels' rule (`router_topk_mask_reference`: ties to
        the lower expert index), so prefill and decode pick the same experts; the LTEModel ranks the
        sigmoid of its logits, the same order except where bf16 rounding or sigmoid saturation ties them."""
        if self.topk:
            from ..kernels.reference import router_topk_mask_reference

            flat = router_topk_mask_reference(x.reshape(-1, x.shape[-1]), self.w_router, self.topk)  # [T, E]
            return flat.reshape(*x.shape[:-1], flat.shape[-1])
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
        if self.topk:
            return self._forward_topk(x, num_tokens)
        if self.use_kernels and num_tokens <= self.decode_max_tokens:
            from .. import kernels

            ffn = dict(w_gate=self.w_gate, b_up=self.b_up, b_down=self.b_down, expert_size=self.expert_size,
                       activation=self.activation)
            if self.fp8:  # one op: router (+ budget) and the kernels reading fp8 rows
                y, mask = kernels.routed_sparse_ffn(x, self.w_router, self.w_up, self.w_down_t, tau=self.tau,
                                                    budget=self.budget, scales=(self.s_up, self.s_gate, self.s_down),
                                                    **ffn)
            elif self.ffn_path == "dense" and self.w_in is not None and not self.record_mask:
                # every neuron, and the router, in one cuBLAS product; the mask applied in one launch
                y, mask = kernels.stacked_masked_dense_ffn(x, self.w_in, self.w_down_t, tau=self.tau,
                                                           b_down=self.b_down, expert_size=self.expert_size,
                                                           activation=self.activation), None
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
            if self.use_kernels and x.is_cuda and self.w_in is not None:
                from .. import kernels  # gate, up and router in one product, then one masked launch

                y = kernels.stacked_masked_dense_ffn(x, self.w_in, self.w_down_t, tau=self.tau, b_down=self.b_down,
                                                     expert_size=self.expert_size, activation=self.activation)
            elif self.use_kernels and x.is_cuda and not self.fp8:  # router, projections and one masked launch
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

    def _forward_topk(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Top-k routing. Decode: the mask from `router_topk_mask` (the router and top-k kernels on CUDA,
        no host sync), then the FFN kernels, or on the dense path cuBLAS (gate and up in one product where they
        are one `w_in`) and the masked activation; on the dense path with one `w_in`, no budget and no mask to
        record, the router rows join that product and the masked activation ranks the logits itself (two
        launches fewer; the logits in x's dtype). Prefill: `dense_mask` and the masked dense path."""
        if self.use_kernels and num_tokens <= self.decode_max_tokens:
            from .. import kernels

            if self.ffn_path == "dense" and self.w_in is not None and not self.budget and not self.record_mask:
                return kernels.stacked_masked_dense_ffn(x, self.w_in, self.w_down_t, topk=self.topk,
                                                        b_down=self.b_down, expert_size=self.expert_size,
                                                        activation=self.activation)
            mask = kernels.router_topk_mask(x, self.w_router, self.topk, budget=self.budget)  # [..., E] bool
            if self.ffn_path == "dense" and self.w_in is not None:  # gate and up in one cuBLAS product
                y = kernels.stacked_masked_dense_ffn(x, self.w_in, self.w_down_t, mask=mask, b_down=self.b_down,
                                                     expert_size=self.expert_size, activation=self.activation)
            else:
                ffn = dict(w_gate=self.w_gate, b_up=self.b_up, b_down=self.b_down, expert_size=self.expert_size,
                           activation=self.activation)
                run = kernels.masked_dense_ffn if self.ffn_path == "dense" else kernels.sparse_ffn
                y = run(x, mask, self.w_up, self.w_down_t, **ffn)
        else:
            mask = self.dense_mask(x)  # [..., E] bool
            y = self.masked_dense(x, mask)
        if self.record_mask:
            self.last_mask = mask.detach()
        return y

    def extra_repr(self) -> str:
        f, d = self.w_up.shape
        kind = "gated" if self.w_gate is not None else "plain"
        return (f"D={d}, F={f}, experts={self.num_experts}, S={self.expert_size}, tau={self.tau}, {kind}, "
                f"activation={self.activation}, biases={self.b_up is not None or self.b_down is not None}, "
                f"budget={self.budget}, topk={self.topk}, kernels={self.use_kernels}, path={self.ffn_path}"
                + (", weights=fp8" if self.fp8 else ""))
