"""What fp8 FFN weights cost in quality: perplexity of a served LTE model with native and fp8 weights.

A trained LTE stage folder is loaded twice, readied by ``prepare_for_inference`` with
``weights="native"`` and with ``weights="fp8"`` (the FFN matrices in e4m3 with one fp32 scale per
row; routers, attention, embeddings unchanged), and scored on the same held-out text: the last
``--holdout`` fraction of ``--data`` (the split ``lte run`` evaluates on), sliding windows. On a CPU
the served model runs the kernels' PyTorch reference (the fp8 weights dequantized), the function
the GPU kernels compute.

    PYTHONPATH=src python benchmarks/fp8_quality.py --model runs/demo/stage2 --data builtin --out fp8.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

import lte
from lte.data import load_text_lm
from lte.evaluation.perplexity import perplexity
from lte.loading import load_tokenizer
from lte.serving import prepare_for_inference


def served(model_path: str, weights: str, dtype: torch.dtype):
    """The stage folder as a served HF model (hard routing), FFN weights stored as ``weights``."""
    lmodel = lte.LTEModel.from_pretrained(model_path).set_routing("hard").eval()
    lmodel.base_model.to(dtype)
    return prepare_for_inference(lmodel, weights=weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", required=True, help="trained LTE stage folder(s)")
    parser.add_argument("--data", required=True, help="the text the model was trained on (its tail is held out)")
    parser.add_argument("--holdout", type=float, default=0.1, help="fraction of the text held out (lte run's holdout)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    rows = []
    for path in args.model:
        tokenizer = load_tokenizer(path)
        _, held_out = load_text_lm(args.data, tokenizer, block_size=args.max_length, split_ratio=args.holdout)
        row = {"model": path}
        for weights in ("native", "fp8"):
            t0 = time.perf_counter()
            result = perplexity(served(path, weights, dtype), held_out, max_length=args.max_length,
                                stride=args.max_length, max_tokens=args.max_tokens, progress=False)
            row[weights] = result["perplexity"]
            row["tokens"] = result["tokens"]
            row[f"{weights}_seconds"] = time.perf_counter() - t0
        row["fp8_over_native"] = row["fp8"] / row["native"]
        rows.append(row)
        print(f"{path}: perplexity native {row['native']:.4f}, fp8 {row['fp8']:.4f} "
              f"({row['fp8_over_native']:.4f}x) on {row['tokens']} held-out tokens")
    out = {"benchmark": "fp8 FFN weights, served LTE model", "data": args.data, "holdout": args.holdout,
           "max_length": args.max_length, "dtype": args.dtype, "rows": rows, "torch": torch.__version__,
           "device": platform.processor() or "cpu"}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
