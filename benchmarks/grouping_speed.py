"""Time expert grouping (balanced k-means) on LLaMA-2-7B-shaped FFN layers.

Features are random-normal [F, D] (default F=11008, D=4096, S=32: 344 experts), one fresh
tensor per layer; `--features clustered` plants structure instead (k-means then runs more
iterations, a less flattering timing). For each device it reports
- one layer: time with early stopping (the default behaviour), iterations run, and time with
  all n_iter iterations forced (an upper bound), each extrapolated x32;
- cluster quality (mean cosine to the expert centroid) of kmeans vs random vs contiguous;
- with --layers N (N > 1): the measured total over N layers.
Wall times on a shared CPU depend on what else runs; the JSON also keeps the process CPU time
(all threads) and the load average, so a busy-machine figure can be told from an idle one.
Writes one JSON per device to --out (grouping_speed_<device>_<features>.json) and prints a short table.

    PYTHONPATH=src python benchmarks/grouping_speed.py --device cpu --layers 32
    PYTHONPATH=src python benchmarks/grouping_speed.py --device cuda --layers 32 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from lte.conversion.grouping import balanced_kmeans, cluster_quality, expert_sizes, group_neurons


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="all", help="cpu, cuda or all (cpu, plus cuda when available)")
    parser.add_argument(
        "--layers", type=int, default=1, help="also time this many layers end to end (e.g. 32)"
    )
    parser.add_argument("--F", type=int, default=11008, help="FFN width")
    parser.add_argument("--D", type=int, default=4096, help="model width")
    parser.add_argument("--S", type=int, default=32, help="expert size")
    parser.add_argument(
        "--n-iter", type=int, default=15, help="k-means iterations (LTEConfig.grouping_iters default: 15)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--features",
        default="normal",
        choices=["normal", "clustered"],
        help="normal: i.i.d. random-normal rows; clustered: E random directions plus noise (k-means needs more iterations)",
    )
    parser.add_argument("--out", default="benchmarks/results", help="folder for the JSON files")
    return parser.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def layer_features(layer: int, F: int, D: int, E: int, kind: str, device: torch.device) -> torch.Tensor:
    """Features [F, D] for one layer, made on the device (not timed).

    normal: i.i.d. N(0, 1). clustered: each row is one of E random directions plus N(0, 1.5^2)
    noise, so there is structure to find and k-means runs more iterations.
    """
    gen = torch.Generator(device=device).manual_seed(1000 + layer)
    noise = torch.randn(F, D, generator=gen, device=device)
    if kind == "normal":
        return noise
    directions = torch.randn(E, D, generator=gen, device=device)  # [E, D]
    cluster = torch.randint(E, (F,), generator=gen, device=device)  # [F]
    return directions[cluster] + 1.5 * noise


def timed(fn, device: torch.device):
    """(result, seconds) of fn(), synchronising the device around it."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - start


def commit() -> str:
    """Short HEAD commit, with "+dirty" when the working tree has uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LTE_COMMIT", "unknown")


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": commit(),
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    else:
        info["device_name"] = cpu_name()
    return info


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_device(device: torch.device, args: argparse.Namespace) -> dict:
    F, D, S = args.F, args.D, args.S
    sizes = expert_sizes(F, S)
    result = {
        "device": device.type,
        "features": args.features,
        "F": F,
        "D": D,
        "S": S,
        "E": len(sizes),
        "n_iter": args.n_iter,
    }
    result.update(environment(device))

    # Warm-up on a small problem (CUDA context, cuBLAS handles, first-call allocations).
    group_neurons(torch.randn(512, 256, device=device), S, seed=args.seed)

    features = layer_features(0, F, D, len(sizes), args.features, device)
    gen = torch.Generator().manual_seed(args.seed)
    cpu_start = time.process_time()
    (perm, iterations), seconds = timed(lambda: balanced_kmeans(features, sizes, gen, args.n_iter), device)
    cpu_seconds = time.process_time() - cpu_start
    gen = torch.Generator().manual_seed(args.seed)
    (_, forced_iterations), forced_seconds = timed(
        lambda: balanced_kmeans(features, sizes, gen, args.n_iter, stop_early=False), device
    )
    quality = {
        "kmeans": cluster_quality(features, perm, sizes),
        "random": cluster_quality(features, group_neurons(features, S, "random", seed=args.seed), sizes),
        "contiguous": cluster_quality(features, group_neurons(features, S, "contiguous"), sizes),
    }
    result["one_layer"] = {
        "seconds": seconds,
        "iterations": iterations,
        "process_cpu_seconds": cpu_seconds,
        "x32_extrapolated_seconds": 32 * seconds,
        "forced_all_iterations_seconds": forced_seconds,
        "forced_iterations": forced_iterations,
        "forced_x32_extrapolated_seconds": 32 * forced_seconds,
        "quality_mean_cosine_to_centroid": quality,
    }

    if args.layers > 1:
        per_layer = []
        cpu_start = time.process_time()
        for layer in range(args.layers):
            features = layer_features(layer, F, D, len(sizes), args.features, device)
            _, seconds = timed(
                lambda f=features: group_neurons(f, S, "kmeans", seed=args.seed, n_iter=args.n_iter), device
            )
            per_layer.append(seconds)
            print(f"  {device.type} layer {layer:2d}: {seconds:.2f} s", flush=True)
        result["all_layers"] = {
            "layers": args.layers,
            "total_seconds": sum(per_layer),
            "process_cpu_seconds_incl_feature_generation": time.process_time() - cpu_start,
            "per_layer_seconds": per_layer,
        }
    result["load_average_at_end"] = os.getloadavg()
    return result


def main() -> None:
    args = parse_args()
    if args.device == "all":
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        devices = [args.device]
    if "cuda" in devices and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name in devices:
        device = torch.device(name)
        print(f"grouping speed on {name} ...", flush=True)
        result = run_device(device, args)
        path = out / f"grouping_speed_{name}_{args.features}.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        rows.append(result)
        print(f"  wrote {path}", flush=True)

    print()
    print(f"features: {args.features}, F={args.F}, D={args.D}, S={args.S}, n_iter={args.n_iter}")
    print(
        "device | 1 layer s (iters) | x32 est. s | forced 1 layer s | 32 layers s | quality kmeans/random/contig"
    )
    for r in rows:
        one = r["one_layer"]
        q = one["quality_mean_cosine_to_centroid"]
        total = r.get("all_layers", {}).get("total_seconds")
        total_text = f"{total:.1f} ({r['all_layers']['layers']} layers)" if total is not None else "-"
        print(
            f"{r['device_name']} | {one['seconds']:.2f} ({one['iterations']}) | {one['x32_extrapolated_seconds']:.1f}"
            f" | {one['forced_all_iterations_seconds']:.2f} | {total_text}"
            f" | {q['kmeans']:.4f}/{q['random']:.4f}/{q['contiguous']:.4f}"
        )


if __name__ == "__main__":
    main()
