"""Issue 14, "a newcomer's first hour": every row of its table is a row here, with what the user now sees.

Each row runs what the user ran (mostly the `lte` command, in process) on tiny models built in
code and asserts the message, exit code or outcome. The things rows need (a finished stage-1
folder, an interrupted run, a classifier trained on SST-2, ...) are built once per test process,
on first use, by `World`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from transformers import TrainerCallback

import lte
from lte.cli.main import main
from lte.training import TrainArgs, train_stage
from tiny_models import build, char_tokenizer, save_tiny_llama, write_text

TINY = ["--block-size", "24", "--batch-size", "4", "--report-to", "none", "--no-progress", "--lr", "1e-3",
        "--logging-steps", "1"]


class _StopAfterSave(TrainerCallback):
    """Interrupts training right after checkpoint-`step` is written (a killed run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


class World:
    """The files and folders the rows use, each built on first use (once per test process)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, name: str) -> Path:
        return self.root / name

    @functools.cached_property
    def model(self) -> str:
        return str(save_tiny_llama(self.root / "llama"))

    @functools.cached_property
    def text(self) -> str:
        return str(write_text(self.root / "text.txt"))

    @functools.cached_property
    def latin1(self) -> str:
        path = self.root / "latin1.txt"
        path.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e and more words\n".encode("latin-1") * 40)
        return str(path)

    @functools.cached_property
    def binary(self) -> str:
        path = self.root / "weights.bin"
        path.write_bytes(bytes(range(256)) * 8)
        return str(path)

    @functools.cached_property
    def jsonl_without_text(self) -> str:
        path = self.root / "docs.jsonl"
        path.write_text("\n".join(json.dumps({"body": f"document {i} about cats"}) for i in range(20)))
        return str(path)

    @functools.cached_property
    def sst2(self) -> Path:
        """A GLUE folder SST-2/{train,dev}.tsv in the GLUE layout."""
        folder = self.root / "glue" / "SST-2"
        folder.mkdir(parents=True)
        rows = ["a good film", "bad movie", "fun and warm", "dull", "great cast", "boring plot", "nice", "awful"]
        for split in ("train", "dev"):
            (folder / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in
                                                                             enumerate(rows * 3)))
        return folder.parent

    @functools.cached_property
    def sst2_latin1(self) -> str:
        path = self.root / "sst2_latin1.tsv"
        path.write_bytes("sentence\tlabel\ncaf\xe9 cr\xe8me\t1\n".encode("latin-1"))
        return str(path)

    @functools.cached_property
    def stage1(self) -> Path:
        """A finished stage-1 run (3 steps, a checkpoint every 2, lr 1e-3, target 0.5)."""
        out = self.root / "stage1"
        assert main(["train", "--model", self.model, "--task", "causal-lm", "--data", self.text, "--stage", "1",
                     "--out", str(out), "--max-steps", "3", "--save-steps", "2", "--target-sparsity", "0.5",
                     *TINY]) == 0
        return out

    @functools.cached_property
    def bert(self) -> str:
        """A tiny BERT classifier (2 labels) with its tokenizer, untrained."""
        folder = self.root / "bert"
        torch.manual_seed(0)
        tok = char_tokenizer()
        tf.BertForSequenceClassification(tf.BertConfig(
            vocab_size=len(tok), hidden_size=40, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, num_labels=2, pad_token_id=0)).save_pretrained(folder)
        tok.save_pretrained(folder)
        return str(folder)

    @functools.cached_property
    def bert_sst2(self) -> Path:
        """The tiny BERT fine-tuned (dense stage, 2 steps) on SST-2 with `lte train`."""
        out = self.root / "bert_sst2"
        assert main(["train", "--model", self.bert, "--task", "classification", "--glue-task", "SST-2", "--data",
                     str(self.sst2), "--stage", "dense", "--out", str(out), "--max-steps", "2", "--max-length", "32",
                     *TINY]) == 0
        return out

    def interrupted(self, name: str) -> Path:
        """A stage-1 run with lr 5e-3, killed right after its checkpoint-2 (a fresh copy each call)."""
        template = self.root / "interrupted"
        if not template.exists():
            with pytest.raises(KeyboardInterrupt):
                train_stage("1", self.model, "causal-lm", self.text, template, callbacks=[_StopAfterSave(2)],
                            max_steps=4, save_steps=2, block_size=24, batch_size=4, lr=5e-3, report_to="none",
                            progress=False, logging_steps=1)
        copy = self.root / name
        shutil.copytree(template, copy)
        return copy

    def copy_of(self, folder: Path, name: str) -> Path:
        shutil.copytree(folder, self.root / name)
        return self.root / name


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("newcomer"))


def run(*argv: str) -> int:
    """`lte ARGV` in this process; the exit code (argparse's exit included)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return int(stop.code or 0)


def python_error(call: Callable[[], object]) -> int:
    """Run a Python call; print its LTEError as the CLI would (exit code 2)."""
    try:
        call()
    except lte.LTEError as err:
        print(f"error: {err}")
        return 2
    return 0


def _train(w: World, *extra: str) -> int:
    return run("train", "--model", w.model, "--task", "causal-lm", "--stage", "dense", *TINY, *extra)


# ---------------------------------------------------------------------- the rows
def latin1_train(w: World) -> int:
    return _train(w, "--data", w.latin1, "--out", w.path("o-latin1"))


def binary_train(w: World) -> int:
    return _train(w, "--data", w.binary, "--out", w.path("o-binary"))


def latin1_classification(w: World) -> int:
    return run("train", "--model", w.bert, "--task", "classification", "--glue-task", "SST-2", "--data",
               w.sst2_latin1, "--stage", "dense", "--out", w.path("o-cls-latin1"), *TINY)


def latin1_eval(w: World) -> int:
    return run("eval", "--model", w.model, "--data", w.latin1)


def sparsity(value: str) -> Callable[[World], int]:
    def row(w: World) -> int:
        return run("train", "--model", w.model, "--task", "causal-lm", "--data", w.text, "--stage", "1",
                   f"--target-sparsity={value}", "--out", w.path("o-sparsity"), *TINY)
    return row


def sparsity_python(w: World) -> int:
    return python_error(lambda: train_stage("1", w.model, "causal-lm", w.text, w.path("o-py"), target_sparsity=1.5))


def stage2_target(w: World) -> int:
    out = w.path("o-stage2")
    code = run("train", "--model", w.stage1, "--task", "causal-lm", "--data", w.text, "--stage", "2",
               "--target-sparsity", "0.7", "--out", out, "--max-steps", "2", *TINY)
    record = json.loads((out / "lte_stage.json").read_text())
    calibration = record["tau_calibration"]
    print(f"stage 2 recut tau for target {record['target_sparsity']}: tau {calibration['tau']:.3f}, "
          f"held-out sparsity {calibration['sparsity']:.3f}")
    return code


def dense_target(w: World) -> int:
    return _train(w, "--data", w.text, "--target-sparsity", "0.5", "--out", w.path("o-dense-target"))


def rerun_finished(w: World) -> int:
    return run("train", "--model", w.model, "--task", "causal-lm", "--data", w.text, "--stage", "1", "--out",
               w.stage1, "--max-steps", "2", "--target-sparsity", "0.5", *TINY)


def rerun_with_overwrite(w: World) -> int:
    out = w.copy_of(w.stage1, "o-overwrite")
    (out / "checkpoint-40").mkdir()  # a stale checkpoint of the earlier run
    code = run("train", "--model", w.model, "--task", "causal-lm", "--data", w.text, "--stage", "1", "--out", out,
               "--max-steps", "2", "--overwrite", *TINY)
    print("checkpoints left:", sorted(p.name for p in out.glob("checkpoint-*")))
    return code


def resume_other_settings(w: World) -> int:
    out = w.interrupted("o-resume-other")
    return run("train", "--model", w.model, "--task", "causal-lm", "--data", w.text, "--stage", "1", "--out", out,
               "--max-steps", "4", "--resume", *TINY)  # lr 1e-3, the checkpoint's run had 5e-3


def eval_remembers_glue_task(w: World) -> int:
    return run("eval", "--model", w.bert_sst2, "--data", w.sst2, "--batch-size", "4")


def eval_two_data_files(w: World) -> int:
    other = w.path("other.txt")
    other.write_text(Path(w.text).read_text()[:3000])
    model = w.copy_of(Path(w.model), "o-eval-two")
    for data in (w.text, other):
        assert run("eval", "--model", model, "--data", data, "--max-tokens", "200", "--max-length", "32") == 0
    print("results kept:", sorted(p.name for p in model.glob("eval_*.json")))
    return 0


def finished_stage_keeps_no_checkpoint(w: World) -> int:
    print("checkpoints kept:", sorted(p.name for p in w.stage1.glob("checkpoint-*")))  # it wrote checkpoint-2, -3
    return 0


def demo_disk(w: World) -> int:
    from lte.cli.main import _disk_line

    run_dir = w.path("o-run")
    run_dir.mkdir()
    shutil.copytree(w.model, run_dir / "stage1")
    print(_disk_line(run_dir))
    return 0


def offline_hub_name(w: World, monkeypatch) -> int:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return run("eval", "--model", "google/gemma-3-270m", "--task", "causal-lm", "--data", w.text)


def unreachable_hub_name(w: World, monkeypatch) -> int:
    from lte import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    hub._answers.cache_clear()
    return run("train", "--model", "Qwen/Qwen2.5-Coder-0.5B", "--task", "causal-lm", "--data", w.text,
               "--stage", "dense", "--out", w.path("o-hub"))


def jsonl_without_text_field(w: World) -> int:
    return _train(w, "--data", w.jsonl_without_text, "--out", w.path("o-jsonl"))


def resume_says_where(w: World) -> int:
    out = w.interrupted("o-resume-line")
    return run("train", "--model", w.model, "--task", "causal-lm", "--data", w.text, "--stage", "1", "--out", out,
               "--max-steps", "4", "--save-steps", "2", "--resume", *TINY, "--lr", "5e-3")  # the run's own settings


def _saved_without_tokenizer(w: World, family: str, name: str) -> Path:
    folder = w.path(name)
    lte.get_lte_model(build(family), lte.LTEConfig(grouping="contiguous"), progress=False).save_pretrained(folder)
    return folder


def no_tokenizer_gemma3(w: World) -> int:
    return run("eval", "--model", _saved_without_tokenizer(w, "gemma3_text", "o-gemma3"), "--data", w.text)


def no_tokenizer_qwen2(w: World) -> int:
    return run("eval", "--model", _saved_without_tokenizer(w, "qwen2", "o-qwen2"), "--data", w.text)


def foreign_tokenizer(w: World) -> int:
    folder = _saved_without_tokenizer(w, "llama", "o-foreign")
    tf.AutoTokenizer.from_pretrained(w.model).save_pretrained(folder)  # 103 tokens, vocabulary ...
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 262_144  # ... of a Gemma-3-sized model
    (folder / "config.json").write_text(json.dumps(config))
    return run("eval", "--model", folder, "--data", w.text)


def large_vocabulary_eval(w: World) -> int:
    from lte.evaluation import perplexity
    from lte.evaluation._common import LOGIT_CHUNK

    vocab = 262_144
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=40,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                               max_position_embeddings=256)).eval()
    sizes: list[int] = []
    model.lm_head.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel()))
    ids = torch.randint(0, vocab, (2 * 128,), generator=torch.Generator().manual_seed(0))
    perplexity(model, ids, max_length=128, stride=128, batch_size=2, progress=False)
    print(f"largest logits block: {max(sizes)} values (full batch: {2 * 128 * vocab}; bound {LOGIT_CHUNK})")
    return 0 if max(sizes) <= LOGIT_CHUNK else 1


@dataclasses.dataclass
class Row:
    what: str  # what the user did (the words)
    run: Callable  # (world[, monkeypatch]) -> exit code; prints go to the captured output
    code: int  # the exit code the user now gets
    says: str  # a regular expression the output (stdout + stderr) must match


ROWS = [
    Row("Latin-1 text file as --data (causal-lm)", latin1_train, 2,
        r"'.*latin1.txt' is not UTF-8 text: byte 0xe9 on line 1 cannot be decoded\. Convert the file to UTF-8"),
    Row("binary file as --data (causal-lm)", binary_train, 2,
        r"'.*weights.bin' is a binary file, not text \(it holds NUL bytes\); pass a UTF-8 text file"),
    Row("Latin-1 TSV as --data (classification)", latin1_classification, 2, r"is not UTF-8 text: byte 0xe9 on line 2"),
    Row("Latin-1 text file as lte eval --data", latin1_eval, 2, r"latin1.txt' is not UTF-8 text"),
    *[Row(f"--target-sparsity {v}", sparsity(v), 2,
          rf"argument --target-sparsity: target_sparsity must be in \[0, 1\) \(the fraction of FFN neurons each token "
          rf"skips: 0.5 skips half\), got {re.escape(shown)}")
      for v, shown in (("1.5", "1.5"), ("-0.2", "-0.2"), ("1.0", "1"))],
    Row("target_sparsity=1.5 from Python", sparsity_python, 2, r"error: target_sparsity must be in \[0, 1\)"),
    Row("--target-sparsity 0.7 with --stage 2: honoured", stage2_target, 0,
        r"stage 2 recut tau for target 0.7: tau 0\.\d{3}, held-out sparsity 0\.[67]\d\d"),
    Row("--target-sparsity with --stage dense: refused", dense_target, 2,
        r"--target-sparsity applies to stages 1 and 2 \(the dense stage skips no neuron\); drop it for --stage dense"),
    Row("re-ran a finished stage into the same --out", rerun_finished, 2,
        r"already holds a finished stage1 run with other settings \(max_steps 3 -> 2\); pass --overwrite to replace it"),
    Row("... with --overwrite: the stale checkpoint goes too", rerun_with_overwrite, 0,
        r"--overwrite: cleared the earlier stage1 run .*\n(.|\n)*checkpoints left: \[\]"),
    Row("--resume on a checkpoint written with other flags", resume_other_settings, 2,
        r"--resume: .*checkpoint-2 was written by a run with other settings: lr 0.005 -> 0.001\. Resume with the "
        r"same settings, or pass --overwrite to start over"),
    Row("lte eval of a model trained on SST-2, without --task/--glue-task", eval_remembers_glue_task, 0,
        r"accuracy: \d\.\d{4} .*\n\[lte eval\] wrote .*eval_classification_glue_[0-9a-f]{8}\.json"),
    Row("lte eval of one model on two data files", eval_two_data_files, 0,
        r"results kept: \['eval_causal-lm_other_[0-9a-f]{8}\.json', 'eval_causal-lm_text_[0-9a-f]{8}\.json'\]"),
    Row("the demo's disk: a finished stage keeps no checkpoint-N", finished_stage_keeps_no_checkpoint, 0,
        r"checkpoints kept: \[\]"),
    Row("the demo says how much disk it uses", demo_disk, 0,
        r"disk: +0\.\d\d GB in .*o-run \(stage1 0\.\d\d GB; final models only, no checkpoints\)"),
    Row("an offline hub name (HF_HUB_OFFLINE set)", offline_hub_name, 2,
        r"'google/gemma-3-270m' is not a local model folder nor an embedded model, and as a hub name it cannot be "
        r"fetched: HF_HUB_OFFLINE is set and it is not in the local hub cache"),
    Row("a hub name with no network", unreachable_hub_name, 2,
        r"as a hub name it cannot be fetched: http://127.0.0.1:9 does not answer \(no network\?\)"),
    Row("JSONL without a text field", jsonl_without_text_field, 2,
        r"missing field\(s\) \['text'\]; found fields \['body'\]\. Name the field that holds the text with "
        r"--text-field FIELD"),
    Row("--resume says which checkpoint it continues from", resume_says_where, 0,
        r"\[lte\] stage1: resuming from .*o-resume-line/checkpoint-2 \(its settings match .*lte_stage.json\)"),
    Row("lte eval of a Gemma-3 LTE save without tokenizer files", no_tokenizer_gemma3, 2,
        r"holds no tokenizer \(no tokenizer.json / tokenizer_config.json / vocab file\) and does not record the model "
        r"it came from: save the tokenizer into it"),
    Row("lte eval of a Qwen2 LTE save without tokenizer files", no_tokenizer_qwen2, 2, r"holds no tokenizer"),
    Row("a tokenizer that does not fit the model's vocabulary", foreign_tokenizer, 2,
        r"the tokenizer for '.*o-foreign' has 103 tokens but the model's vocabulary has 262144: it is not this "
        r"model's tokenizer"),
    Row("evaluating a 262k-vocabulary model", large_vocabulary_eval, 0,
        r"largest logits block: \d+ values \(full batch: 67108864; bound 16777216\)"),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.what for r in ROWS])
def test_newcomer_row(row: Row, world: World, capsys, monkeypatch):
    takes_monkeypatch = row.run.__code__.co_argcount == 2
    code = row.run(world, monkeypatch) if takes_monkeypatch else row.run(world)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert code == row.code, output
    assert re.search(row.says, output), output
    if row.code == 2:  # a refusal is one line (what is wrong and what to do), the last, and no traceback
        errors = [line for line in output.splitlines() if "error:" in line]
        assert "Traceback" not in output and len(errors) == 1 and errors[0] == output.strip().splitlines()[-1]
        assert re.search(row.says, errors[0]), errors[0]


def test_settings_give_the_same_message_in_python_and_on_the_command_line(capsys):
    with pytest.raises(lte.LTEError) as err:
        TrainArgs(target_sparsity=-0.2)
    assert run("train", "--target-sparsity=-0.2") == 2
    assert str(err.value) in capsys.readouterr().err
