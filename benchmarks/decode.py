"""Whole-decode-step latency: dense vs LTE sparse FFNs in the same static-cache, CUDA-graph loop.

Models of the shape table (`lte.serving.synthetic.SHAPES`: LLaMA-2-7B, Llama-3-8B, Qwen2.5-7B,
Mistral-7B, ...) with random bf16 weights are built on the GPU, converted by
`lte.get_lte_model(grouping="contiguous")` and readied with `prepare_for_inference`. Router masks
switch off a chosen fraction of experts through the real router path (see `lte.serving.synthetic`):
"fixed" (same experts for every token), "random" (each token its own) and "topk" (each token its
own, a fixed count: top-k routing), the last two also under a per-batch expert budget
(`--batch-budget`: at most that fraction of each layer's experts per step).
Dense = the same weights through `DenseMLP` (cuBLAS) in the same loop. Each point: median over
--runs runs of --new-tokens graph replays; "ideal" scales the dense step by the bytes the LTE step
must read (weights at the measured union + KV cache).

    PYTHONPATH=src python benchmarks/decode.py                       # LLaMA-2-7B shape, B = 1 4 8
    PYTHONPATH=src python benchmarks/decode.py --suite --budget 130  # the issue's shapes at B = 1 8 32
    PYTHONPATH=src python benchmarks/decode.py --model DIR           # + a real saved LTE model vs its dense self
    PYTHONPATH=src python benchmarks/decode.py --plot-only benchmarks/results/decode.json

Writes JSON (GPU, versions, commit, every point) to --out after every point and prints a short table.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
import traceback
from pathlib import Path
from typing import Any

import torch

import lte
import lte.kernels
from lte.routing.layers import budget_experts
from lte.serving.cli import load_for_serving
from lte.serving.decode import COMPILE_MODES, StaticDecoder, bench
from lte.serving.dense import dense_modules, swap_modules
from lte.serving.prepare import prepare_for_inference, sparse_modules
from lte.serving.synthetic import (
    pin_router_channel,
    random_llama,
    set_fixed_sparsity,
    set_random_sparsity,
    set_topk_sparsity,
)


def environment() -> dict[str, Any]:
    """Device and versions for the result file (`bench_util.environment` plus the decode-specific keys)."""
    from bench_util import environment as common

    env = common()
    env.update(device=env["gpu"] if torch.cuda.is_available() else platform.processor() or "cpu",
               kernels_available=lte.kernels.kernels_available())
    return env


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


#: Every finished point, also written to --out after each one (a crash keeps what was measured).
ROWS: list[dict[str, Any]] = []
ERRORS: list[dict[str, Any]] = []


class Deadline:
    """Seconds left of --budget (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.end = None if seconds is None else time.monotonic() + seconds

    def over(self, need: float = 0.0) -> bool:
        return self.end is not None and time.monotonic() + need > self.end


def _guard(what: str, fn, *args, **kwargs) -> Any:
    """Run one point; a failure is recorded in ERRORS and printed, and the benchmark goes on."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - one failed point must not stop the others
        ERRORS.append({"what": what, "error": f"{type(err).__name__}: {err}",
                       "traceback": traceback.format_exc(limit=6)[-3000:]})
        print(f"  FAILED {what}: {type(err).__name__}: {str(err)[:300]}", flush=True)
        return None


def _save(args: argparse.Namespace, env: dict[str, Any], checks: list[dict[str, Any]]) -> Path:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("plot_only", "env", "checks", "deadline")}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"env": env, "settings": settings, "kernel_checks": checks, "rows": ROWS,
                               "errors": ERRORS}, indent=2, default=str))
    tmp.replace(out)
    return out


def _decoder(model: torch.nn.Module, args: argparse.Namespace, batch: int) -> StaticDecoder:
    """One decoder (cache + captured graph) per model variant and batch size, reused across fixed masks."""
    _free()
    return StaticDecoder(model, batch, args.cache_len, compile=args.compile,
                         ffn_dispatch=args.ffn_dispatch if model_has_sparse(model) else "sparse",
                         gqa_decode=decode_attention(args))


def decode_attention(args: argparse.Namespace) -> bool | str:
    """StaticDecoder's `gqa_decode` from --gqa-decode / --decode-attention ("auto": True, the device's default)."""
    if not args.gqa_decode:
        return False
    return True if args.decode_attention == "auto" else args.decode_attention


def model_has_sparse(model: torch.nn.Module) -> bool:
    return bool(sparse_modules(model))


def _point(model: torch.nn.Module, args: argparse.Namespace, batch: int, decoder: StaticDecoder | None = None,
           **labels: Any) -> dict[str, Any]:
    """Time one setting; a new decoder unless one is given (router weights may change under a captured graph)."""
    decoder = decoder or _decoder(model, args, batch)
    res = bench(model, batch_size=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                cache_len=args.cache_len, runs=args.runs, decoder=decoder)
    row = {**labels, **res, "ffn_dispatch": decoder.ffn_dispatch}
    if labels.get("variant") != "dense":
        row["weights"] = args.weights  # how the LTE FFN matrices were stored (dense is the model's dtype)
    if decoder.ffn_paths:  # "auto": how many FFNs the decision put on the masked dense path
        row["dense_path_ffns"] = sum(c.path == "dense" for c in decoder.ffn_paths)
        row["ffns"] = len(decoder.ffn_paths)
    dense = next((r for r in ROWS if r.get("variant") == "dense" and r["batch_size"] == batch
                  and r.get("shape") == labels.get("shape") and r.get("model_dir") == labels.get("model_dir")), None)
    if dense is not None:  # the step time the bytes allow: dense time x (bytes read by this step / by dense)
        read = res["weight_bytes_per_step"] + res["kv_bytes_per_step"]
        row["ideal_ms"] = dense["ms_per_step"] * read / (dense["weight_bytes_per_step"] + dense["kv_bytes_per_step"])
        row["vs_dense"] = res["ms_per_step"] / dense["ms_per_step"] - 1
    ROWS.append(row)
    _save(args, args.env, args.checks)
    frac = res["ffn_active_fraction"]
    print(f"  {labels.get('shape', '')} {labels.get('variant'):>5} {labels.get('mask', '-'):>6} "
          f"s={labels.get('sparsity', 0):.2f} B={batch}: {res['ms_per_step']:.3f} ms/step, "
          f"{res['tokens_per_s']:.0f} tok/s, active={'-' if frac is None else f'{frac:.3f}'}", flush=True)
    return row


@torch.no_grad()
def check_kernel_path(model: torch.nn.Module, sparsity: float) -> dict[str, Any]:
    """One decode-shaped forward with kernels vs the masked dense path: max |logit diff| and argmax agreement."""
    set_fixed_sparsity(model, sparsity)
    ids = torch.randint(0, model.config.vocab_size, (4, 1), device=model.device)
    mods = sparse_modules(model)
    outs = []
    for use in (True, False):
        for m in mods:
            m.use_kernels = use
        outs.append(model(input_ids=ids).logits.float())
    for m in mods:
        m.use_kernels = True
    diff = (outs[0] - outs[1]).abs().max().item()
    agree = (outs[0].argmax(-1) == outs[1].argmax(-1)).float().mean().item()
    return {"sparsity": sparsity, "max_abs_logit_diff": diff, "argmax_agreement": agree,
            "logit_scale": outs[1].abs().max().item()}


def _set_budget(model: torch.nn.Module, fraction: float) -> None:
    """Per-batch expert budget of every SparseMLP: round(fraction x its experts) (0: no budget).

    A budget runs on the sparse path: modules that `--ffn-dispatch auto` put on the dense path go back
    to the sparse one first (the next capture chooses again, keeping budgeted modules sparse)."""
    for m in sparse_modules(model):
        if fraction > 0:
            m.ffn_path = "sparse"
        m.budget = 0 if fraction <= 0 else budget_experts(fraction, m.num_experts)


def synthetic_table(args: argparse.Namespace, shape: str) -> None:
    """Dense vs LTE (fixed and random masks, random under a batch budget) on one random-weight shape."""
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    hf = random_llama(shape, args.device, dtype)
    pin_router_channel(hf)
    lmodel = lte.get_lte_model(hf, lte.LTEConfig(grouping="contiguous"), progress=False)
    dense = dense_modules(lmodel)
    model = prepare_for_inference(lmodel, weights=args.weights)
    del lmodel
    _free()
    print(f"built {shape} in {time.time() - t0:.1f} s", flush=True)
    checks = [_guard(f"check {shape} {s}", check_kernel_path, model, s) for s in (0.0, 0.5, 0.9)]
    args.checks.extend({"shape": shape, **c} for c in checks if c)
    print("kernel vs masked dense:", checks, flush=True)
    for batch in args.batch_sizes:
        if args.deadline.over(10):
            ROWS.append({"shape": shape, "batch_size": batch, "variant": "skipped", "why": "time budget"})
            continue
        sparse = swap_modules(model, dense)
        _guard(f"dense {shape} B={batch}", _point, model, args, batch, variant="dense", mask="-", sparsity=0.0,
               shape=shape)
        swap_modules(model, sparse)
        _set_budget(model, 0.0)
        # fixed masks: one graph for all (with --ffn-dispatch auto one per point: the choice is made at capture)
        dec = None if args.ffn_dispatch == "auto" else _guard(f"decoder {shape} B={batch}", _decoder, model, args,
                                                                batch)
        for s in args.sparsities:
            if (dec is None and args.ffn_dispatch != "auto") or args.deadline.over(3):
                break
            set_fixed_sparsity(model, s)
            _guard(f"lte fixed {shape} B={batch} s={s}", _point, model, args, batch, decoder=dec, variant="lte",
                   mask="fixed", sparsity=s, shape=shape)
        del dec
        per_token = [("random", set_random_sparsity)] if "random" in args.mask_modes else []
        if "topk" in args.mask_modes:  # top-k routing (a top-k stage 2): router_topk_mask, then the FFN kernels
            per_token.append(("topk", set_topk_sparsity))
        for mask, set_sparsity in per_token:  # each token its own mask: a new decoder (graph) per point
            for s in [s for s in args.random_sparsities if 0 < s < 1]:
                if args.deadline.over(4):
                    break
                set_sparsity(model, s)
                _guard(f"lte {mask} {shape} B={batch} s={s}", _point, model, args, batch, variant="lte",
                       mask=mask, sparsity=s, shape=shape)
                if args.batch_budget and batch > 1 and not args.deadline.over(4):
                    _set_budget(model, args.batch_budget)
                    _guard(f"lte {mask}+budget {shape} B={batch} s={s}", _point, model, args, batch,
                           variant="lte_budget", mask=mask, sparsity=s, budget_fraction=args.batch_budget,
                           shape=shape)
                    _set_budget(model, 0.0)
        set_topk_sparsity(model, None)
    del model, dense
    _free()


def real_model_rows(args: argparse.Namespace) -> None:
    """A saved LTE model (its learned sparsity) vs its dense self, same loop."""
    dtype = getattr(torch, args.dtype)
    lmodel, is_lte = load_for_serving(args.model, torch.device(args.device), dtype)
    if not is_lte:
        raise SystemExit(f"--model {args.model} is not an LTE model directory")
    dense = dense_modules(lmodel)
    model = prepare_for_inference(lmodel, weights=args.weights)
    for batch in args.batch_sizes:
        sparse = swap_modules(model, dense)
        _point(model, args, batch, variant="dense", mask="-", model_dir=str(args.model))
        swap_modules(model, sparse)
        _point(model, args, batch, variant="lte", mask="learned", model_dir=str(args.model))


def print_table(rows: list[dict[str, Any]]) -> None:
    """ms/step, change vs dense at the same shape and batch size, and the bytes' ideal."""
    rows = [r for r in rows if "ms_per_step" in r]
    print(f"\n{'model':>14} {'B':>2} {'variant':>10} {'mask':>7} {'sparsity':>8} {'active':>6} "
          f"{'ms/step':>8} {'vs dense':>8} {'ideal':>7} {'tok/s':>7} {'GB/s':>6} {'dense-path':>10}")
    for r in rows:
        change = f"{100 * r['vs_dense']:+.1f}%" if r.get("vs_dense") is not None else "-"
        ideal = f"{r['ideal_ms']:.3f}" if r.get("ideal_ms") is not None else "-"
        frac = r["ffn_active_fraction"]
        name = Path(r["model_dir"]).name if r.get("model_dir") else r.get("shape", "synthetic")
        print(f"{name[:14]:>14} {r['batch_size']:>2} {r['variant']:>10} {r['mask']:>7} "
              f"{r.get('sparsity', float('nan')):>8.2f} {'-' if frac is None else f'{frac:.3f}':>6} "
              f"{r['ms_per_step']:>8.3f} {change:>8} {ideal:>7} {r['tokens_per_s']:>7.0f} {r['gb_per_s']:>6.0f} "
              f"{(str(r['dense_path_ffns']) + '/' + str(r['ffns'])) if 'ffns' in r else '-':>10}")


def plot(result_file: Path) -> Path:
    """Decode-step latency vs sparsity (fixed masks) per batch size, with the dense and ideal lines."""
    from lte.evaluation.plots import new_figure, save_figure

    data = json.loads(result_file.read_text())
    rows = [r for r in data["rows"] if not r.get("model_dir") and "ms_per_step" in r]
    first = rows[0].get("shape") if rows else None
    rows = [r for r in rows if r.get("shape") == first]
    fig = new_figure(6.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for batch in sorted({r["batch_size"] for r in rows}):
        dense = next((r for r in rows if r["variant"] == "dense" and r["batch_size"] == batch), None)
        if dense is None:
            continue
        fixed = sorted((r for r in rows if r["mask"] == "fixed" and r["batch_size"] == batch),
                       key=lambda r: r["sparsity"])
        line, = ax.plot([r["sparsity"] for r in fixed], [r["ms_per_step"] for r in fixed], "o-", label=f"LTE B={batch}")
        ax.axhline(dense["ms_per_step"], color=line.get_color(), ls="--", lw=1, label=f"dense B={batch}")
        # ideal: dense time scaled by the bytes actually read (FFN bytes at the active fraction)
        ideal = [dense["ms_per_step"] * (r["weight_bytes_per_step"] + r["kv_bytes_per_step"])
                 / (dense["weight_bytes_per_step"] + dense["kv_bytes_per_step"]) for r in fixed]
        ax.plot([r["sparsity"] for r in fixed], ideal, ":", color=line.get_color(), label=f"ideal B={batch}")
    ax.set_xlabel("fraction of FFN experts off")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"decode step, {first}, {data['env']['device']}, bf16", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return Path(save_figure(fig, result_file.with_suffix(".png")))


def main() -> None:
    from bench_util import BLAS_LIBRARIES, SDPA_BACKENDS, use_blas_library, use_sdpa_backend

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=None, help="shapes of lte.serving.synthetic.SHAPES")
    p.add_argument("--shape", default="llama2-7b", help="one shape (when --shapes is not given)")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.9])
    p.add_argument("--random-sparsities", type=float, nargs="+", default=None,
                   help="sparsities of the random-mask points (default: --sparsities)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--mask-modes", nargs="+", default=["fixed", "random"], choices=["fixed", "random", "topk"])
    p.add_argument("--batch-budget", type=float, default=0.0,
                   help="also time random (and topk) masks under a per-batch budget of this fraction of the experts")
    p.add_argument("--budget", type=float, default=None, help="seconds; points not started by then are skipped")
    p.add_argument("--suite", action="store_true",
                   help="the issue's table: llama3-8b, llama2-7b, qwen2.5-7b, mistral-7b at B = 1 8 32, "
                        "fixed 0/50/70/90%%, random 50%% with and without a 50%% batch budget, short runs")
    p.add_argument("--ffn-dispatch", default="auto", choices=["sparse", "auto"],
                   help="LTE decode path: the sparse kernels everywhere, or auto (per FFN, the masked dense path "
                        "where the measured union is too full; lte.serving.dispatch)")
    p.add_argument("--weights", default="native", choices=["native", "fp8"],
                   help="LTE FFN matrices as the model's dtype or fp8 (e4m3, row scales); dense stays bf16 cuBLAS")
    p.add_argument("--gqa-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="decode steps with lte.serving.attention's grouped-query attention (each KV head read "
                        "once), dense and LTE alike (default; --no-gqa-decode: transformers' SDPA)")
    p.add_argument("--decode-attention", default="auto", choices=["auto", "sdpa", "triton", "flex"],
                   help="with --gqa-decode, how the grouped heads attend, dense and LTE alike: auto (triton on CUDA), "
                        "sdpa (PyTorch's SDPA over the grouped heads), triton (lte.kernels.decode_attention, a "
                        "split-KV kernel) or flex (flex_attention's split-KV decoding kernel; needs --compile)")
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sdpa", default="auto", choices=SDPA_BACKENDS,
                   help="restrict scaled_dot_product_attention to one backend (dense and LTE alike; auto: PyTorch's "
                        "choice, cuDNN first on Hopper)")
    p.add_argument("--blas", default="auto", choices=BLAS_LIBRARIES,
                   help="the BLAS library torch's matrix products prefer (dense and LTE alike; auto: torch's default)")
    p.add_argument("--compile", nargs="?", const="default", default=False, choices=COMPILE_MODES,
                   help="torch.compile the decode-step forward before graph capture (fuses HF's small kernels); "
                        "an Inductor mode may follow (default: Inductor's default)")
    p.add_argument("--model", default=None, help="a saved LTE model directory to time against its dense self")
    p.add_argument("--skip-synthetic", action="store_true")
    p.add_argument("--out", default="benchmarks/results/decode.json")
    p.add_argument("--plot-only", default=None, help="only draw the plot of an existing result file")
    args = p.parse_args()
    use_sdpa_backend(args.sdpa)
    use_blas_library(args.blas)
    if args.plot_only:
        print(plot(Path(args.plot_only)))
        return
    if args.suite:
        args.shapes = args.shapes or ["llama3-8b", "llama2-7b", "qwen2.5-7b", "mistral-7b"]
        args.batch_sizes = [1, 8, 32]
        args.random_sparsities = args.random_sparsities or [0.5]
        args.batch_budget = args.batch_budget or 0.5
        args.new_tokens, args.runs = min(args.new_tokens, 32), min(args.runs, 3)
    args.shapes = args.shapes or [args.shape]
    args.random_sparsities = args.random_sparsities or args.sparsities
    args.deadline = Deadline(args.budget)
    env = environment()
    print(env, flush=True)
    args.env, args.checks = env, []
    if not args.skip_synthetic:
        for shape in args.shapes:
            if args.deadline.over(20):
                ROWS.append({"shape": shape, "variant": "skipped", "why": "time budget"})
                continue
            _guard(f"shape {shape}", synthetic_table, args, shape)
            _free()
            _save(args, env, args.checks)
    if args.model:
        _guard("real model", real_model_rows, args)
    out = _save(args, env, args.checks)
    print_table(ROWS)
    if ERRORS:
        print(f"{len(ERRORS)} points failed: " + "; ".join(e["what"] for e in ERRORS))
    print(f"\nwrote {out}")
    _guard("plot", plot, out)


if __name__ == "__main__":
    main()
