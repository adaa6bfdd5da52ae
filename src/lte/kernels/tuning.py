"""Tile settings of the decode kernels per GPU, FFN shape and token count: the config table.

A table maps ``gpu -> "DxF" -> "B" -> settings`` (a JSON object of the same nesting), where
``gpu`` is a short key made from the device name (``gpu_key``: "h100", "h200", ...), ``DxF`` the
FFN shape (model width x FFN width; ``DxF/sS`` for experts of S neurons other than the paper's
32, whose best tiles differ; they fall back to the 32-neuron rows) and ``B`` the largest token
count a row was tuned for. A
call with B tokens uses the row of the smallest tuned ``B' >= B`` (the tiles of a larger batch
also fit a smaller one), or the largest one when B is above every row.

Where the settings come from, first match wins:
1. tables added with ``load_table(path)`` or named by the environment variable
   ``LTE_KERNEL_CONFIGS`` (a JSON file, e.g. the one ``benchmarks/tune_kernels.py`` writes);
2. the user's table, ``user_table_path()`` (``kernel_configs.json`` in lte's cache folder, ``$LTE_CACHE`` or
   ``~/.cache/lte``), which ``lte tune`` writes for the GPU at hand;
3. ``SHIPPED`` below (tuned on the machines named there);
4. ``heuristic_config``: shape-aware defaults that need no table.

This module imports neither triton nor any model code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS_ENV = "LTE_KERNEL_CONFIGS"
TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # the token counts a table is tuned at


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch settings of the decode launches (router, gate/up, down, finish).

    The gate/up kernel works through the list of (union expert, row block) items; with
    ``in_progs_per_sm > 0`` it runs ``SMs x in_progs_per_sm`` programs that each take a
    contiguous share of the items (a persistent grid), with 0 one program per possible item
    (programs past the active items return at once).
    """

    in_block_f: int = 2  # neuron rows per work item of the gate/up kernel (at most the expert size)
    in_block_k: int = 1024  # model-width chunk per loop step
    in_warps: int = 4
    in_stages: int = 3
    in_progs_per_sm: int = 0  # 0: one program per possible item; > 0: persistent grid of SMs x this
    out_block_d: int = 256  # output columns per program of the down projection
    out_split: int = 64  # slices of the union's experts (partial sums to combine)
    out_warps: int = 4
    out_stages: int = 3
    out_chunk: int = 0  # expert ids the down kernel finds per step (0: automatic)
    out_group: int = 0  # experts per down-kernel step, power-of-two experts only (0: automatic, 32 rows a step)
    out_prefetch: bool = False  # down kernel: read the first expert's rows before waiting for h (one expert a step)
    stream_weights: bool = False  # gate/up and down weight loads "evict_first" from L2: each is read once
    active_list: bool = False  # one more launch turns the union into a list of expert ids: no prefix sum a program
    finish_block: int = 128
    router_block_e: int = 2  # experts per router program
    router_block_k: int = 0  # model-width chunk of the router (0: all of D in one step when it fits)
    router_warps: int = 8
    router_pdl: bool = False  # launch the router behind the previous kernel (it reads its weights early)
    pdl: bool = True  # programmatic dependent launch between our own launches (Hopper+)
    use_dot: bool | None = None  # None: tl.dot for B > 1 token, broadcast multiply-adds for 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KernelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"unknown kernel setting(s) {unknown}; valid: {sorted(fields)}")
        return cls(**data)


def gpu_key(device_name: str) -> str:
    """Short table key of a device name: 'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    name = device_name.lower()
    for key in ("h200", "h100", "h800", "h20", "gh200", "b200", "a100", "l40s", "l4"):
        if key in name.split() or f" {key}" in f" {name}":
            return key
    return "-".join(name.replace("nvidia", "").split())


#: The expert size (neurons) of the plain ``DxF`` table keys: the paper's, and the library's default.
TABLE_EXPERT_SIZE = 32


def shape_key(model_width: int, ffn_width: int, expert_size: int = TABLE_EXPERT_SIZE) -> str:
    """Table key of an FFN shape: "4096x14336" for 32-neuron experts, "4096x14336/s16" for 16."""
    base = f"{model_width}x{ffn_width}"
    return base if expert_size == TABLE_EXPERT_SIZE else f"{base}/s{expert_size}"


#: Tables tuned on real GPUs (filled from `benchmarks/tune_kernels.py` output; see docs/kernels.md).
#: h200: tuned on one NVIDIA H200 on 2026-12-02 (benchmarks/results/h200/kernel_configs_h200.json).
#: h100: tuned on one NVIDIA H100 80GB HBM3 on 2026-12-06, Llama-3-8B's shape only
#: (benchmarks/results/h100/speed_454d27d/kernel_configs.json; the tuner's 120 s budget); its B = 1 row tuned
#: again on 2026-12-07 with the wider down tiles and streamed weights (benchmarks/results/h100/speed_e010109/), and
#: once more with the union's list (`active_list`, benchmarks/results/h100/speed_08e8866/: 90% off 27.5 -> 24.9 us).
#: Nesting: gpu key -> "DxF" -> "B" -> KernelConfig fields that differ from the defaults.
SHIPPED: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    'h100': {
        '4096x14336': {
            '1': {'active_list': True, 'out_block_d': 512, 'out_split': 16, 'out_warps': 8, 'out_stages': 2, 'stream_weights': True},
            '8': {'in_block_f': 32, 'in_block_k': 256, 'in_stages': 4, 'out_block_d': 128, 'out_split': 16, 'router_block_k': 1024, 'router_pdl': True},
            '32': {'in_block_f': 16, 'in_block_k': 128, 'in_stages': 4, 'out_block_d': 128, 'out_split': 8, 'router_block_e': 16, 'router_block_k': 128, 'router_pdl': True, 'router_warps': 4},
            '64': {'in_block_f': 32, 'in_block_k': 128, 'in_stages': 4, 'out_block_d': 128, 'out_split': 8, 'router_block_e': 16, 'router_block_k': 128, 'router_pdl': True, 'router_warps': 4},
        },
    },
    'h200': {
        '3584x18944': {
            '1': {'in_block_f': 4, 'in_block_k': 512, 'out_block_d': 512, 'out_split': 32, 'out_warps': 8},
            '8': {'in_block_f': 32, 'in_block_k': 256, 'in_stages': 4, 'out_block_d': 128, 'out_split': 16, 'router_block_k': 512, 'router_pdl': True},
            '32': {'in_block_f': 32, 'in_block_k': 128, 'in_stages': 4, 'out_block_d': 128, 'out_split': 8, 'router_block_e': 16, 'router_block_k': 128, 'router_warps': 4},
            '64': {'in_block_f': 32, 'in_block_k': 128, 'in_stages': 4, 'out_block_d': 128, 'out_split': 8, 'router_block_e': 16, 'router_block_k': 128, 'router_warps': 4},
        },
        '4096x11008': {
            '1': {},
            '8': {'in_block_f': 32, 'in_block_k': 256, 'in_stages': 4, 'out_block_d': 128, 'out_split': 16, 'router_block_k': 512, 'router_pdl': True},
            '32': {'in_block_f': 16, 'in_block_k': 128, 'in_stages': 4, 'out_block_d': 128, 'out_split': 8, 'router_block_e': 16, 'router_block_k': 128, 'router_pdl': True, 'router_warps': 4},
            '64': {'in_block_f': 32, 'in_block_k': 128, 'in_stages': 4, 'out_block_d': 128, 'out_split': 8, 'router_block_e': 16, 'router_block_k': 128, 'router_warps': 4},
        },
        '4096x14336': {
            '1': {'in_block_f': 4, 'in_block_k': 512, 'out_block_d': 512, 'out_split': 32, 'out_warps': 8, 'router_pdl': True},
            '8': {'in_block_f': 32, 'in_block_k': 256, 'in_stages': 4, 'out_block_d': 128, 'out_split': 16, 'router_block_k': 512, 'router_pdl': True},
            '32': {'in_block_f': 32, 'in_block_k': 128, 'in_stages': 4, 'out_block_d': 128, 'out_split': 8, 'router_block_e': 16, 'router_block_k': 128, 'router_warps': 4},
            '64': {'in_block_f': 32, 'in_block_k': 128, 'in_stages': 4, 'out_block_d': 128, 'out_split': 8, 'router_block_e': 16, 'router_block_k': 128, 'router_pdl': True, 'router_warps': 4},
        },
        # 16-neuron experts, tuned on 2026-12-03 (benchmarks/results/h200/kernel_configs_h200_s16.json);
        # at B = 8 no candidate beat the heuristic settings, which are what these rows hold
        '4096x11008/s16': {
            '1': {'out_split': 32, 'router_pdl': True},
            '8': {'in_block_f': 32, 'in_block_k': 256, 'in_stages': 4, 'out_block_d': 128, 'out_split': 32, 'router_block_k': 256},
        },
        '4096x14336/s16': {
            '1': {'out_split': 32},
            '8': {'in_block_f': 32, 'in_block_k': 256, 'in_stages': 4, 'out_block_d': 128, 'out_split': 32, 'router_block_k': 256},
        },
    },
}

_EXTRA: list[dict[str, Any]] = []  # tables added by load_table, newest first


def _check_table(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: a kernel config table must be a JSON object gpu -> shape -> B -> settings")
    for gpu, shapes in table.items():
        if not isinstance(shapes, dict):
            raise ValueError(f"{where}: table[{gpu!r}] must map 'DxF' shapes to rows")
        for shape, rows in shapes.items():
            if not isinstance(rows, dict):
                raise ValueError(f"{where}: table[{gpu!r}][{shape!r}] must map token counts to settings")
            for b, settings in rows.items():
                if not str(b).isdigit():
                    raise ValueError(f"{where}: token count keys must be integers, got {b!r}")
                KernelConfig.from_dict(settings)  # raises on unknown fields
    return table


def load_table(path: str | os.PathLike) -> dict[str, Any]:
    """Add a JSON config table (it takes precedence over earlier ones and the shipped table)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"kernel config table {p} does not exist")
    data = json.loads(p.read_text())
    table = _check_table(data.get("table", data) if isinstance(data, dict) else data, str(p))
    _EXTRA.insert(0, table)
    lookup.cache_clear()
    return table


def clear_tables() -> None:
    """Forget the tables added with load_table (the shipped one stays)."""
    _EXTRA.clear()
    lookup.cache_clear()


USER_TABLE_NAME = "kernel_configs.json"


def user_table_path() -> Path:
    """The table ``lte tune`` writes and every launch reads (after ``load_table``'s and ``LTE_KERNEL_CONFIGS``'s):
    ``kernel_configs.json`` in lte's cache folder."""
    from lte.paths import cache_dir

    return cache_dir() / USER_TABLE_NAME


def _read_table_file(p: Path) -> dict[str, Any]:
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"kernel config table {p} is not valid JSON ({err}); delete it or run `lte tune` again") \
            from None
    return _check_table(data.get("table", data) if isinstance(data, dict) else data, str(p))


@functools.lru_cache(maxsize=8)
def _file_table(path: str, mtime_ns: int) -> dict[str, Any]:
    return _read_table_file(Path(path))


def _table_at(path: str | os.PathLike) -> dict[str, Any] | None:
    """The table in a JSON file, re-read when the file changes; None when there is no such file."""
    p = Path(path)
    try:
        mtime = p.stat().st_mtime_ns
    except OSError:
        return None
    return _file_table(str(p), mtime) if p.is_file() else None


def _tables() -> list[dict[str, Any]]:
    tables = list(_EXTRA)
    for path in (os.environ.get(CONFIGS_ENV), user_table_path()):
        found = _table_at(path) if path else None
        if found is not None:
            tables.append(found)
    tables.append(SHIPPED)
    return tables


def merge_table(path: str | os.PathLike, table: dict[str, Any]) -> dict[str, Any]:
    """Write ``table``'s rows into the JSON table at ``path`` (created when missing), keeping the rows of other
    GPUs, shapes and token counts there; the file is replaced whole (a crash leaves the old one). Returns the
    merged table."""
    p = Path(path)
    merged = _read_table_file(p) if p.is_file() else {}
    for gpu, shapes in _check_table(table, "merge_table").items():
        for shape, rows in shapes.items():
            merged.setdefault(gpu, {}).setdefault(shape, {}).update({str(b): dict(v) for b, v in rows.items()})
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps({"table": merged}, indent=1, sort_keys=True))
    tmp.replace(p)
    lookup.cache_clear()
    return merged


def _pick_row(rows: dict[str, Any], num_tokens: int) -> dict[str, Any]:
    sizes = sorted(int(b) for b in rows)
    above = [b for b in sizes if b >= num_tokens]
    return rows[str(above[0] if above else sizes[-1])]


@functools.lru_cache(maxsize=256)
def lookup(gpu: str, model_width: int, ffn_width: int, num_tokens: int,
           expert_size: int = TABLE_EXPERT_SIZE) -> KernelConfig | None:
    """The tuned settings for this GPU key, FFN shape, token count and expert size, or None when no
    table has them. Experts of another size than 32 take the rows tuned for their size; without any,
    the 32-neuron rows of the shape (the tiles fit any size: the launcher clips a row block to the
    expert)."""
    sizes = (expert_size,) if expert_size == TABLE_EXPERT_SIZE else (expert_size, TABLE_EXPERT_SIZE)
    for size in sizes:
        shape = shape_key(model_width, ffn_width, size)
        for table in _tables():
            rows = table.get(gpu, {}).get(shape)
            # rows of another expert size only where they reach this batch: an 8-neuron table tuned at
            # B = 1 alone must not lend its B = 1 tiles to B = 32 (on an H200 they did not even launch)
            if rows and (size == sizes[-1] or max(int(b) for b in rows) >= num_tokens):
                return KernelConfig.from_dict(_pick_row(rows, num_tokens))
    return None


def heuristic_config(num_tokens: int, model_width: int, ffn_width: int, num_sms: int = 132) -> KernelConfig:
    """Settings that need no table: the H100-measured tiles of docs/kernels.md, scaled to the shape.

    - B = 1: two rows per item, all of a 1024-wide K chunk per step, one program per item.
    - B >= 2: 32-row items through ``tl.dot``; the down projection keeps about 4 programs per SM
      and fewer slices as B grows (the partial sums cost ``split x B x D x 4`` bytes).
    """
    cols = max(1, -(-model_width // 128))  # column blocks of 128
    if num_tokens <= 1:  # H100, D=4096: 16 column blocks x 64 splits
        out_split = max(8, min(64, (8 * num_sms) // max(1, -(-model_width // 256))))
        return KernelConfig(out_split=out_split)
    if num_tokens <= 16:  # H100, D=4096: 32 column blocks x 64 / 32 / 16 splits
        split_cap = 64 if num_tokens <= 4 else 32 if num_tokens <= 8 else 16
        return KernelConfig(in_block_f=32, in_block_k=256, in_warps=4, in_stages=4, out_block_d=128,
                            out_split=max(4, min(split_cap, (16 * num_sms) // cols)), out_warps=4,
                            router_block_e=2 if num_tokens <= 8 else 16, router_block_k=256)
    return KernelConfig(in_block_f=32, in_block_k=128, in_warps=4, in_stages=4, out_block_d=128,
                        out_split=max(2, min(8, (2 * num_sms) // cols)), out_warps=4,
                        router_block_e=16, router_block_k=128, router_warps=4)


def render_shipped(table: dict[str, Any]) -> str:
    """Python source for ``SHIPPED`` from a table (paste it above to ship a tuned table): one line per
    row, holding only the settings that differ from ``KernelConfig``'s defaults (the same configs)."""
    defaults = KernelConfig().to_dict()
    lines = ["SHIPPED: dict[str, dict[str, dict[str, dict[str, Any]]]] = {"]
    for gpu, shapes in sorted(_check_table(table, "render_shipped").items()):
        lines.append(f"    {gpu!r}: {{")
        for shape, rows in sorted(shapes.items()):
            lines.append(f"        {shape!r}: {{")
            for b, settings in sorted(rows.items(), key=lambda kv: int(kv[0])):
                row = {k: v for k, v in sorted(settings.items()) if defaults.get(k, object()) != v}
                lines.append(f"            {str(b)!r}: {row!r},")
            lines.append("        },")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines) + "\n"
