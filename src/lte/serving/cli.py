"""`lte generate`, `lte bench` and `lte tune`: the fast decode path from the command line.

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
    """Register `generate`, `bench` and `tune` on an argparse sub-parser collection."""
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

    tune = subparsers.add_parser(
        "tune", help="tune the decode kernels' tiles for this GPU and your model's FFN shape (saved for later runs)",
        description="Time the sparse FFN kernels' candidate tiles on this GPU (random weights of the given shapes) and "
                    "save the best per FFN shape and batch size in a table every later run reads (default: "
                    "kernel_configs.json in lte's cache folder, $LTE_CACHE or ~/.cache/lte).")
    what = tune.add_argument_group("which FFN shapes (at least one; each may repeat)")
    what.add_argument("--model", action="append", default=[], help="a model directory (HF or LTE save): its FFN shape "
                      "and, for an LTE save, its expert size")
    what.add_argument("--shape", action="append", default=[], help="a named shape: llama2-7b, llama3-8b, qwen2.5-7b, "
                      "mistral-7b, smollm2-135m or tiny")
    what.add_argument("--ffn", action="append", default=[], nargs=2, type=int, metavar=("D", "F"),
                      help="model width D and FFN width F")
    tune.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64],
                      help="batch sizes (tokens per decode step) to tune, most important first (1..64)")
    tune.add_argument("--budget", type=float, default=120.0, help="seconds; points not started by then are skipped")
    tune.add_argument("--expert-size", type=int, default=None,
                      help="neurons per expert (default: the LTE model's, else 32)")
    tune.add_argument("--out", default=None, help="table file to merge the tuned rows into (default: the user table "
                      "the kernels read)")
    tune.add_argument("--device", default=None, help="cuda (default); cpu only with TRITON_INTERPRET=1 (a smoke "
                      "run through Triton's interpreter: its times mean nothing)")
    tune.set_defaults(func=run_tune)


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


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise LTEError(f"cannot read {path} as JSON ({err}); give the shape with --ffn D F instead") from None
    if not isinstance(data, dict):
        raise LTEError(f"{path} holds no JSON object; give the shape with --ffn D F instead")
    return data


def _model_ffn(directory: str) -> tuple[tuple[int, int], int | None]:
    """(D, F) of a model directory's FFN and, for an LTE save, its expert size; read from its JSON files."""
    d = Path(directory)
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise LTEError(f"--model {directory}: no config.json there (a Hugging Face model directory or an LTE save); "
                       f"or give the shape with --ffn D F")
    cfg = _json_file(cfg_file)
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    width = next((cfg[k] for k in ("hidden_size", "n_embd", "d_model") if isinstance(cfg.get(k), int)), None)
    ffn = next((cfg[k] for k in ("intermediate_size", "n_inner", "ffn_dim") if isinstance(cfg.get(k), int)), None)
    expert_size = None
    meta_file = d / "lte_config.json"
    if meta_file.is_file():
        meta = _json_file(meta_file)
        expert_size = meta.get("lte", {}).get("expert_size")
        widths = set(meta.get("base", {}).get("ffn_widths") or [])
        if len(widths) == 1:
            ffn = widths.pop()
    if ffn is None and width is not None and cfg.get("model_type") == "gpt2":
        ffn = 4 * width  # GPT-2's n_inner: None means 4 x n_embd
    if width is None or ffn is None:
        raise LTEError(f"--model {directory}: cannot read one model width and FFN width from its config.json "
                       f"(model_type {cfg.get('model_type')!r}); give the shape with --ffn D F")
    return (int(width), int(ffn)), expert_size


def run_tune(args: argparse.Namespace) -> int:
    """Handler of `lte tune`: tune the kernels' tiles on this GPU and merge the rows into the table file."""
    import os

    import torch

    from ..kernels.tuning import merge_table, shape_key, user_table_path
    from .synthetic import SHAPES

    shapes: list[tuple[int, int]] = []
    expert_size = args.expert_size
    for directory in args.model:
        shape, size = _model_ffn(directory)
        shapes.append(shape)
        if expert_size is None and size is not None:
            expert_size = int(size)
    for name in args.shape:
        if name not in SHAPES:
            raise LTEError(f"--shape {name}: unknown shape; choose one of {', '.join(SHAPES)} or give --ffn D F")
        shapes.append((SHAPES[name]["hidden_size"], SHAPES[name]["intermediate_size"]))
    shapes += [tuple(pair) for pair in args.ffn]
    if not shapes:
        raise LTEError("lte tune needs at least one FFN shape: --model DIR, --shape NAME or --ffn D F")
    if any(d < 1 or f < 1 for d, f in shapes):
        raise LTEError(f"FFN widths must be positive, got {shapes}")
    if any(not 1 <= b <= 64 for b in args.tokens):
        raise LTEError(f"--tokens: the decode kernels take 1 to 64 tokens, got {args.tokens}")
    expert_size = expert_size or 32
    if expert_size < 1:
        raise LTEError(f"--expert-size must be positive, got {expert_size}")
    device = args.device or "cuda"
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise LTEError("--device cpu runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1 "
                           "(a smoke run; its times mean nothing)")
    elif not device.startswith("cuda") or not torch.cuda.is_available():
        raise LTEError("lte tune times the kernels on the CUDA GPU that will serve them; this machine has none "
                       "(the kernels use the shipped tables and shape-aware defaults without tuning)")
    from ..kernels import kernels_available

    if device != "cpu" and not kernels_available():
        raise LTEError("lte tune needs Triton's kernels, which are not usable here (pip install triton)")
    from ..kernels.autotune import tune

    if args.budget <= 0:
        raise LTEError(f"--budget must be positive seconds, got {args.budget}")
    out = Path(args.out) if args.out else user_table_path()
    if out.is_dir():
        raise LTEError(f"--out {out} is a folder; name the table file (e.g. {out / 'kernel_configs.json'})")
    if out.exists():  # checked before any timing, so a broken table cannot lose the tuned rows afterwards
        try:
            merge_table(out, {})
        except ValueError as err:
            raise LTEError(f"{err} (or pass --out NEW_FILE)") from None
    shapes = list(dict.fromkeys(shapes))
    result = tune(shapes, args.tokens, args.budget, expert_size, device=device,
                  on_point=lambda r: merge_table(out, r["table"]))
    merge_table(out, result["table"])
    gpu = result["gpu_key"]
    rows = result["table"][gpu]
    for d, f in shapes:
        tuned = sorted(int(b) for b in rows.get(shape_key(d, f, expert_size), {}))
        print(f"{gpu} D={d} F={f} ({expert_size}-neuron experts): tuned at B = {tuned or 'none'}")
    if result["skipped"]:
        print(f"not tuned for lack of time (raise --budget): {len(result['skipped'])} point(s)")
    if result["errors"]:
        print(f"{len(result['errors'])} candidate(s) failed and were left out (the first: {result['errors'][0]['what']}: "
              f"{result['errors'][0]['error'][:200]})")
    used = out.resolve() == user_table_path().resolve()
    print(f"table: {out}" + ("" if used else f" (not the default table: set LTE_KERNEL_CONFIGS={out} to use it)"))
    return 0 if any(rows.values()) else 1
