"""Sweeps: a tiny study on a tiny random model writes CSV, JSON and PNG; the CLI registers its commands."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from lte.data import LMDataset
from lte.study.cache import load_results
from lte.study.plots import plot_study
from lte.study.report import tolerance_ok
from lte.study.runner import run_study
from tiny_models import VOCAB, build


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[EOS]": 1, **{f"w{i}": i for i in range(2, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", eos_token="[EOS]")


def test_tiny_study_writes_points_and_plots(tmp_path):
    ids = torch.randint(2, VOCAB, (2048,), generator=torch.Generator().manual_seed(0))
    train, held = LMDataset(ids[:1536], 32), LMDataset(ids[1536:], 32)
    cfg = {"name": "tiny", "task": "causal-lm", "data": train, "eval_data": held,
           "methods": ["lte", "teal", "dejavu-ft"], "targets": [0.5, 0.8]}
    summary = run_study(cfg, tmp_path, tiny=True, model=build("llama"), tokenizer=tiny_tokenizer())
    assert not summary["failures"]
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [r["method"] for r in rows] == ["dense", "lte", "lte", "teal", "teal", "dejavu-ft", "dejavu-ft"]
    points = load_results(tmp_path / "results.json")
    teal = [p for p in points if p["method"] == "teal"]
    assert [round(p["activation_sparsity"], 1) for p in teal] == [0.5, 0.8]
    assert all(p["quality"] > 1 and p["gflops_per_token"] > 0 and len(p["per_layer"]) == 2 for p in points[1:])
    assert [p["train_steps"] for p in points if p["method"] == "dejavu-ft"] == [4, 4]  # 2 stages x 2 steps
    assert all(p["eta"] is not None for p in points if p["method"] == "lte")
    for name in ("quality_vs_sparsity", "gflops_vs_quality", "eta_vs_sparsity", "per_layer_sparsity"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["metric"] == "perplexity"
    assert (tmp_path / "teal" / "points.csv").exists()


def test_plot_study_needs_points(tmp_path):
    from lte import LTEError

    with pytest.raises(LTEError):
        plot_study([], tmp_path / "x.png")


def test_tolerance_rules():
    assert tolerance_ok(10.4, 10.0, "perplexity", False) and not tolerance_ok(10.6, 10.0, "perplexity", False)
    assert tolerance_ok(38.5, 40.0, "rougeL", True) and not tolerance_ok(37.9, 40.0, "rougeL", True)


def test_cli_registers_baseline_commands(capsys):
    from lte.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["sweep", "--method", "lte,teal", "--targets", "0.3,0.9", "--task", "causal-lm",
                              "--model", "m", "--data", "d", "--out", "o"])
    assert args.method == ["lte", "teal"] and args.targets == [0.3, 0.9]
    args = parser.parse_args(["baseline", "--method", "cats", "--model", "m", "--calib-data", "d"])
    assert args.target_sparsity == 0.5
    assert parser.parse_args(["study", "configs/study/sst2-minilm.yaml", "--tiny"]).tiny


@pytest.mark.parametrize("expert_size", [8, 32])
def test_baseline_command_takes_the_expert_size_it_is_given(tmp_path, expert_size):
    from lte.baselines.model import BaselineModel
    from lte.cli.main import main
    from tiny_models import save_tiny_llama, write_text

    model = save_tiny_llama(tmp_path / "model")
    text = write_text(tmp_path / "text.txt", lines=40)
    out = tmp_path / f"oracle{expert_size}"
    assert main(["baseline", "--method", "moefication-oracle", "--model", str(model), "--task", "causal-lm",
                 "--calib-data", str(text), "--tiny", "--set", f"expert_size={expert_size}", "--out", str(out)]) == 0
    sizes = BaselineModel.from_pretrained(out).sparsifiers()[0].unit_sizes.tolist()
    assert sizes == ([8] * 9 if expert_size == 8 else [32, 32, 8])  # F = 72 neurons


def test_baseline_command_fine_tunes_with_distillation_from_the_dense_model(tmp_path):
    """`lte baseline --method sketch-ft` with train.distill > 0: the dense model is the teacher (it was
    missing, and the command stopped with "needs teacher=")."""
    from lte.baselines.model import BaselineModel
    from lte.cli.main import main
    from tiny_models import save_tiny_llama, write_text

    model = save_tiny_llama(tmp_path / "model")
    text = write_text(tmp_path / "text.txt", lines=40)
    out = tmp_path / "sketch-ft"
    assert main(["baseline", "--method", "sketch-ft", "--model", str(model), "--task", "causal-lm",
                 "--calib-data", str(text), "--tiny", "--set", "train.distill=0.5", "--set", "expert_size=8",
                 "--out", str(out)]) == 0
    again = BaselineModel.from_pretrained(out)
    assert again.method == "sketch-ft" and again.options["predictor"]["kind"] == "sketch"
    log = [json.loads(line) for line in (out / "finetune" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4  # the tiny budget, 2 x train.max_steps, as for Deja Vu + FT
