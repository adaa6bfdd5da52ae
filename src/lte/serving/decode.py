"""A gpt-fast style decode loop: static KV cache, eager prefill, one decode step in a CUDA graph.

`StaticDecoder` owns a transformers `StaticCache` and static input buffers (token ids, positions,
an optional padding mask). The decode step (model forward + sampling + writing the next token
into the input buffer) is captured once in a `torch.cuda.CUDAGraph` and replayed: no host sync
inside the loop; the KV cache advances its own position counter on the GPU. Without CUDA the same
step runs eagerly (CPU, tests).

Dimensions: B batch, P prompt length (after left padding), L cache length, V vocabulary.
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Any

import torch
from torch import nn

from ..errors import LTEError
from .attention import FLEX_BLOCK, FLEX_MIN_HEAD_DIM, default_kind, head_dim, use_gqa_decode_attention
from .dispatch import choose_ffn_paths, set_ffn_path, union_fraction
from .prepare import sparse_modules
from .sparse_mlp import SparseMLP

#: Inductor modes the decoder may compile with (`StaticDecoder(compile=...)`): those that leave the CUDA
#: graph to the decoder. "max-autotune-no-cudagraphs" also times Triton GEMM templates against cuBLAS.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


# --------------------------------------------------------------------------- transformers compat
def _forward_params(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def cache_kwarg(model: nn.Module) -> str:
    """Name of the cache argument of the model's forward: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = _forward_params(model)
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise LTEError(f"{type(model).__name__}.forward takes no KV cache argument; it cannot be decoded with a cache")


def make_static_cache(model: nn.Module, batch_size: int, cache_len: int) -> Any:
    """A `StaticCache` for `model`, across transformers versions (extra arguments only where named)."""
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    first = next(iter(model.parameters()))
    kwargs: dict[str, Any] = {"config": model.config, "max_cache_len": cache_len}
    optional = {"max_batch_size": batch_size, "batch_size": batch_size, "device": first.device, "dtype": first.dtype}
    kwargs.update({k: v for k, v in optional.items() if k in params})
    return StaticCache(**kwargs)


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if not layers:
        raise LTEError("this transformers StaticCache has no per-layer objects; transformers >= 4.56 is required")
    return list(layers)


# --------------------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Next token [B] from logits [B, V]: greedy at temperature 0, else exponential-race sampling.

    argmax(p / q) with q ~ Exp(1) draws from p without a host sync (CUDA-graph safe).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    race = torch.empty_like(probs).exponential_(1.0)
    return (probs / race).argmax(dim=-1)


# --------------------------------------------------------------------------- the decoder
class StaticDecoder:
    """Prefill + graph-replayed decode steps for one HF causal LM at a fixed batch size and cache length.

    Args:
        model: a HF causal LM (e.g. after `prepare_for_inference` / `prepare_dense`), in eval mode.
        batch_size: B. cache_len: L, the most tokens (prompt + generated) a sequence may hold.
        temperature: 0 = greedy.
        use_graph: capture the decode step in a CUDA graph (default: when the model is on CUDA).
        compile: run the decode-step forward through `torch.compile` (fuses the many small norm /
            rotary / elementwise kernels of the HF layers; compiles on the first decode, which
            takes a while for big models), then capture it in the CUDA graph as usual. True is
            Inductor's default mode; a mode name from `COMPILE_MODES` picks another (the decoder
            captures its own graph, so only modes without Inductor's CUDA graphs).
        ffn_dispatch: the decode path of the served FFNs (`SparseMLP`): "auto" (the default: before
            each capture, one eager step records every FFN's union of masks and
            `lte.serving.dispatch.choose_ffn_paths` puts the FFNs whose union is too full for skipping
            to pay on the masked dense path, the others on the kernels), "sparse" (the kernels
            everywhere) or "dense" (the masked dense path everywhere). Without a CUDA graph "auto"
            leaves each FFN's path as it is.
        gqa_decode: switch a grouped-query model running "sdpa" to `lte.serving.attention`'s decode
            attention, which reads each KV head once instead of transformers' repeated copies
            (the model keeps it after the decoder; prefill is unchanged). On by default (True: the kind
            `lte.serving.attention.default_kind` gives the model's device, "triton" on CUDA GPUs from Ampere
            on, "sdpa" elsewhere):
            on an H100 the grouped SDPA path cut the dense Llama-3-8B-shaped step by 23% at B = 8 and 52% at
            B = 32, the Triton kernel 3-5% more (docs/benchmarks.md). "sdpa": PyTorch's SDPA over the grouped
            heads; "flex": the same through `flex_attention` (`lte.serving.attention.FLEX_NAME`; needs
            `compile`, which turns it into a split-KV decoding kernel, and a `cache_len` of a multiple of 128);
            "triton": through `lte.kernels.decode_attention`, a split-KV Triton kernel (compiled or not); named
            outright it serves models with one query head per KV head too (True leaves those on SDPA).
    """

    def __init__(self, model: nn.Module, batch_size: int, cache_len: int, temperature: float = 0.0,
                 use_graph: bool | None = None, compile: bool | str = False, ffn_dispatch: str = "auto",
                 gqa_decode: bool | str = True) -> None:
        if gqa_decode not in (True, False, "sdpa", "flex", "triton"):
            raise LTEError(f"gqa_decode must be True, False, 'sdpa', 'flex' or 'triton', got {gqa_decode!r}")
        if gqa_decode == "flex" and not compile:
            raise LTEError("gqa_decode='flex' needs compile: uncompiled, flex_attention runs a slow reference")
        if gqa_decode == "flex" and cache_len % FLEX_BLOCK:
            raise LTEError(f"gqa_decode='flex' takes caches of a multiple of {FLEX_BLOCK} slots, got cache_len "
                           f"{cache_len}: round it up (e.g. {-(-cache_len // FLEX_BLOCK) * FLEX_BLOCK})")
        if gqa_decode == "flex" and (d := head_dim(_text_config(model))) < FLEX_MIN_HEAD_DIM:
            raise LTEError(f"gqa_decode='flex' needs heads of at least {FLEX_MIN_HEAD_DIM} dims (flex_attention's GPU "
                           f"kernels), this model's have {d}: use gqa_decode=True")
        if compile is not False and compile is not True and compile not in COMPILE_MODES:
            raise LTEError(f"compile must be True, False or one of {COMPILE_MODES}, got {compile!r}")
        if batch_size < 1 or cache_len < 2:
            raise LTEError(f"batch_size must be >= 1 and cache_len >= 2, got {batch_size} and {cache_len}")
        if ffn_dispatch not in ("sparse", "dense", "auto"):
            raise LTEError(f"ffn_dispatch must be 'sparse', 'dense' or 'auto', got {ffn_dispatch!r}")
        self.ffn_dispatch = ffn_dispatch
        self.ffn_paths: list = []  # the last "auto" decision (lte.serving.dispatch.PathChoice per FFN)
        if ffn_dispatch != "auto":
            set_ffn_path(model, ffn_dispatch)
        self.model = model.eval()
        first = next(iter(model.parameters()))
        self.device = first.device
        kind = default_kind(self.device) if gqa_decode is True else gqa_decode
        # named outright, the Triton kernel serves models with one query head per KV head too (not timed yet there)
        self.gqa_decode = (use_gqa_decode_attention(model, kind, grouped_only=gqa_decode is True or kind != "triton")
                           if kind else False)
        self.batch_size, self.cache_len, self.temperature = batch_size, cache_len, temperature
        self.use_graph = (self.device.type == "cuda") if use_graph is None else use_graph
        if self.use_graph and self.device.type != "cuda":
            raise LTEError("use_graph=True needs the model on a CUDA device")
        self._cache_kw = cache_kwarg(model)
        self.compiled = compile if isinstance(compile, str) else ("default" if compile else False)
        self._decode_forward = (torch.compile(model.forward, dynamic=False, mode=self.compiled) if compile
                                else model.forward)
        self._keep_kw = "logits_to_keep" if "logits_to_keep" in _forward_params(model) else None
        self.cache = make_static_cache(model, batch_size, cache_len)
        dev, b = self.device, batch_size
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=dev)  # [B, 1] next input token
        self.pos = torch.zeros(b, 1, dtype=torch.long, device=dev)  # [B, 1] its position id
        self.pad_mask = torch.ones(b, cache_len, dtype=torch.long, device=dev)  # [B, L] 0 = left padding
        self.step = torch.zeros((), dtype=torch.long, device=dev)  # index of the next generated token
        self.tokens = torch.zeros(b, cache_len, dtype=torch.long, device=dev)  # [B, L] generated tokens
        self.use_mask = False  # whether the current prompt has padding (the mask is passed to the model)
        self.prompt_len = 0
        self.generated = 0  # tokens generated since the last prefill (host-side count)
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_mask: bool | None = None
        self._snapshot: list[torch.Tensor] | None = None

    # ---------------------------------------------------------------- state
    def _state(self) -> list[torch.Tensor]:
        """Every device tensor a decode step advances (restorable with `_restore`)."""
        return [layer.cumulative_length for layer in _cache_layers(self.cache)] + [self.ids, self.pos, self.step]

    def _save(self) -> tuple[list[torch.Tensor], int]:
        return [t.clone() for t in self._state()], self.generated

    def _restore(self, saved: tuple[list[torch.Tensor], int]) -> None:
        tensors, self.generated = saved
        for t, s in zip(self._state(), tensors):
            t.copy_(s)

    def _reset_cache(self) -> None:
        """Empty the cache in place (addresses stay, so a captured graph stays valid)."""
        for layer in _cache_layers(self.cache):
            if getattr(layer, "is_initialized", False):
                layer.cumulative_length.zero_()

    # ---------------------------------------------------------------- forward pieces
    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, keep_last: bool,
                 forward: Any = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {self._cache_kw: self.cache, "use_cache": True}
        if keep_last and self._keep_kw:
            kwargs[self._keep_kw] = 1
        out = (forward or self.model)(input_ids=ids, position_ids=pos, attention_mask=mask, **kwargs)
        return out.logits[:, -1, :]  # [B, V]

    def _decode_step(self, eager: bool = False) -> None:
        """One token for every sequence; reads and writes only static device buffers."""
        mask = self.pad_mask if self.use_mask else None
        forward = self.model if eager else self._decode_forward
        logits = self._forward(self.ids, self.pos, mask, keep_last=False, forward=forward)  # [B, V]
        nxt = sample(logits, self.temperature)  # [B]
        self.tokens.index_copy_(1, self.step.view(1), nxt.view(-1, 1))
        self.ids.copy_(nxt.view(-1, 1))
        self.pos.add_(1)
        self.step.add_(1)

    # ---------------------------------------------------------------- public
    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Run the prompt ids [B, P] (left padded; mask [B, P] with 0 at padding) and sample the first token."""
        b, p = input_ids.shape
        if b != self.batch_size:
            raise LTEError(f"this decoder was built for batch size {self.batch_size}, got {b} prompts")
        if p >= self.cache_len:
            raise LTEError(f"prompt of {p} tokens does not fit a cache of {self.cache_len}; raise cache_len")
        ids = input_ids.to(self.device)
        am = torch.ones_like(ids) if attention_mask is None else attention_mask.to(self.device).long()
        self.use_mask = bool((am == 0).any())
        pos = (am.cumsum(-1) - 1).clamp(min=0)  # [B, P] left padding -> positions start at 0 per sequence
        self.pad_mask.fill_(1)
        self.pad_mask[:, :p].copy_(am)
        self._reset_cache()
        logits = self._forward(ids, pos, self.pad_mask if self.use_mask else None, keep_last=True)
        nxt = sample(logits, self.temperature)  # [B]
        self.tokens.zero_()
        self.tokens[:, 0] = nxt
        self.ids.copy_(nxt.view(-1, 1))
        self.pos.copy_(pos[:, -1:] + 1)
        self.step.fill_(1)
        self.prompt_len, self.generated = p, 1

    def record_masks(self) -> list[nn.Module]:
        """One eager decode step with every router module (`sparse_modules`) keeping its mask in
        `last_mask`; returns those modules. The decoder's state is left as it was."""
        modules = sparse_modules(self.model)
        if not modules:
            return []
        saved = self._save()
        for m in modules:
            m.record_mask = True
        try:
            self._decode_step(eager=True)
        finally:
            for m in modules:
                m.record_mask = False
            self._restore(saved)
        return modules

    def choose_ffn_paths(self) -> list:
        """The per-FFN path choice (`lte.serving.dispatch.choose_ffn_paths`) from the masks of one
        eager step on the sparse path (`record_masks`)."""
        set_ffn_path(self.model, "sparse")
        modules = self.record_masks()
        if not any(isinstance(m, SparseMLP) for m in modules):
            return []
        self.ffn_paths = choose_ffn_paths(self.model, self.batch_size)
        for m in modules:
            m.last_mask = None
        return self.ffn_paths

    def _capture(self) -> None:
        """Warm up on a side stream (Triton compiles here), then capture one decode step."""
        saved = self._save()
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if self.ffn_dispatch == "auto":
                self.choose_ffn_paths()
            for _ in range(2):
                self._decode_step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._decode_step()
        except RuntimeError as err:
            raise LTEError(
                f"CUDA-graph capture of the decode step failed ({err}). Some op in the model syncs the host; "
                "run with use_graph=False (eager) to find it."
            ) from err
        self._restore(saved)  # capture does not run kernels, but keep the state exact
        self._graph, self._graph_mask = graph, self.use_mask

    @torch.no_grad()
    def decode(self, steps: int) -> None:
        """Generate `steps` more tokens for every sequence (after `prefill`)."""
        if self.prompt_len == 0:
            raise LTEError("call prefill(input_ids) before decode")
        if steps <= 0:
            return
        if self.prompt_len + self.generated + steps > self.cache_len:
            raise LTEError(f"{self.prompt_len} prompt + {self.generated + steps} generated tokens exceed the cache "
                           f"of {self.cache_len}; raise cache_len")
        self.generated += steps
        if not self.use_graph:
            for _ in range(steps):
                self._decode_step()
            return
        if self._graph is None or self._graph_mask != self.use_mask:
            self._capture()
        for _ in range(steps):
            self._graph.replay()

    @torch.no_grad()
    def generate_ids(self, input_ids: torch.Tensor, max_new_tokens: int,
                     attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """New token ids [B, max_new_tokens] (no stop at EOS: trim on the host)."""
        if max_new_tokens < 1:
            raise LTEError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.prefill(input_ids, attention_mask)
        self.decode(max_new_tokens - 1)
        return self.tokens[:, :max_new_tokens].clone()


# --------------------------------------------------------------------------- user API
def _check_model(model: Any) -> nn.Module:
    from ..model import LTEModel

    if isinstance(model, LTEModel):
        raise LTEError(
            "generate/bench take a prepared HF model: call lte.serving.prepare_for_inference(lmodel) "
            "(sparse kernels) or lte.serving.prepare_dense(lmodel) first"
        )
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise LTEError(f"expected a Hugging Face causal LM, got {type(model).__name__}")
    return model


def _trim(ids: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in eos:
            return ids[:i]
    return ids


def _eos_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(t) for t in src)
    return ids


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: str | list[str], max_new_tokens: int = 64,
             temperature: float = 0.0, cache_len: int | None = None, use_graph: bool | None = None,
             decoder: StaticDecoder | None = None, compile: bool | str = False,
             gqa_decode: bool | str = True) -> str | list[str]:
    """Generate text for one prompt (returns str) or several (list, left padded into one batch).

    Greedy at temperature 0. Generation runs `max_new_tokens` steps and cuts each text at its first
    end-of-sequence token. `cache_len` defaults to the longest prompt + max_new_tokens (+1).
    `gqa_decode`: `StaticDecoder`'s option of the same name.
    """
    model = _check_model(model)
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if not texts:
        raise LTEError("no prompt given")
    old_side = getattr(tokenizer, "padding_side", "right")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = old_side
    input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    need = input_ids.shape[1] + max_new_tokens + 1
    if decoder is None:
        decoder = StaticDecoder(model, len(texts), max(cache_len or need, need), temperature, use_graph, compile,
                                gqa_decode=gqa_decode)
    new = decoder.generate_ids(input_ids, max_new_tokens, attention_mask).cpu().tolist()
    eos = _eos_ids(model, tokenizer)
    outs = [tokenizer.decode(_trim(row, eos), skip_special_tokens=True) for row in new]
    return outs[0] if single else outs


def weight_bytes(model: nn.Module, ffn_active_fraction: float | None = None) -> dict[str, float]:
    """Bytes of weights one decode step reads: all parameters except the embedding table (B rows only).

    With `ffn_active_fraction`, the served FFNs' weights count at that fraction (routers in full).
    """
    from .prepare import ffn_weights

    emb = model.get_input_embeddings().weight
    out_emb = model.get_output_embeddings()
    tied = out_emb is not None and out_emb.weight.data_ptr() == emb.data_ptr()
    ffn_bytes = in_params = 0  # in_params: the FFN bytes held by parameters (or rows of one: SparseMLP.w_in)
    for m in model.modules():
        buffers = {id(b) for b in m.buffers(recurse=False)}  # fp8 row scales
        for w in ffn_weights(m):
            ffn_bytes += w.numel() * w.element_size()
            in_params += 0 if id(w) in buffers else w.numel() * w.element_size()
    other = sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb or tied) - in_params
    frac = 1.0 if ffn_active_fraction is None else ffn_active_fraction
    return {"ffn_bytes": float(ffn_bytes), "other_bytes": float(other), "read_bytes": other + frac * ffn_bytes}


def _text_config(model: nn.Module) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _kv_bytes(model: nn.Module, batch_size: int, cache_len: int) -> float:
    """Bytes of KV cache one decode step reads (attention spans the whole static cache)."""
    cfg = _text_config(model)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    elem = next(iter(model.parameters())).element_size()
    return 2.0 * cfg.num_hidden_layers * batch_size * heads * cache_len * head_dim(cfg) * elem


@torch.no_grad()
def measure_active_fraction(decoder: StaticDecoder) -> float | None:
    """Fraction of SparseMLP neurons the batch's union mask computes in one eager decode step.

    None for models without SparseMLP. Runs one step eagerly and restores the decoder state.
    """
    mods = decoder.record_masks()
    if not mods:
        return None
    active = total = 0.0
    for m in mods:
        ffn_width = m.w_up.shape[0]
        active += union_fraction(m.last_mask, ffn_width, m.expert_size) * ffn_width  # neurons in the union
        total += ffn_width
        m.last_mask = None
    return active / total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bench(model: nn.Module, batch_size: int = 1, prompt_len: int = 16, new_tokens: int = 128,
          cache_len: int = 512, runs: int = 5, use_graph: bool | None = None, seed: int = 0,
          decoder: StaticDecoder | None = None, compile: bool | str = False, gqa_decode: bool | str = True) -> dict[str, Any]:
    """Time the decode loop on random prompts: median over `runs` runs of `new_tokens` steps each.

    Returns tokens_per_s (B * steps / time), ms_per_step, gb_per_s (weights read per step / time;
    kv_gb_per_s adds the KV cache reads), ffn_active_fraction (union over the batch, SparseMLP
    models only), peak_memory_gb (CUDA), and the settings.
    """
    model = _check_model(model)
    if prompt_len + new_tokens + 1 > cache_len:
        raise LTEError(f"prompt_len {prompt_len} + new_tokens {new_tokens} must stay below cache_len {cache_len}")
    dec = decoder or StaticDecoder(model, batch_size, cache_len, 0.0, use_graph, compile, gqa_decode=gqa_decode)
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else model.config.vocab_size
    prompt = torch.randint(0, vocab, (batch_size, prompt_len), generator=gen)
    dec.prefill(prompt)
    dec.decode(1)  # capture + one step
    dec.prefill(prompt)
    saved = dec._save()
    active = measure_active_fraction(dec)
    times = []
    for _ in range(runs):
        dec._restore(saved)
        _sync(dec.device)
        if dec.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dec.decode(new_tokens)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dec.decode(new_tokens)
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times) / new_tokens
    wb = weight_bytes(model, active)
    kv = _kv_bytes(model, batch_size, cache_len)
    peak = torch.cuda.max_memory_allocated(dec.device) / 1e9 if dec.device.type == "cuda" else None
    return {
        "batch_size": batch_size, "prompt_len": prompt_len, "new_tokens": new_tokens, "cache_len": cache_len,
        "runs": runs, "cuda_graph": dec.use_graph, "compiled": dec.compiled,
        "attention": getattr(model.config, "_attn_implementation", None),
        "ms_per_step": sec * 1e3, "ms_per_step_runs": [t / new_tokens * 1e3 for t in times],
        "tokens_per_s": batch_size / sec,
        "weight_bytes_per_step": wb["read_bytes"], "gb_per_s": wb["read_bytes"] / sec / 1e9,
        "kv_bytes_per_step": kv, "kv_gb_per_s": (wb["read_bytes"] + kv) / sec / 1e9,
        "ffn_active_fraction": active, "peak_memory_gb": peak,
    }
