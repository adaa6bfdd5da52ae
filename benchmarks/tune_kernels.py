"""Tune the decode kernels' tiles per FFN shape and token count on this GPU, within a time budget.

    PYTHONPATH=src python benchmarks/tune_kernels.py --budget 90 --out $OUT/kernel_configs.json

The tuning itself is `lte.kernels.autotune` (what `lte tune` runs; its docstring says what is timed);
this script names shapes from the benchmarks' table and writes the whole result (environment, table,
every timing, errors) after every point. ``LTE_KERNEL_CONFIGS=that.json`` (or ``lte.kernels.load_table``)
makes the kernels use it, and ``lte.kernels.tuning.render_shipped`` turns its table into the shipped defaults.
"""

from __future__ import annotations

import argparse
import os

from bench_util import DEVICE, EXPERT_SIZE, FFN_SHAPES, copy_bandwidth, environment, guarded, log, write_json

from lte.kernels.autotune import tune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=90.0, help="seconds; points not started by then are skipped")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "benchmarks/results"),
                                                      "kernel_configs.json"))
    parser.add_argument("--shapes", nargs="+", default=["llama3-8b", "llama2-7b", "qwen2.5-7b"],
                        choices=sorted(FFN_SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--gb", type=float, default=1.2, help="GB of weight copies per point (>> L2)")
    parser.add_argument("--expert-size", type=int, default=EXPERT_SIZE,
                        help="neurons per expert; rows for sizes other than 32 go to their own 'DxF/sS' keys")
    args = parser.parse_args()
    env = environment()
    errors: list = []
    copy_gbps = guarded(errors, "copy bandwidth", copy_bandwidth)

    def save(result: dict) -> None:
        write_json(args.out, {"env": env, "copy_GBps": copy_gbps, **result, "errors": errors + result["errors"]})

    shapes = list(dict.fromkeys(FFN_SHAPES[name] for name in args.shapes))  # Mistral-7B's FFN is Llama-3-8B's
    result = tune(shapes, args.tokens, args.budget, args.expert_size, args.gb, DEVICE, on_point=save)
    save(result)
    gpu = result["gpu_key"]
    log(f"wrote {args.out}: {sum(len(v) for v in result['table'][gpu].values())} tuned rows, "
        f"{len(errors) + len(result['errors'])} errors, {len(result['skipped'])} skipped")


if __name__ == "__main__":
    main()
