"""`lte generate` and `lte bench`: the fast decode path from the command line.

`lte.cli.main` calls `add_serving_commands(subparsers)`; each command stores its handler in
`func` (called with the parsed arguments, returns an exit code).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import LTEError
from .decode import COMPILE_MODES
from .sparse_mlp import WEIGHT_FORMATS

_DTYPES = ("auto", "bfloat16", "float16", "float32")


def add_serving_commands(subparsers: Any) -> None:
    """Register `generate` and `bench` on an argparse sub-parser collection."""
    gen = subparsers.add_parser("generate", help="generate text with the static-cache, CUDA-graph decode loop")
    gen.add_argument("--model", required=True, help="an LTE model directory (save_pretrained) or a plain HF model")
    gen.add_argument("--prompt", required=True, action="append",
                     help="prompt text; repeat for a batch (left padded together)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--dense", action="store_true", help="run the FFNs dense (ignore the routers)")
    gen.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    _budget_arg(gen)
    _device_args(gen)
    gen.set_defaults(func=run_generate)

    bench = subparsers.add_parser("bench", help="time decode steps (tokens/s, ms/step, GB/s)")
    src = bench.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="an LTE model directory (sparse and dense are both timed) or a plain HF model")
    src.add_argument("--shape", help="a random-weight LLaMA-family shape: llama2-7b, llama3-8b, qwen2.5-7b, "
                                     "mistral-7b, smollm2-135m or tiny")
    bench.add_argument("--sparsity", type=float, default=0.5,
                       help="with --shape: fraction of experts switched off (same set for every token)")
    bench.add_argument("--batch-size", type=int, default=1)
    bench.add_argument("--cache-len", type=int, default=512)
    bench.add_argument("--prompt-len", type=int, default=16)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--runs", type=int, default=5)
    bench.add_argument("--dense", action="store_true", help="time only the dense model")
    bench.add_argument("--json", default=None, help="also write the results to this JSON file")
    _budget_arg(bench)
    _device_args(bench)
    bench.set_defaults(func=run_bench)


def _budget_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expert-budget", type=int, default=0,
                        help="per-batch expert budget: at most this many experts per FFN and decode step for the "
                             "whole batch (the largest summed router scores); 0 = none")
    parser.add_argument("--weights", default="native", choices=WEIGHT_FORMATS,
                        help="how the LTE FFN matrices are stored for serving: native (the model's dtype) or fp8 "
                             "(e4m3, one scale per row: half the bytes of bf16; about 1%% perplexity on the demo; it saves "
                             "memory, but its kernels are slower than bf16's so far: docs/benchmarks.md)")


def _device_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=_DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--no-graph", action="store_true", help="run decode steps eagerly (no CUDA graph)")
    parser.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES, metavar="MODE",
                        help="torch.compile the decode step before graph capture (faster steps, slow first step); "
                             "MODE max-autotune-no-cudagraphs lets Inductor time its own kernels for the projections "
                             "(faster steps again on an H100, a compile of minutes: docs/benchmarks.md)")
    parser.add_argument("--gqa-decode", action=argparse.BooleanOptionalAction, default=True,
                        help="decode steps of a grouped-query model read each KV head once (lte.serving.attention) "
                             "instead of transformers' repeated copies (default; --no-gqa-decode: transformers' SDPA)")
    parser.add_argument("--decode-attention", default="auto", choices=("auto", "sdpa", "triton", "flex"),
                        help="with --gqa-decode, how the grouped heads attend: auto (the default: triton on CUDA GPUs "
                             "from Ampere on, sdpa elsewhere), sdpa (PyTorch's SDPA over the grouped heads), triton "
                             "(lte.kernels.decode_attention, a split-KV kernel) or flex (flex_attention; needs --compile "
                             "and a cache of a multiple of 128)")


def _decode_attention(args: argparse.Namespace) -> bool | str:
    """StaticDecoder's `gqa_decode` from --gqa-decode / --decode-attention ("auto": True, the device's default)."""
    if not args.gqa_decode:
        return False
    return True if args.decode_attention == "auto" else args.decode_attention


def _resolve(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    return device, dtype


def load_for_serving(directory: str, device: Any, dtype: Any) -> tuple[Any, bool]:
    """Load an LTE model directory (-> LTEModel in the routing it was trained for) or a plain HF causal LM with
    `lte.load_model`; returns (model, is_lte)."""
    from ..loading import load_model, model_kind

    d = Path(directory)
    if not d.is_dir():
        raise LTEError(f"--model {directory}: no such directory")
    is_lte = model_kind(d) == "lte"
    model = load_model(d, routing="served" if is_lte else None, dtype=dtype).to(device)
    return model.eval(), is_lte


def _prepared(model: Any, is_lte: bool, dense: bool, budget: int = 0, weights: str = "native") -> Any:
    from .dense import prepare_dense
    from .prepare import prepare_for_inference

    if dense or not is_lte:
        if weights != "native":
            raise LTEError(f"--weights {weights} applies to the LTE FFNs; this run serves the model dense "
                           f"({'--dense' if dense else 'not an LTE model'})")
        return prepare_dense(model)
    return prepare_for_inference(model, budget=budget, weights=weights)


def run_generate(args: argparse.Namespace) -> int:
    """Handler of `lte generate`."""
    from ..loading import load_tokenizer
    from .decode import generate

    device, dtype = _resolve(args)
    tokenizer = load_tokenizer(args.tokenizer or args.model, model=args.model)  # refused before the model loads
    model, is_lte = load_for_serving(args.model, device, dtype)
    hf_model = _prepared(model, is_lte, args.dense, args.expert_budget, args.weights)
    outs = generate(hf_model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                    use_graph=False if args.no_graph else None, compile=args.compile, gqa_decode=_decode_attention(args))
    for prompt, text in zip(args.prompt, outs):
        print(f"{prompt}{text}")
    return 0


def _bench_one(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from .decode import bench

    return bench(model, batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                 cache_len=args.cache_len, runs=args.runs, use_graph=False if args.no_graph else None,
                 compile=args.compile, gqa_decode=_decode_attention(args))


def run_bench(args: argparse.Namespace) -> int:
    """Handler of `lte bench`: prints one JSON line per variant (dense, lte)."""
    from .dense import dense_modules, swap_modules
    from .prepare import prepare_for_inference

    device, dtype = _resolve(args)
    if args.shape:
        import lte

        from .synthetic import pin_router_channel, random_llama, set_fixed_sparsity

        hf = random_llama(args.shape, device, dtype)
        pin_router_channel(hf)
        lmodel = lte.get_lte_model(hf, lte.LTEConfig(grouping="contiguous"), progress=False)
        is_lte = True
    else:
        lmodel, is_lte = load_for_serving(args.model, device, dtype)
    results = []
    dense = dense_modules(lmodel)
    if is_lte and not args.dense:
        hf_model = prepare_for_inference(lmodel, budget=args.expert_budget, weights=args.weights)
        if args.shape:
            set_fixed_sparsity(hf_model, args.sparsity)
        sparse = swap_modules(hf_model, dense)
        results.append({"variant": "dense", **_bench_one(hf_model, args)})
        swap_modules(hf_model, sparse)
        results.append({"variant": "lte", **_bench_one(hf_model, args)})
    else:
        hf_model = lmodel.base_model if is_lte else lmodel
        swap_modules(hf_model, dense)
        results.append({"variant": "dense", **_bench_one(hf_model, args)})
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "ms_per_step_runs"}))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0
