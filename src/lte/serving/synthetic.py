"""Random-weight LLaMA-shaped models and router settings with a chosen sparsity, for benchmarks.

Two ways to switch off a chosen fraction s of each layer's E experts, both through the real router
path (`sigmoid(x Wr^T) > tau` computed on the GPU inside the captured step):

- "fixed": every token uses the same known set of experts. `pin_router_channel` makes residual
  channel c always positive (embedding column c = 1, and no attention / FFN output writes into
  channel c), so the FFN input x (RMSNorm of the residual, weight 1) has x_c > 0 for every token.
  Router row e is then `+1 * e_c` for a kept expert and `-1 * e_c` for an off one: with tau = 0.5,
  expert e passes exactly when its sign is +. The off set is a seeded random subset of round(s * E)
  experts per layer. The union over a batch is then the same set (LTE's best case for B > 1).
- "random": every token draws its own experts. Router rows ~ N(0, 1/D) (zero on the pinned
  channel, which all tokens share), and each layer's tau is calibrated on random tokens so that a
  fraction s of (token, expert) pairs is off. Tokens pick their experts nearly independently, so the
  union over a batch grows like 1 - s^B (the hard case for batched decoding).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import LTEError
from .prepare import sparse_modules

#: LLaMA-family shapes (transformers config fields; "arch" picks the config class, default llama).
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "qwen2.5-7b": dict(arch="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064),
    "mistral-7b": dict(arch="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, sliding_window=None),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128),
}


_ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
          "mistral": ("MistralConfig", "MistralForCausalLM")}


def random_llama(shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0, max_positions: int = 4096) -> nn.Module:
    """A LLaMA-family causal LM of a named shape (`SHAPES`) with random weights, built directly on
    `device` in `dtype` (fast on a GPU)."""
    import transformers

    if shape not in SHAPES:
        raise LTEError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    fields = dict(SHAPES[shape])
    config_name, model_name = _ARCHS[fields.pop("arch", "llama")]
    config = getattr(transformers, config_name)(**fields, max_position_embeddings=max_positions)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = getattr(transformers, model_name)(config)
    finally:
        torch.set_default_dtype(old)
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def pin_router_channel(model: nn.Module, channel: int = 0) -> None:
    """Make residual channel `channel` of a plain LLaMA-family model always positive (see module doc).

    Call before conversion. Zeroes row `channel` of every attention output and FFN down projection
    (the bytes read per step do not change) and sets embedding column `channel` to 1.
    """
    emb = model.get_input_embeddings().weight
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is emb:
        raise LTEError("pin_router_channel needs untied embeddings (the LM head would see the pinned column)")
    emb[:, channel] = 1.0
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight[channel].zero_()
        layer.mlp.down_proj.weight[channel].zero_()


def _off_count(sparsity: float, num_experts: int) -> int:
    if not 0.0 <= sparsity <= 1.0:
        raise LTEError(f"sparsity must lie in [0, 1], got {sparsity}")
    return round(sparsity * num_experts)


@torch.no_grad()
def set_fixed_sparsity(model: nn.Module, sparsity: float, channel: int = 0, seed: int = 0) -> None:
    """Router weights of every SparseMLP so that the same round(s * E) experts are off for every token."""
    for i, m in enumerate(sparse_modules(model)):
        num_exp = m.num_experts
        gen = torch.Generator().manual_seed(seed + i)
        off = torch.randperm(num_exp, generator=gen)[: _off_count(sparsity, num_exp)]
        sign = torch.ones(num_exp)
        sign[off] = -1.0
        m.w_router.zero_()
        m.w_router[:, channel] = sign.to(m.w_router.device, m.w_router.dtype)
        m.tau = 0.5


@torch.no_grad()
def set_random_sparsity(model: nn.Module, sparsity: float, seed: int = 0, calib_tokens: int = 256,
                        channel: int | None = 0) -> None:
    """Random router rows ~ N(0, 1/D), each layer's tau calibrated so a fraction s of (token, expert) pairs is off.

    Calibration: one forward of `calib_tokens` random token ids; the FFN inputs of every SparseMLP are
    captured with a forward hook and tau = sigmoid(the s-quantile of their router logits).
    """
    if not 0.0 < sparsity < 1.0:
        raise LTEError(f"random sparsity must lie strictly in (0, 1), got {sparsity}; use set_fixed_sparsity")
    mods = sparse_modules(model)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, m in enumerate(mods)]
    for i, m in enumerate(mods):
        gen = torch.Generator().manual_seed(seed + i)
        num_exp, width = m.w_router.shape
        rows = torch.randn(num_exp, width, generator=gen) / math.sqrt(width)
        if channel is not None:
            rows[:, channel] = 0.0  # the pinned channel is common to all tokens
        m.w_router.copy_(rows.to(m.w_router.device, m.w_router.dtype))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, calib_tokens), generator=gen).to(mods[0].w_router.device)
    try:
        model(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    for i, m in enumerate(mods):
        x = inputs[i].reshape(-1, m.w_router.shape[1])  # [T, D]
        logits = (x.float() @ m.w_router.float().t()).reshape(-1)  # [T*E]
        cut = float(torch.quantile(logits[:1_000_000], sparsity))
        m.tau = 1.0 / (1.0 + math.exp(-cut))


@torch.no_grad()
def set_topk_sparsity(model: nn.Module, sparsity: float | None, seed: int = 0) -> None:
    """Top-k routing at a sparsity: random router rows (`set_random_sparsity`), then every SparseMLP keeps its
    E - round(s x E) highest-scoring experts for each token (`SparseMLP.topk`); None: back to threshold routing."""
    mods = sparse_modules(model)
    if sparsity is None:
        for m in mods:
            m.topk = 0
        return
    set_random_sparsity(model, sparsity, seed=seed)
    for m in mods:
        m.topk = max(1, m.num_experts - _off_count(sparsity, m.num_experts))

