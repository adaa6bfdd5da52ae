"""Data loaders: packing, GLUE TSVs, instructions, eval sets, collation, and their error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lte.data import (
    DataError,
    MCExample,
    builtin_text,
    load_e2e,
    load_glue,
    load_instructions,
    load_mcqa,
    load_mmlu,
    load_text_lm,
    load_xsum,
    pad_collate,
)
from lte.errors import LTEError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data is absent")

WORDS = ("the cat dog sat on a mat it is good bad movie fun one two three four five six seven eight nine "
         "ten yes no . , ? question answer").split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in code: ids 0 pad, 1 unk, 2 eos, then WORDS."""
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- causal LM text
def test_builtin_text_is_real_prose():
    text = builtin_text()
    assert len(text) > 100_000 and "the" in text.split()


def test_text_packing(tmp_path, tok):
    words = " ".join(WORDS[i % len(WORDS)] for i in range(103))  # 103 tokens
    ds = load_text_lm(write(tmp_path / "a.txt", words), tok, block_size=10)
    assert len(ds) == 10 and ds.num_tokens == 100
    item = ds[3]
    assert item["input_ids"].shape == (10,)
    assert torch.equal(item["labels"], item["input_ids"]) and item["attention_mask"].all()
    assert torch.equal(item["input_ids"], ds.token_ids[30:40])

    padded = load_text_lm(tmp_path / "a.txt", tok, block_size=10, pad_to_block=True)
    assert len(padded) == 11
    last = padded[10]
    assert last["attention_mask"].tolist() == [1, 1, 1] + [0] * 7
    assert last["labels"][3:].eq(-100).all() and last["input_ids"][3:].eq(tok.pad_token_id).all()

    assert len(load_text_lm(tmp_path / "a.txt", tok, block_size=10, max_tokens=35)) == 3
    train, evaluation = load_text_lm(tmp_path / "a.txt", tok, block_size=10, split_ratio=0.2)
    assert (len(train), len(evaluation)) == (8, 2)
    assert torch.equal(evaluation[0]["input_ids"], ds[8]["input_ids"])


def test_jsonl_documents_are_joined_with_eos(tmp_path, tok):
    path = write(tmp_path / "d.jsonl", '{"text": "the cat"}\n\n{"text": "a dog sat"}\n')
    ds = load_text_lm(path, tok, block_size=2)
    assert ds.token_ids.tolist() == tok("the cat [EOS] a dog sat [EOS]", add_special_tokens=False)["input_ids"]
    other = write(tmp_path / "o.json", json.dumps([{"body": "the cat sat on a mat"}]))
    assert len(load_text_lm(other, tok, block_size=3, text_field="body")) == 2


def test_a_list_of_sources_is_a_mix_in_order(tmp_path, tok):
    a, b = write(tmp_path / "a.txt", "the cat sat"), write(tmp_path / "b.jsonl", '{"text": "a dog"}\n')
    ds = load_text_lm([a, b], tok, block_size=2)  # each source is a document: joined with the eos token
    assert ds.token_ids.tolist() == tok("the cat sat [EOS] a dog [EOS]", add_special_tokens=False)["input_ids"]
    train, held = load_text_lm([b, a], tok, block_size=2, split_ratio=0.3)
    assert tok.decode(held.token_ids).endswith("sat [EOS]")  # the held-out tail is the last source's
    with pytest.raises(DataError, match="empty list"):
        load_text_lm([], tok)
    with pytest.raises(DataError, match="not found: .*nope.txt"):
        load_text_lm([a, tmp_path / "nope.txt"], tok)


def test_text_errors(tmp_path, tok):
    with pytest.raises(DataError, match="not found: .*nope.txt"):
        load_text_lm(tmp_path / "nope.txt", tok)
    with pytest.raises(DataError, match="empty"):
        load_text_lm(write(tmp_path / "e.txt", "  \n"), tok)
    with pytest.raises(DataError, match="line 2"):
        load_text_lm(write(tmp_path / "m.jsonl", '{"text": "a"}\n{"text": \n'), tok)
    with pytest.raises(DataError, match=r"missing field.*\['body'\]"):
        load_text_lm(write(tmp_path / "f.jsonl", '{"body": "a"}\n'), tok)
    with pytest.raises(DataError, match="fewer than one block"):
        load_text_lm(write(tmp_path / "s.txt", "the cat"), tok, block_size=64)
    assert issubclass(DataError, LTEError) and issubclass(DataError, ValueError)


# ---------------------------------------------------------------- GLUE
def test_glue_single_and_pair(tmp_path, tok):
    write(tmp_path / "train.tsv", "sentence\tlabel\nthe movie is good \t1\nbad movie\t0\n")
    ds = load_glue("SST-2", tmp_path, tok, split="train")
    assert (len(ds), ds.num_labels, ds.is_regression, ds.metric) == (2, 2, False, "accuracy")
    assert ds[0]["input_ids"].tolist() == tok("the movie is good")["input_ids"]
    assert ds[1]["labels"].item() == 0 and ds[1]["labels"].dtype == torch.long

    sts = write(tmp_path / "sts.tsv", "index\tsentence1\tsentence2\tscore\n0\tthe cat\ta cat\t4.5\n1\tone\ttwo\t0.25\n")
    ds = load_glue("stsb", sts, tok)
    assert ds.is_regression and ds.num_labels == 1 and ds.metric == "pearson"
    assert ds.labels == [4.5, 0.25] and ds[0]["labels"].dtype == torch.float32
    assert ds.texts[1] == ("one", "two")

    rte = write(tmp_path / "rte.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tnot_entailment\n1\ta\tb\tentailment\n")
    assert load_glue("rte", rte, tok).labels == [1, 0]


def test_glue_cola_has_no_header(tmp_path, tok):
    cola = write(tmp_path / "cola.tsv", 'gj04\t1\t\tthe cat sat " on .\ngj04\t0\t*\tcat the\n')
    ds = load_glue("cola", cola, tok, max_examples=5)
    assert ds.labels == [1, 0] and ds.texts[0] == ('the cat sat " on .',) and ds.metric == "matthews"
    with pytest.raises(DataError, match="header"):
        load_glue("cola", write(tmp_path / "h.tsv", "sentence\tlabel\tx\tthe cat\n"), tok)


def test_glue_errors(tmp_path, tok):
    with pytest.raises(DataError, match=r"unknown GLUE task 'sst3'.*'cola'"):
        load_glue("sst3", tmp_path, tok)
    with pytest.raises(DataError, match=r"found columns \['text', 'label'\]"):
        load_glue("sst2", write(tmp_path / "c.tsv", "text\tlabel\nthe cat\t1\n"), tok)
    with pytest.raises(DataError, match="line 3"):
        load_glue("sst2", write(tmp_path / "b.tsv", "sentence\tlabel\nthe cat\t1\nthe dog\tmaybe\n"), tok)
    with pytest.raises(DataError, match="line 2: 1 tab-separated"):
        load_glue("rte", write(tmp_path / "r.tsv", "index\tsentence1\tsentence2\tlabel\nonly-one-field\n"), tok)
    with pytest.raises(DataError, match="no dev file for SST-2"):
        load_glue("sst2", tmp_path, tok, split="dev")
    with pytest.raises(DataError, match="not found"):
        load_glue("sst2", tmp_path / "missing", tok)
    with pytest.raises(DataError, match="empty"):
        load_glue("sst2", write(tmp_path / "e.tsv", "\n"), tok)


@needs_data
@pytest.mark.parametrize("task,split,count,num_labels", [
    ("sst2", "dev", 872, 2), ("cola", "train", 8551, 2), ("cola", "dev", 1043, 2), ("mrpc", "train", 3667, 2),
    ("mrpc", "dev", 408, 2), ("rte", "dev", 277, 2), ("stsb", "dev", 1500, 1), ("wnli", "train", 635, 2),
    ("qnli", "dev", 5463, 2),
])
def test_glue_real_files(tok, task, split, count, num_labels):
    ds = load_glue(task, DATA / "glue", tok, split=split, max_length=32)
    assert len(ds) == count and ds.num_labels == num_labels
    assert all(len(f["input_ids"]) <= 32 for f in ds.features)
    if not ds.is_regression:
        assert set(ds.labels) == {0, 1}


# ---------------------------------------------------------------- instructions
def test_instructions_mask_the_prompt(tmp_path, tok):
    rows = [{"instruction": "question ?", "input": "the cat", "output": "yes ."},
            {"instruction": "one two", "output": "three"}]
    path = write(tmp_path / "a.json", json.dumps(rows))
    ds = load_instructions(path, tok, max_length=64)
    assert len(ds) == 2
    prompt, answer = ds.records[0]
    assert "the cat" in prompt and answer == "yes ."
    n_prompt = len(tok(prompt)["input_ids"])
    item = ds[0]
    assert item["labels"][:n_prompt].eq(-100).all()
    assert item["labels"][n_prompt:].tolist() == tok("yes .", add_special_tokens=False)["input_ids"] + [2]
    assert torch.equal(item["labels"][n_prompt:], item["input_ids"][n_prompt:])
    assert "Input" not in ds.records[1][0]  # no input block when the input is absent

    with pytest.warns(UserWarning, match="dropped"):
        short = load_instructions(path, tok, max_length=n_prompt)
    assert len(short) == 1
    with pytest.raises(DataError, match=r"missing field.*\['output'\]"):
        load_instructions(write(tmp_path / "b.jsonl", '{"instruction": "a", "answer": "b"}\n'), tok)


@needs_data
def test_alpaca_real(tok):
    ds = load_instructions(DATA / "alpaca" / "alpaca_5000.json", tok, max_length=128, max_examples=50)
    assert len(ds) == 50 and all((ds[i]["labels"] != -100).any() for i in range(len(ds)))


# ---------------------------------------------------------------- collation
def test_pad_collate(tok):
    items = [{"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [5, 6, 7]},
             {"input_ids": torch.tensor([8]), "attention_mask": [1], "labels": [8]}]
    batch = pad_collate(tok)(items)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, -100, -100]]
    left = pad_collate(pad_token_id=9, padding_side="left")(items)
    assert left["input_ids"][1].tolist() == [9, 9, 8] and left["labels"][1].tolist() == [-100, -100, 8]
    scalars = pad_collate(tok)([{"input_ids": [1], "labels": torch.tensor(0.5)}, {"input_ids": [1, 2], "labels": torch.tensor(1.0)}])
    assert scalars["labels"].dtype == torch.float32 and scalars["labels"].tolist() == [0.5, 1.0]


def test_calibration_batch_first_or_spread_over_the_training_part(tok):
    """Example i is [i + 3]: the batch's first column says which examples were picked."""
    from lte.training.data import calibration_batch, spread_indices

    ds = [{"input_ids": [i + 3], "attention_mask": [1], "labels": [i + 3]} for i in range(25)]
    first = calibration_batch(ds, tok, 4)
    assert (first["input_ids"][:, 0] - 3).tolist() == [0, 1, 2, 3]
    # 25 examples, the last 5 held out (at most a fifth): 4 picked from the first 20, every 5th
    spread = calibration_batch(ds, tok, 4, sample="spread", holdout=8)
    assert (spread["input_ids"][:, 0] - 3).tolist() == [0, 5, 10, 15]
    assert spread_indices(20, 3) == [0, 6, 13] and spread_indices(3, 8) == [0, 1, 2]
    with pytest.raises(LTEError, match="calibration_sample"):
        calibration_batch(ds, tok, 4, sample="random")


def test_examples_for_tokens_by_hand(tok):
    """Examples of 3, 5, 2, 4, 6, 1, 7, 2 tokens (30 in all; masks say how many are real)."""
    from lte.training import TrainArgs
    from lte.training.data import examples_for_tokens
    from lte.training.stages import _calibration_batch

    lengths = [3, 5, 2, 4, 6, 1, 7, 2]
    ds = [{"input_ids": [i + 3] * 7, "attention_mask": [1] * n + [0] * (7 - n)} for i, n in enumerate(lengths)]
    assert [examples_for_tokens(ds, t) for t in (1, 8, 9, 30, 100)] == [1, 2, 3, 8, 8]  # 3+5 = 8; 3+5+2 = 10
    # spread: ceil(8 / 3.75) = 3 examples [0, 2, 5] hold 3+2+1 = 6 < 8; 4 examples [0, 2, 4, 6] hold 18
    assert examples_for_tokens(ds, 8, sample="spread") == 4
    # the tau hold-out takes the last example (a fifth of 8 is 1): 7 usable, 28 tokens; ceil(10 / 4) = 3
    # examples [0, 2, 4] hold 3+2+6 = 11
    assert examples_for_tokens(ds, 10, sample="spread", holdout=2) == 3
    assert examples_for_tokens(ds, 1000, sample="spread", holdout=2) == 7
    no_mask = [{"input_ids": list(range(n))} for n in lengths]  # lengths of the ids themselves
    assert examples_for_tokens(no_mask, 9) == 3
    batch = _calibration_batch(ds, tok, TrainArgs(calibration_tokens=9, batch_size=2))
    assert (batch["input_ids"][:, 0] - 3).tolist() == [0, 1, 2]
    batch = _calibration_batch(ds, tok, TrainArgs(calibration_tokens=1, batch_size=2))  # at least a batch
    assert batch["input_ids"].shape[0] == 2
    assert _calibration_batch(ds, tok, TrainArgs(batch_size=2))["input_ids"].shape[0] == 8  # 32 examples: all 8


# ---------------------------------------------------------------- generation and multiple-choice data
def test_xsum_e2e(tmp_path):
    xsum = write(tmp_path / "x.jsonl", '{"id": 1, "document": " An article. ", "summary": "Short."}\n')
    assert load_xsum(xsum) == [("An article.", "Short.")]
    with pytest.raises(DataError, match="found fields"):
        load_xsum(write(tmp_path / "y.jsonl", '{"doc": "a"}\n'))
    e2e = write(tmp_path / "e.txt", "name : A||ref one\nname : A||ref two\nname : B||ref three\n")
    assert load_e2e(e2e) == [("name : A", "ref one"), ("name : A", "ref two"), ("name : B", "ref three")]
    assert load_e2e(e2e, group=True) == [("name : A", ["ref one", "ref two"]), ("name : B", ["ref three"])]
    with pytest.raises(DataError, match="line 2"):
        load_e2e(write(tmp_path / "bad.txt", "a||b\nno separator\n"))


def test_mcqa_parsing(tmp_path):
    rows = [{"question": "q1", "options": "\nA. red\nB. blue", "answer": "B. blue"},
            {"question": "q2", "options": "A. x\nB. y\nC. z", "answer": "A"},
            {"question": "is it", "passage": "Some text.", "answer": "True"}]
    examples = load_mcqa(write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert examples[0] == MCExample("Question: q1\nAnswer:", [" red", " blue"], 1)
    assert examples[1].answer == 0 and len(examples[1].choices) == 3
    assert examples[2].choices == [" no", " yes"] and examples[2].answer == 1
    assert examples[2].prompt.startswith("Some text.\nQuestion: is it?")
    with pytest.raises(DataError, match="record 1: answer 'D'"):
        load_mcqa(write(tmp_path / "b.jsonl", json.dumps({"question": "q", "options": "A. a\nB. b", "answer": "D"})))


def test_mmlu_layout(tmp_path):
    for split in ("dev", "test"):
        (tmp_path / split).mkdir()
    header = "question,choice0,choice1,choice2,choice3,answer\n"
    write(tmp_path / "dev" / "math_dev.csv", header + "1+1?,1,2,3,4,1\n2+2?,1,2,3,4,3\n")
    write(tmp_path / "test" / "math_test.csv", header + '"3,+3?",6,5,4,3,0\n')
    (example,) = load_mmlu(tmp_path, num_shots=2)
    assert example.choices == [" A", " B", " C", " D"] and example.answer == 0 and example.subject == "math"
    assert example.prompt.startswith("The following are multiple choice questions (with answers) about math.")
    assert "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n2+2?" in example.prompt
    assert example.prompt.endswith("3,+3?\nA. 6\nB. 5\nC. 4\nD. 3\nAnswer:")
    assert "Answer: B" not in load_mmlu(tmp_path, num_shots=0)[0].prompt
    with pytest.raises(DataError, match=r"unknown MMLU subject.*\['math'\]"):
        load_mmlu(tmp_path, subjects=["physics"])


@needs_data
def test_eval_sets_real():
    assert len(load_xsum(DATA / "xsum" / "test.jsonl")) == 1000
    assert len(load_e2e(DATA / "e2e" / "valid.txt", group=True)) > 400
    counts = {"piqa_validation": 1500, "boolq_dev": 3270, "csqa_validation": 1221, "obqa_test": 500, "siqa_test": 1954}
    for name, count in counts.items():
        examples = load_mcqa(DATA / "mcqa" / f"{name}.jsonl")
        assert len(examples) == count
        assert all(0 <= ex.answer < len(ex.choices) for ex in examples)
    mmlu = load_mmlu(DATA / "mmlu", num_shots=5)
    assert len(mmlu) == 14042 and len({ex.subject for ex in mmlu}) == 57
    assert mmlu[0].prompt.count("\nAnswer:") == 6
