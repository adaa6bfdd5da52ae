"""`lte tune` and `lte.kernels.autotune`: which tiles the tuner keeps, the order it tunes in, the user's table
(merged, read back before the shipped one), the command's shapes and refusals. The timing itself needs a GPU;
here a fake point gives known times, so the choice of each launch's best tile is checked by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lte.cli.main import main
from lte.kernels import tuning
from lte.kernels.tuning import KernelConfig

HAS_TRITON = __import__("importlib").util.find_spec("triton") is not None
if HAS_TRITON:
    from lte.kernels import autotune
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (lte.kernels.autotune imports it)")


@pytest.fixture()
def user_table(tmp_path, monkeypatch):
    """The user table in a fresh folder (LTE_CACHE would move the model cache too, so only the table moves)."""
    path = tmp_path / "cache" / "kernel_configs.json"
    monkeypatch.setattr(tuning, "user_table_path", lambda: path)
    monkeypatch.delenv(tuning.CONFIGS_ENV, raising=False)
    tuning.lookup.cache_clear()
    yield path
    tuning.lookup.cache_clear()


class FakePoint:
    """Stands in for `autotune.Point`: times that depend on the settings in a way worked out by hand below."""

    D, F, B, S = 64, 256, 1, 32

    def __init__(self, routed=None, fail_default=False):
        self.routed = routed
        self.fail_default = fail_default

    def time_in(self, off, cfg):  # (4 rows, 512 a step) with the list is the fastest gate/up tile
        return (10.0 if (cfg.in_block_f, cfg.in_block_k, cfg.active_list) == (4, 512, True) else 20.0) + off

    def time_out(self, off, cfg):  # (512 columns, 16 splits) is the fastest down tile
        return (5.0 if (cfg.out_block_d, cfg.out_split) == (512, 16) else 9.0) + off

    def time_router(self, cfg):
        return 1.0 if cfg.router_block_e == 4 else 2.0

    def time_routed(self, off, cfg):
        if self.fail_default and not cfg.active_list:
            raise RuntimeError("launch failed")
        return self.routed(cfg) + off if self.routed else 100.0 + off


def _combined(cfg):
    """The tiles each launch's best candidate gives, as the fake point defines them."""
    return (cfg.in_block_f, cfg.in_block_k, cfg.active_list, cfg.out_block_d, cfg.out_split, cfg.router_block_e)


@needs_triton
def test_tune_point_keeps_each_launchs_best_tile_and_the_best_whole_op():
    base = KernelConfig()
    best_tiles = (4, 512, True, 512, 16, 4)

    def routed(cfg):  # the combined tiles beat the defaults; streamed weights with the list beat them again
        if _combined(cfg) != best_tiles:
            return 100.0
        return 40.0 if cfg.stream_weights and cfg.active_list and not cfg.router_pdl else 50.0

    rows, errors = [], []
    best = autotune.tune_point(FakePoint(routed), base, rows, errors, autotune.Deadline(60))
    assert errors == []
    assert _combined(best) == best_tiles
    assert best.stream_weights and not best.router_pdl and not best.out_prefetch
    assert (best.in_warps, best.in_stages, best.out_warps, best.out_stages) == (4, 3, 8, 2)  # from the candidates
    whats = [r["what"] for r in rows]
    assert whats[0] == "routed default"
    assert whats.count("gate/up") == 2 * len(autotune.IN_CANDIDATES["fma"])  # each with and without the list
    assert whats.count("down+finish") == len(autotune.OUT_CANDIDATES["fma"])
    assert whats.count("router") == len(autotune.ROUTER_CANDIDATES["fma"])
    assert whats.count("routed candidate") == 7
    gate = next(r for r in rows if r["what"] == "gate/up" and r["candidate"] == (4, 512, 4, 3, 0) and r["active_list"])
    assert gate["us"] == {"0.0": 10.0, "0.5": 10.5, "0.9": 10.9}


@needs_triton
def test_tune_point_keeps_the_defaults_when_nothing_beats_them_and_gives_none_when_they_fail():
    base = KernelConfig()
    assert autotune.tune_point(FakePoint(), base, [], [], autotune.Deadline(60)) == base
    errors = []
    assert autotune.tune_point(FakePoint(fail_default=True), base, [], errors, autotune.Deadline(60)) is None
    assert errors and "launch failed" in errors[0]["error"]


@needs_triton
def test_tune_point_stops_trying_candidates_when_the_budget_is_spent():
    rows = []
    best = autotune.tune_point(FakePoint(), KernelConfig(), rows, [], autotune.Deadline(0))
    assert best == KernelConfig()
    assert [r["what"] for r in rows] == ["routed default"]


@needs_triton
def test_candidate_lists_can_be_replaced():
    rows = []
    cands = {"in": {"fma": [(4, 512, 4, 3, 0)]}, "out": {"fma": [(512, 16, 8, 2)]}, "router": {"fma": [(4, 0, 8)]}}
    autotune.tune_point(FakePoint(), KernelConfig(), rows, [], autotune.Deadline(60), cands)
    assert [r["what"] for r in rows].count("gate/up") == 2
    assert [r["what"] for r in rows].count("down+finish") == 1


@needs_triton
def test_family_and_geo():
    assert [autotune.family(b) for b in (1, 2, 16, 17, 64)] == ["fma", "dot16", "dot16", "dot64", "dot64"]
    assert autotune.geo([2.0, 8.0]) == pytest.approx(4.0)


@needs_triton
def test_tune_order_puts_the_first_shape_first_and_repeats_nothing():
    order = autotune.tune_order([(1, 2), (3, 4), (1, 2)], [1, 8, 32, 64])
    assert order == [(1, 2, 1), (1, 2, 8), (1, 2, 32), (3, 4, 1), (3, 4, 8), (3, 4, 32), (1, 2, 64), (3, 4, 64)]


@needs_triton
def test_tune_refuses_bad_requests_before_any_work():
    with pytest.raises(ValueError, match="at least one FFN shape"):
        autotune.tune([], device="cpu")
    with pytest.raises(ValueError, match="1..64"):
        autotune.tune([(64, 200)], tokens=[65], device="cpu")
    with pytest.raises(ValueError, match="positive"):
        autotune.tune([(0, 200)], device="cpu")


@needs_triton
def test_routed_inputs_reproduce_the_mask():
    import torch

    mask = torch.tensor([[True, False, True], [False, False, True]])
    x, w = autotune.routed_inputs(mask, 4, torch.float32)
    assert torch.equal((x @ w.t()) > 0, mask)


def test_merged_user_table_is_read_before_the_shipped_one(user_table, tmp_path, monkeypatch):
    assert tuning.lookup("h100", 4096, 14336, 1) == KernelConfig.from_dict(tuning.SHIPPED["h100"]["4096x14336"]["1"])
    user_table.parent.mkdir(parents=True)
    user_table.write_text(json.dumps({"table": {"a100": {"64x200": {"1": {"in_warps": 8}}}}}))
    mine = KernelConfig(in_block_f=8, out_split=4)
    merged = tuning.merge_table(user_table, {"h100": {"4096x14336": {"1": mine.to_dict()}}})
    assert merged["a100"] == {"64x200": {"1": {"in_warps": 8}}}  # other GPUs' rows stay
    assert tuning.lookup("h100", 4096, 14336, 1) == mine  # before SHIPPED
    assert tuning.lookup("h100", 4096, 14336, 8) == mine  # the smallest tuned B' >= B, else the largest
    tuning.merge_table(user_table, {"h100": {"4096x14336": {"8": KernelConfig(in_warps=2).to_dict()}}})
    assert tuning.lookup("h100", 4096, 14336, 8) == KernelConfig(in_warps=2)
    assert tuning.lookup("h100", 4096, 14336, 1) == mine  # merged, not replaced
    env = tmp_path / "env.json"
    env.write_text(json.dumps({"h100": {"4096x14336": {"64": {"in_warps": 16}}}}))
    monkeypatch.setenv(tuning.CONFIGS_ENV, str(env))
    tuning.lookup.cache_clear()
    assert tuning.lookup("h100", 4096, 14336, 8) == KernelConfig(in_warps=16)  # LTE_KERNEL_CONFIGS comes first


def test_a_broken_user_table_says_which_file_and_what_to_do(user_table):
    user_table.parent.mkdir(parents=True)
    user_table.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON.*lte tune"):
        tuning.lookup("h100", 64, 200, 1)
    user_table.write_text(json.dumps({"h100": {"64x200": {"1": {"no_such_setting": 1}}}}))
    tuning.lookup.cache_clear()
    with pytest.raises(ValueError, match="no_such_setting"):
        tuning.lookup("h100", 64, 200, 1)


def test_tune_command_refuses_without_a_shape_or_a_gpu(capsys, monkeypatch, user_table):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["tune"]) == 2
    assert "at least one FFN shape" in capsys.readouterr().err
    assert main(["tune", "--shape", "llama9"]) == 2
    assert "unknown shape" in capsys.readouterr().err
    assert main(["tune", "--shape", "tiny", "--device", "cpu"]) == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err
    assert main(["tune", "--ffn", "64", "200", "--tokens", "0"]) == 2
    assert "1 to 64" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(["tune", "--shape", "tiny"]) == 2
        assert "CUDA GPU" in capsys.readouterr().err
    assert not user_table.exists()


def test_tune_command_reads_the_ffn_shape_of_a_model_folder(tmp_path, capsys):
    from lte.serving.cli import _model_ffn

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536}))
    assert _model_ffn(str(hf)) == ((576, 1536), None)
    (hf / "lte_config.json").write_text(json.dumps({"lte": {"expert_size": 8}, "base": {"ffn_widths": [1536] * 30}}))
    assert _model_ffn(str(hf)) == ((576, 1536), 8)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_inner": None}))
    assert _model_ffn(str(gpt2)) == ((64, 256), None)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "mystery", "width": 3}))
    assert main(["tune", "--model", str(odd)]) == 2
    assert "--ffn D F" in capsys.readouterr().err
    assert main(["tune", "--model", str(tmp_path / "none")]) == 2
    assert "no config.json" in capsys.readouterr().err
    (odd / "config.json").write_text("{broken")
    assert main(["tune", "--model", str(odd)]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_tune_command_refuses_a_broken_table_or_budget_before_any_timing(tmp_path, capsys, user_table, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the device check: the refusals must come before tuning
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert main(["tune", "--ffn", "64", "200", "--device", "cpu", "--out", str(broken)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert broken.read_text() == "{not json"  # left as it was
    assert main(["tune", "--ffn", "64", "200", "--device", "cpu", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["tune", "--ffn", "64", "200", "--device", "cpu", "--budget", "0"]) == 2
    assert "--budget" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_tune_command_runs_through_the_interpreter(tmp_path):
    """`lte tune --device cpu` end to end in Triton's interpreter (tiny shape, B = 1): a row for the shape lands in
    the table it names (times mean nothing here)."""
    out = tmp_path / "table.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "LTE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "lte.cli.main", "tune", "--ffn", "64", "200", "--tokens", "1",
                           "--budget", "30", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = json.loads(out.read_text())["table"]
    (rows,) = table.values()
    assert list(rows) == ["64x200"] and list(rows["64x200"]) == ["1"]
    KernelConfig.from_dict(rows["64x200"]["1"])
    assert "set LTE_KERNEL_CONFIGS=" in proc.stdout


@needs_triton
def test_a_replaced_tile_changes_only_its_fields():
    cfg = autotune.with_out(autotune.with_in(KernelConfig(), (4, 512, 8, 2, 0)), (128, 8, 4, 3))
    assert (cfg.in_block_f, cfg.in_block_k, cfg.in_warps, cfg.in_stages, cfg.in_progs_per_sm) == (4, 512, 8, 2, 0)
    assert (cfg.out_block_d, cfg.out_split, cfg.out_warps, cfg.out_stages) == (128, 8, 4, 3)
    assert replace(cfg, active_list=True).router_block_e == KernelConfig().router_block_e
