"""Shared pieces of the GPU benchmarks: timing in CUDA graphs, the shape table, masks, deadlines.

Imported by the scripts beside it (``python benchmarks/NAME.py`` puts this folder on the path).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from lte.kernels.autotune import Deadline, log, random_ffn, routed_inputs  # noqa: F401 (re-exported)
from lte.kernels.autotune import fixed_masks as _fixed_masks
from lte.kernels.autotune import guarded as _guarded
from lte.kernels.autotune import time_graph as _time_graph

#: FFN shapes of the models users run (D model width, F FFN width); Mistral-7B's FFN is Llama-3-8B's.
#: "tiny" is for smoke runs on a CPU (LTE_BENCH_DEVICE=cpu TRITON_INTERPRET=1).
FFN_SHAPES: dict[str, tuple[int, int]] = {
    "llama2-7b": (4096, 11008),
    "llama3-8b": (4096, 14336),
    "qwen2.5-7b": (3584, 18944),
    "mistral-7b": (4096, 14336),
    "tiny": (64, 200),
}
EXPERT_SIZE = 32
#: Where the benchmarks run: CUDA, or the CPU for smoke runs of the scripts (Triton's interpreter;
#: timings there mean nothing).
DEVICE = os.environ.get("LTE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def guarded(errors: list[dict[str, Any]], what: str, fn, *args, **kwargs) -> Any:
    """Run fn; on an exception record it (with the traceback tail), print it and return None."""
    return _guarded(errors, what, fn, *args, **kwargs)


def time_graph(calls, replays: int = 10, runs: int = 3) -> float:
    """Median microseconds per call of ``calls`` (closures) captured together in one CUDA graph
    (off CUDA: one eager pass, for smoke runs)."""
    return _time_graph(calls, DEVICE == "cuda", replays, runs)


def copy_bandwidth() -> float | None:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written (None off CUDA)."""
    if DEVICE != "cuda":
        return None
    src = torch.empty(2**30, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    us = time_graph([lambda: dst.copy_(src)], replays=10)
    return 2 * 2**30 / (us * 1e-6) / 1e9


def environment() -> dict[str, Any]:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = os.environ.get("LTE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=False).stdout.strip() or None
        except OSError:
            commit = None
    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
        "sms": torch.cuda.get_device_properties(0).multi_processor_count if cuda else None,
        "torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "commit": commit, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "kernel_configs": os.environ.get("LTE_KERNEL_CONFIGS"),
    }


#: SDPA backends a decode benchmark may restrict attention to (`--sdpa`): "auto" leaves PyTorch's choice
SDPA_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math")


def use_sdpa_backend(name: str) -> None:
    """Let `F.scaled_dot_product_attention` run only the backend `name` in this process (dense and LTE alike;
    "auto": PyTorch's own order, cuDNN first on Hopper). Where that backend cannot take a call, SDPA raises."""
    if name == "auto":
        return
    switches = {"cudnn": torch.backends.cuda.enable_cudnn_sdp, "flash": torch.backends.cuda.enable_flash_sdp,
                "efficient": torch.backends.cuda.enable_mem_efficient_sdp, "math": torch.backends.cuda.enable_math_sdp}
    for backend, enable in switches.items():
        enable(backend == name)


#: BLAS libraries a decode benchmark may ask torch's matrix products to prefer (`--blas`): "auto" leaves torch's
BLAS_LIBRARIES = ("auto", "cublas", "cublaslt")


def use_blas_library(name: str) -> None:
    """Make torch's CUDA matrix products prefer cuBLAS or cuBLASLt in this process (dense and LTE alike; "auto":
    torch's default). The decode step's skinny projections run cuBLASLt's split-K kernels by default, each with its
    own reduction launch (docs/benchmarks.md, the B = 1 profile): the other library may pick other kernels."""
    if name == "auto":
        return
    if not torch.cuda.is_available():
        raise SystemExit(f"--blas {name} picks a CUDA library; this machine has no CUDA device (leave --blas auto)")
    torch.backends.cuda.preferred_blas_library(name)


def write_json(path: str | Path, data: Any) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(p)


# --------------------------------------------------------------------------- weights and masks
def ffn_weights(model_width: int, ffn_width: int, copies: int, dtype: torch.dtype, gen: torch.Generator):
    """``copies`` layers of random SwiGLU weights in both layouts (down [D, F] for cuBLAS, [F, D] for us)."""
    return random_ffn(model_width, ffn_width, copies, dtype, gen, DEVICE)


def fixed_masks(num_tokens: int, num_exp: int, off: float, gen: torch.Generator) -> torch.Tensor:
    """The same round(E * (1 - off)) experts on for every token: [B, E] bool."""
    return _fixed_masks(num_tokens, num_exp, off, gen, DEVICE)


def per_token_masks(num_tokens: int, num_exp: int, off: float, gen: torch.Generator) -> torch.Tensor:
    """Each token its own random round(E * (1 - off)) experts: the union grows like 1 - off^B."""
    n_on = round(num_exp * (1.0 - off))
    keys = torch.rand(num_tokens, num_exp, generator=gen, device=DEVICE)
    ranks = keys.argsort(dim=1).argsort(dim=1)
    return ranks < n_on


def ffn_bytes(model_width: int, ffn_width: int, active_fraction: float, num_tokens: int, elem: int = 2,
              router: bool = True, expert_size: int = EXPERT_SIZE, weight_elem: int | None = None,
              row_scale_bytes: int = 0) -> float:
    """Fewest bytes one FFN call must move: the active slabs of gate, up and down, the router, x and y.
    ``weight_elem``: bytes per FFN weight when it differs from ``elem`` (fp8: 1), with ``row_scale_bytes``
    per active row of each of the three matrices (fp8's fp32 scales: 4)."""
    num_exp = -(-ffn_width // expert_size)
    weights = 3 * active_fraction * ffn_width * (model_width * (weight_elem or elem) + row_scale_bytes)
    return weights + (num_exp * model_width * elem if router else 0) + 2 * num_tokens * model_width * elem
