"""Does the down projection's memory layout cost the masked dense path? (issue 11)

LTE keeps the down projection transposed, ``w_down_t [F, D]`` (each expert's rows contiguous, for the
sparse kernels), so its masked dense path (the dispatch's choice at a full union, and prefill) runs
``h @ w_down_t`` where dense cuBLAS runs ``F.linear(h, w_down [D, F])``. This times both, and the whole
FFN both ways (dense HF-style SwiGLU against ``lte.kernels.masked_dense_ffn``), and ``SparseMLP`` on
its masked dense path as served (router included; above 64 tokens, prefill, its PyTorch path), at T
tokens.

    PYTHONPATH=src python benchmarks/down_layout.py --shapes llama2-7b llama3-8b --tokens 1 8 32 64 512
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F_

SHAPES = {"llama2-7b": (4096, 11008), "llama3-8b": (4096, 14336), "qwen2.5-7b": (3584, 18944), "tiny": (64, 256)}


def _time_us(fn, reps: int) -> float:
    """Mean time of `reps` calls in microseconds (CUDA events; wall clock on a CPU)."""
    for _ in range(3):
        fn()
    if torch.cuda.is_available():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000.0 / reps
    import time

    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) * 1e6 / reps


def _weights(d: int, f: int, dev: str, dtype: torch.dtype, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random SwiGLU FFN weights of one shape, the down projection in both layouts, and a router."""
    w = {name: torch.randn(f, d, device=dev, dtype=dtype, generator=g) * d**-0.5 for name in ("w_gate", "w_up")}
    w["w_down"] = torch.randn(d, f, device=dev, dtype=dtype, generator=g) * f**-0.5  # [D, F]
    w["w_down_t"] = w["w_down"].t().contiguous()  # [F, D]
    w["w_router"] = torch.randn(-(-f // 32), d, device=dev, dtype=dtype, generator=g) * d**-0.5  # [E, D]
    return w


def _row(w: dict[str, torch.Tensor], t: int, reps: int, g: torch.Generator) -> dict[str, float]:
    """Microseconds of each variant at T = t tokens."""
    from lte import kernels
    from lte.serving.sparse_mlp import SparseMLP

    f, d = w["w_up"].shape
    dev, dtype = w["w_up"].device, w["w_up"].dtype
    x = torch.randn(t, d, device=dev, dtype=dtype, generator=g)  # [T, D]
    h = torch.randn(t, f, device=dev, dtype=dtype, generator=g)  # [T, F]
    mask = torch.ones(t, w["w_router"].shape[0], device=dev, dtype=torch.bool)  # [T, E]
    served = SparseMLP(w["w_gate"], w["w_up"], w["w_down_t"], w["w_router"], 0.5, 32, "silu",
                       use_kernels=dev.type == "cuda")
    served.ffn_path = "dense"

    def dense_ffn() -> torch.Tensor:
        return F_.linear(F_.silu(F_.linear(x, w["w_gate"])) * F_.linear(x, w["w_up"]), w["w_down"])

    return {
        "down_linear_DF_us": _time_us(lambda: F_.linear(h, w["w_down"]), reps),
        "down_mm_FD_us": _time_us(lambda: torch.mm(h, w["w_down_t"]), reps),
        "ffn_dense_us": _time_us(dense_ffn, reps),
        "ffn_masked_dense_us": _time_us(
            lambda: kernels.masked_dense_ffn(x, mask, w["w_up"], w["w_down_t"], w_gate=w["w_gate"]), reps),
        "sparsemlp_dense_path_us": _time_us(lambda: served(x), reps),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["llama2-7b", "llama3-8b"], choices=sorted(SHAPES))
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 8, 32, 64, 512])
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    rows = []
    for shape in args.shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        w = _weights(*SHAPES[shape], dev, dtype, g)
        for t in args.tokens:
            row = {"shape": shape, "T": t, "device": device_name, **_row(w, t, args.reps, g)}
            rows.append(row)
            print(f"{shape:>10} T={t:<4} down [D,F] linear {row['down_linear_DF_us']:8.1f} us | "
                  f"down [F,D] mm {row['down_mm_FD_us']:8.1f} us | FFN dense {row['ffn_dense_us']:8.1f} us | "
                  f"masked dense {row['ffn_masked_dense_us']:8.1f} us | "
                  f"SparseMLP {row['sparsemlp_dense_path_us']:8.1f} us", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"rows": rows, "torch": torch.__version__}, fh, indent=1)


if __name__ == "__main__":
    main()
