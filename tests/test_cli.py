"""The `lte` command line: parsing, config merging, tiny end-to-end train/eval/run, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lte.cli.main import _merged, build_parser, main
from tiny_models import save_tiny_llama, write_text

TINY_FLAGS = ["--block-size", "24", "--batch-size", "4", "--report-to", "none", "--no-progress", "--lr", "1e-3",
              "--logging-steps", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_llama(root / "llama")
    text = write_text(root / "text.txt")
    return {"root": root, "model": str(root / "llama"), "text": str(text)}


def test_building_the_parser_reads_each_settings_type_hints_once(monkeypatch):
    """The `lte train` flags come from TrainArgs' and LTEConfig's annotations: read once per class, not once per
    field of every TrainArgs the parser builds (that cost 1.8 s of every `lte` command's start: 3,271 calls)."""
    import typing

    from lte.training import args as train_args

    train_args._hints.cache_clear()
    train_args._train_fields.cache_clear()
    calls = []
    real = typing.get_type_hints
    monkeypatch.setattr(typing, "get_type_hints", lambda cls, *a, **k: calls.append(cls) or real(cls, *a, **k))
    build_parser()
    build_parser()
    assert sorted(c.__name__ for c in calls) == ["LTEConfig", "TrainArgs"]


def test_every_command_prints_its_help(capsys):
    """Each subcommand's --help renders (a stray '%' in a setting's help text breaks argparse's formatting)."""
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    assert {"train", "run", "study", "generate"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as stop:
            parser.parse_args([name, "--help"])
        assert stop.value.code == 0, name
        assert "usage: lte " + name in capsys.readouterr().out


def test_parse_train_flags():
    args = build_parser().parse_args(["train", "--model", "m", "--task", "causal-lm", "--data", "d", "--stage", "1",
                                      "--out", "o", "--eta", "0.7", "--target-sparsity", "0.6", "--resume",
                                      "--batch-size", "3", "--no-bf16"])
    assert args.stage == "1" and args.eta == 0.7 and args.target_sparsity == 0.6 and args.resume
    assert args.batch_size == 3 and args.bf16 is False
    assert not hasattr(args, "lr")  # flags not given stay unset, so a --config value is not overridden


def test_compile_flag_takes_an_optional_mode(capsys):
    """`--compile` alone is Inductor's default mode, `--compile MODE` names one StaticDecoder takes, no flag is
    False; an unknown mode stops at parsing with the choices."""
    parse = build_parser().parse_args
    assert parse(["bench", "--model", "m"]).compile is False
    assert parse(["bench", "--model", "m", "--compile"]).compile == "default"
    assert parse(["generate", "--model", "m", "--prompt", "p", "--compile", "max-autotune-no-cudagraphs"]).compile == \
        "max-autotune-no-cudagraphs"
    with pytest.raises(SystemExit):
        parse(["bench", "--model", "m", "--compile", "reduce-overhead"])
    assert "max-autotune-no-cudagraphs" in capsys.readouterr().err


def test_config_file_values_are_overridden_by_flags(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: m\ntask: causal-lm\nbatch-size: 2\nlr: 0.01\n")
    args = build_parser().parse_args(["train", "--config", str(cfg), "--batch-size", "5"])
    values = _merged(args)
    assert values["batch_size"] == 5 and values["lr"] == 0.01 and values["model"] == "m"


def test_missing_required_settings_say_which(capsys):
    assert main(["train", "--model", "m", "--task", "causal-lm"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--stage" in err and "--out" in err


def test_train_and_eval_end_to_end(tiny, tmp_path, capsys):
    d = tmp_path / "dense"
    s1 = tmp_path / "s1"
    s2 = tmp_path / "s2"
    common = ["--task", "causal-lm", "--data", tiny["text"], *TINY_FLAGS]
    assert main(["train", "--model", tiny["model"], "--stage", "dense", "--out", str(d), "--max-steps", "2",
                 *common]) == 0
    assert main(["train", "--model", str(d), "--stage", "1", "--out", str(s1), "--max-steps", "3",
                 "--target-sparsity", "0.5", *common]) == 0
    assert main(["train", "--model", str(s1), "--stage", "2", "--out", str(s2), "--max-steps", "2", *common]) == 0
    assert json.loads((s2 / "lte_stage.json").read_text())["stage"] == "stage2"
    out_json = tmp_path / "eval.json"
    assert main(["eval", "--model", str(s2), "--task", "causal-lm", "--data", tiny["text"], "--max-tokens", "300",
                 "--max-length", "32", "--out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["perplexity"] > 1 and len(result["per_layer_sparsity"]) == 2
    assert 0 <= result["ffn_sparsity"] <= 1 and result["gflops_per_token"] > 0
    assert out_json.with_suffix(".png").is_file()
    assert "perplexity" in capsys.readouterr().out


def test_interrupted_train_saves_a_checkpoint_and_resumes(tiny, tmp_path, capsys, monkeypatch):
    import os
    import signal
    import threading

    import lte.training

    out = tmp_path / "s1"
    cmd = ["train", "--model", tiny["model"], "--stage", "1", "--out", str(out), "--max-steps", "3",
           "--target-sparsity", "0.5", "--task", "causal-lm", "--data", tiny["text"], *TINY_FLAGS]
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    real_install = lte.training.install_stop_handler

    def install_and_signal(signals):  # the user's Ctrl-C arrives while the first step runs
        event = real_install(signals)
        os.kill(os.getpid(), signal.SIGINT)
        return event

    monkeypatch.setattr(lte.training, "install_stop_handler", install_and_signal)
    try:
        assert main(cmd) == 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert "stopped at step 1" in capsys.readouterr().out and (out / "checkpoint-1").is_dir()
    monkeypatch.setattr(lte.training, "install_stop_handler", lambda signals: threading.Event())
    assert main([*cmd, "--resume"]) == 0  # continues from step 1 to the end
    assert json.loads((out / "lte_stage.json").read_text())["global_step"] == 3


def test_train_on_a_mix_of_texts(tiny, tmp_path, capsys):
    other = write_text(tmp_path / "other.txt", lines=30)
    out = tmp_path / "mix"
    assert main(["train", "--model", tiny["model"], "--stage", "dense", "--out", str(out), "--max-steps", "1",
                 "--task", "causal-lm", "--data", tiny["text"], str(other), *TINY_FLAGS]) == 0
    assert json.loads((out / "lte_stage.json").read_text())["data"] == str([tiny["text"], str(other)])
    code = main(["train", "--model", tiny["model"], "--stage", "dense", "--out", str(tmp_path / "cls"),
                 "--task", "classification", "--glue-task", "sst2", "--data", tiny["text"], str(other), *TINY_FLAGS])
    assert code == 2 and "a mix) are for --task causal-lm" in capsys.readouterr().err
    code = main(["train", "--model", tiny["model"], "--stage", "dense", "--out", str(tmp_path / "gone"),
                 "--task", "causal-lm", "--data", tiny["text"], str(tmp_path / "none.txt"), *TINY_FLAGS])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_run_trains_and_scores_on_a_mix(tiny, tmp_path, capsys):
    other = write_text(tmp_path / "other.txt", lines=40)
    cfg, out = tmp_path / "run.yaml", tmp_path / "run"
    cfg.write_text(
        f"name: tiny\nmodel: {tiny['model']}\ntask: causal-lm\ndata: [{other}, {tiny['text']}]\nout: {out}\n"
        "holdout: 0.2\nblock_size: 24\nbatch_size: 4\nlr: 0.001\nreport_to: none\nlogging_steps: 1\n"
        "dense: {max_steps: 1}\nstage1: {max_steps: 2, target_sparsity: 0.5}\nstage2: {max_steps: 1}\n"
        "eval: {max_tokens: 200, max_length: 32, batch_size: 2}\n")
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["dense"]["score"] > 1 and report["lte"]["score"] > 1
    assert json.loads((out / "stage1" / "lte_stage.json").read_text())["data"] == str([str(other), tiny["text"]])


def test_stage2_without_stage1_exits_with_clear_message(tiny, tmp_path, capsys):
    code = main(["train", "--model", tiny["model"], "--task", "causal-lm", "--data", tiny["text"], "--stage", "2",
                 "--out", str(tmp_path / "o"), *TINY_FLAGS])
    assert code == 2
    assert "stage 2 needs the output directory of stage 1" in capsys.readouterr().err


def test_missing_data_exits_with_clear_message(tiny, tmp_path, capsys):
    code = main(["train", "--model", tiny["model"], "--task", "causal-lm", "--data", str(tmp_path / "none.txt"),
                 "--stage", "dense", "--out", str(tmp_path / "o"), *TINY_FLAGS])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_run_pipeline_and_resume_by_skipping(tiny, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "run"
    cfg.write_text(
        f"name: tiny\nmodel: {tiny['model']}\ntask: causal-lm\ndata: {tiny['text']}\nout: {out}\n"
        "holdout: 0.2\nblock_size: 24\nbatch_size: 4\nlr: 0.001\nreport_to: none\nlogging_steps: 1\n"
        "dense: {max_steps: 2}\nstage1: {max_steps: 3, target_sparsity: 0.5}\nstage2: {max_steps: 2}\n"
        "eval: {max_tokens: 200, max_length: 32, batch_size: 2}\n")
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    first = capsys.readouterr().out
    assert "FFN sparsity" in first and "LTE" in first
    report = json.loads((out / "report.json").read_text())
    assert report["dense"]["ffn_sparsity"] == 0 and report["lte"]["score"] > 1
    assert (out / "sparsity_per_layer.png").is_file()
    # a second run skips every finished stage and reuses the evaluations
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    second = capsys.readouterr().out
    assert second.count("skipped") == 3


def test_a_stopped_run_continues_where_it_stopped(tiny, tmp_path, capsys, monkeypatch):
    import threading

    import lte.training

    class StopInStage1:  # reads as set from the third step on: dense trains 2 steps, stage 1 stops after 1
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls >= 3

    cfg, out = tmp_path / "run.yaml", tmp_path / "run"
    cfg.write_text(
        f"name: tiny\nmodel: {tiny['model']}\ntask: causal-lm\ndata: {tiny['text']}\nout: {out}\n"
        "holdout: 0.2\nblock_size: 24\nbatch_size: 4\nlr: 0.001\nreport_to: none\nlogging_steps: 1\n"
        "dense: {max_steps: 2}\nstage1: {max_steps: 3, target_sparsity: 0.5}\nstage2: {max_steps: 1}\n"
        "eval: {max_tokens: 200, max_length: 32, batch_size: 2}\n")
    monkeypatch.setattr(lte.training, "install_stop_handler", lambda signals: StopInStage1())
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 130
    assert "stopped at step 1" in capsys.readouterr().out and (out / "stage1" / "checkpoint-1").is_dir()
    monkeypatch.setattr(lte.training, "install_stop_handler", lambda signals: threading.Event())
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    again = capsys.readouterr().out
    assert "dense: already complete" in again and "resuming from" in again
    assert json.loads((out / "stage1" / "lte_stage.json").read_text())["global_step"] == 3


def test_run_scores_a_training_free_baseline_at_ltes_sparsity(tiny, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    out = tmp_path / "run"
    cfg.write_text(
        f"name: tiny\nmodel: {tiny['model']}\ntask: causal-lm\ndata: {tiny['text']}\nout: {out}\n"
        "holdout: 0.2\nblock_size: 24\nbatch_size: 4\nlr: 0.001\nreport_to: none\nlogging_steps: 1\n"
        "dense: {max_steps: 1}\nstage1: {max_steps: 2, target_sparsity: 0.5}\nstage2: {max_steps: 1}\n"
        "eval: {max_tokens: 200, max_length: 32, batch_size: 2}\nbaselines: [teal]\n")
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    teal, lte_row = report["baselines"]["teal"], report["lte"]
    assert "teal (no training)" in table and teal["score"] > 1
    assert abs(teal["ffn_sparsity"] - lte_row["ffn_sparsity"]) < 0.1  # calibrated to LTE's measured sparsity
    built = json.loads((out / "eval_teal.json").read_text())["built_for_sparsity"]
    assert built == pytest.approx(lte_row["ffn_sparsity"])
    cfg.write_text(cfg.read_text().replace("[teal]", "[dejavu-ft]"))
    assert main(["run", "--config", str(cfg), "--no-progress"]) == 2
    assert "training-free" in capsys.readouterr().err


def test_run_with_missing_config(capsys, tmp_path):
    assert main(["run", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "run config not found" in capsys.readouterr().err


def test_every_command_is_registered():
    text = build_parser().format_help()
    for name in ("train", "eval", "run", "demo", "generate", "bench", "baseline", "sweep", "study"):
        assert name in text


def test_demo_config_file_mirrors_the_built_in_demo():
    from pathlib import Path

    import yaml

    from lte.cli.demo import demo_config

    on_disk = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    on_disk.pop("out")
    assert on_disk == demo_config()


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_committed_run_config_gives_valid_stage_settings(path):
    from lte.study.pipeline import _stage_hparams, load_run_config
    from lte.training.args import TrainArgs

    cfg = load_run_config(path)
    for section in ("dense", "stage1", "stage2"):
        TrainArgs.from_dict(_stage_hparams(cfg, section))  # raises on an unknown or out-of-range setting
