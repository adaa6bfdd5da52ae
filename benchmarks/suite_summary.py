"""Summary of one run of benchmarks/h200_suite.sh: short tables and the issue's goals, from $OUT.

    python benchmarks/suite_summary.py OUT_DIR

Reads what the sections left in OUT_DIR (any may be missing or partial: that is reported, not an
error), prints the tables and writes OUT_DIR/summary.json.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(f"(no {path.name}: {type(err).__name__})")
        return None


def tests_summary(out: Path) -> dict[str, Any] | None:
    xml = out / "gpu_tests.xml"
    if not xml.is_file():
        return None
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return {"error": "unreadable junit xml"}
    suites = [root] if root.tag == "testsuite" else list(root)
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {**total, "failed": failed}


def ffn_tables(ffn: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [r for r in ffn.get("rows", []) if r.get("variant") not in (None, "skipped")]
    print(f"\n== FFN (router + FFN, bf16) on {ffn['env']['gpu']}; copy bandwidth "
          f"{ffn.get('copy_GBps') or 0:.0f} GB/s; 'x' = dense us / LTE us")
    print(f"{'shape':>10} {'B':>3} {'dense us':>8} {'0%':>6} {'50%':>6} {'70%':>6} {'90%':>6} {'95%':>6} "
          f"{'tok50%':>13} {'budget':>13} {'GB/s@50':>7} {'ideal@50':>8}")
    out = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        for b in sorted({r["B"] for r in rows if r["shape"] == shape and r["B"] <= 64}):
            sel = [r for r in rows if r["shape"] == shape and r["B"] == b]

            def find(variant, masks, off, sel=sel):
                return next((r for r in sel if r["variant"] == variant and r["masks"] == masks
                             and abs(r["off"] - off) < 1e-6), None)

            dense = find("dense", "-", 0.0)
            cells = []
            for off in (0.0, 0.5, 0.7, 0.9, 0.95):
                r = find("lte", "fixed", off)
                cells.append(f"{r['speedup']:.2f}x" if r and r.get("speedup") else "-")
            tok = find("lte", "per_token", 0.5)
            bud = find("lte_budget", "per_token", 0.5)
            half = find("lte", "fixed", 0.5)
            ideal = (dense["us"] / half["ideal_us"]) if dense and half and half.get("ideal_us") else None

            def pair(r):
                return f"{r['speedup']:.2f}x@{r['active']:.2f}" if r and r.get("speedup") else "-"

            print(f"{shape:>10} {b:>3} {dense['us'] if dense else float('nan'):>8.1f} "
                  + " ".join(f"{c:>6}" for c in cells)
                  + f" {pair(tok):>13} {pair(bud):>13} {half['GBps'] if half else 0:>7.0f} "
                  + (f"{ideal:>7.2f}x" if ideal else f"{'-':>8}"))
            out.append({"shape": shape, "B": b, "dense_us": dense["us"] if dense else None,
                        "speedup_fixed": dict(zip(("0", "50", "70", "90", "95"), cells)),
                        "per_token_50": pair(tok), "budget_50": pair(bud)})
    anchors = [r for r in rows if r["variant"] in ("dense_half_width", "kernel_only", "prefill_dense", "prefill_lte")]
    for r in anchors:
        print(f"   anchor {r['shape']} {r['variant']} B={r['B']}: {r['us']:.1f} us"
              + (f" ({r['speedup']:.2f}x vs dense)" if r.get("speedup") else ""))
    return out


def decode_tables(dec: dict[str, Any]) -> None:
    rows = [r for r in dec.get("rows", []) if "ms_per_step" in r]
    print(f"\n== decode step (32-layer-class models, random weights, CUDA graph, no compile) on {dec['env']['device']}")
    print(f"{'shape':>11} {'B':>3} {'variant':>10} {'mask':>6} {'off':>5} {'active':>6} {'ms':>7} {'vs dense':>8} "
          f"{'ideal':>7}")
    for r in rows:
        change = f"{100 * r['vs_dense']:+.1f}%" if r.get("vs_dense") is not None else "-"
        ideal = f"{r['ideal_ms']:.3f}" if r.get("ideal_ms") is not None else "-"
        frac = r.get("ffn_active_fraction")
        print(f"{r.get('shape', '-'):>11} {r['batch_size']:>3} {r['variant']:>10} {r['mask']:>6} "
              f"{r.get('sparsity', 0):>5.2f} {'-' if frac is None else f'{frac:.3f}':>6} {r['ms_per_step']:>7.3f} "
              f"{change:>8} {ideal:>7}")


def goals(ffn: dict[str, Any] | None, dec: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's goal table, measured in this run (None where the run has no figure)."""
    res = []

    def ffn_row(shape, b, variant, masks, off):
        if not ffn:
            return None
        return next((r for r in ffn.get("rows", []) if r.get("shape") == shape and r.get("B") == b
                     and r.get("variant") == variant and r.get("masks") == masks
                     and abs(r.get("off", -1) - off) < 1e-6), None)

    def add(name, value, goal, met):
        res.append({"goal": name, "measured": value, "target": goal, "met": met})

    r = ffn_row("llama2-7b", 1, "lte", "fixed", 0.5)
    add("FFN B=1 50% off, router incl. (LLaMA-2-7B)", r and round(r["speedup"], 3), ">= 1.9x",
        None if not r else r["speedup"] >= 1.9)
    r = ffn_row("llama2-7b", 1, "lte", "fixed", 0.9)
    add("FFN B=1 90% off, router incl. (LLaMA-2-7B)", r and round(r["speedup"], 3), ">= 5x",
        None if not r else r["speedup"] >= 5.0)
    full = [x for x in (ffn or {}).get("rows", []) if x.get("variant") == "lte" and x.get("B", 99) <= 64
            and (abs(x.get("off", 1) - 0.0) < 1e-6 or x.get("masks") == "per_token") and x.get("speedup")]
    worst = min(full, key=lambda x: x["speedup"]) if full else None
    add("FFN 0% off / full union, kernels alone, worst over shapes and B <= 64",
        worst and f"{worst['speedup']:.3f}x ({worst['shape']} B={worst['B']} {worst['masks']})", ">= 0.98x",
        None if not worst else worst["speedup"] >= 0.98)
    paths = [x for x in (ffn or {}).get("rows", []) if x.get("variant") == "lte_dense_path" and x.get("speedup")]
    worst = min(paths, key=lambda x: x["speedup"]) if paths else None
    add("FFN full union, the dispatched masked dense path, worst over shapes and B <= 64",
        worst and f"{worst['speedup']:.3f}x ({worst['shape']} B={worst['B']})", ">= 0.98x",
        None if not worst else worst["speedup"] >= 0.98)

    def dec_row(shape, b, variant, mask, s):
        if not dec:
            return None
        return next((x for x in dec.get("rows", []) if x.get("shape") == shape and x.get("batch_size") == b
                     and x.get("variant") == variant and x.get("mask") == mask
                     and abs(x.get("sparsity", -1) - s) < 1e-6 and x.get("vs_dense") is not None), None)

    r = dec_row("llama3-8b", 1, "lte", "fixed", 0.5)
    add("decode Llama-3-8B B=1 50% off (no compile)", r and f"{100 * r['vs_dense']:+.1f}%", "<= -28%",
        None if not r else r["vs_dense"] <= -0.28)
    for shape in ("llama2-7b", "llama3-8b"):
        r = dec_row(shape, 8, "lte", "random", 0.5)
        add(f"decode {shape} B=8 per-token 50%", r and f"{100 * r['vs_dense']:+.1f}%", "<= 0%",
            None if not r else r["vs_dense"] <= 0.0)
        r = dec_row(shape, 8, "lte_budget", "random", 0.5)
        add(f"decode {shape} B=8 per-token 50% with a 50% batch budget", r and f"{100 * r['vs_dense']:+.1f}%",
            "<= -10%", None if not r else r["vs_dense"] <= -0.10)
    r = dec_row("llama3-8b", 32, "lte", "fixed", 0.9)
    add("decode Llama-3-8B B=32 90% off", r and f"{100 * r['vs_dense']:+.1f}%", "<= -15%",
        None if not r else r["vs_dense"] <= -0.15)
    print("\n== goals (issue 11; decode figures here are without torch.compile)")
    for g in res:
        mark = {True: "met", False: "MISSED", None: "no figure"}[g["met"]]
        print(f"  {mark:>9} | {g['goal']}: {g['measured']} (goal {g['target']})")
    return res


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    summary: dict[str, Any] = {"out": str(out)}
    summary["tests"] = tests_summary(out)
    tuned = load(out / "kernel_configs.json")
    if tuned:
        rows = sum(len(v) for g in tuned.get("table", {}).values() for v in g.values())
        summary["tuning"] = {"gpu_key": tuned.get("gpu_key"), "rows": rows, "errors": len(tuned.get("errors", [])),
                             "skipped": tuned.get("skipped")}
    ffn = load(out / "ffn_kernel.json")
    dec = load(out / "decode.json")
    if ffn:
        summary["ffn"] = ffn_tables(ffn)
        summary["ffn_errors"] = [e["what"] for e in ffn.get("errors", [])]
        summary["dispatch_crossings"] = ffn.get("dispatch_crossings")
    if dec:
        decode_tables(dec)
        summary["decode_errors"] = [e["what"] for e in dec.get("errors", [])]
    summary["goals"] = goals(ffn, dec)
    sections = out / "sections.txt"
    if sections.is_file():
        summary["sections"] = sections.read_text().splitlines()
    print("\n== run")
    print(f"  sections: {summary.get('sections')}")
    print(f"  gpu tests: {summary['tests']}")
    print(f"  tuning: {summary.get('tuning')}")
    print(f"  dispatch crossings (a GPU row of lte.serving.dispatch.DENSE_ABOVE_BY_GPU, rounded down): "
          f"{summary.get('dispatch_crossings')}")
    print(f"  failed points: ffn {summary.get('ffn_errors')}, decode {summary.get('decode_errors')}")
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


if __name__ == "__main__":
    main()
