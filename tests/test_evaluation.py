"""Evaluators: metrics against hand-computed values, perplexity against a direct NLL, GLUE, ROUGE-L,
multiple choice, plots; with plain tiny HF models and LTEModel wrappers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import lte
from lte.data import MCExample, lm_dataset_from_text, load_glue
from lte.evaluation import (
    accuracy,
    evaluate_generation,
    evaluate_glue,
    f1_binary,
    matthews_corrcoef,
    multiple_choice_accuracy,
    pearson,
    perplexity,
    plot_layer_sparsity,
    plot_tradeoff,
    ranks,
    rouge_l,
    sliding_windows,
    spearman,
)

WORDS = "the cat dog sat on a mat it is good bad movie fun yes no red blue green . ?".split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


TOK = tiny_tokenizer()
VOCAB = len(TOK)


def tiny_llama(seed: int = 0) -> tf.LlamaForCausalLM:
    """Hidden 48, FFN 72 (2 experts of 32 + one of 8), 2 layers."""
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    return tf.LlamaForCausalLM(cfg).eval()


def tiny_bert(num_labels: int = 2, seed: int = 0) -> tf.BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=VOCAB, hidden_size=40, intermediate_size=70, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tf.BertForSequenceClassification(cfg).eval()


# ---------------------------------------------------------------- metrics
def test_classification_metrics_by_hand():
    preds, labels = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP 2, FP 1, FN 1, TN 1
    assert accuracy(preds, labels) == pytest.approx(0.6)
    assert f1_binary(preds, labels) == pytest.approx(4 / 6)
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 1 - 1 * 1) / math.sqrt(3 * 3 * 2 * 2))
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # undefined -> 0
    assert f1_binary([0, 0], [0, 0]) == 0.0
    with pytest.raises(ValueError, match="length"):
        accuracy([1], [1, 0])


def test_correlations_by_hand():
    x, y = [1.0, 2.0, 3.0], [2.0, 4.0, 7.0]
    # means 2 and 13/3; cov 5; var_x 2; var_y 38/3
    assert pearson(x, y) == pytest.approx(5 / math.sqrt(2 * 38 / 3))
    assert ranks([10, 20, 20, 5]) == [2.0, 3.5, 3.5, 1.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 2, 3], [3, 2, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1], [1, 2]) == 0.0


def test_metrics_match_published_values():
    """Values printed in the scikit-learn and SciPy documentation for these inputs."""
    assert matthews_corrcoef([1, -1, 1, 1], [1, 1, 1, -1]) == pytest.approx(-1 / 3)  # sklearn's example
    assert pearson([1, 2, 3, 4, 5], [10, 9, 2.5, 6, 4]) == pytest.approx(-0.7426106572325057)  # scipy's example
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)  # scipy's example
    # accuracy: 2 of 4 right; F1 of class 1 with TP 1, FP 0, FN 1: 2/3
    assert accuracy([0, 2, 1, 3], [0, 1, 2, 3]) == pytest.approx(0.5)
    assert f1_binary([0, 1, 0, 0], [0, 1, 1, 0]) == pytest.approx(2 / 3)


def test_rouge_l_by_hand():
    assert rouge_l(["the cat sat"], ["the cat sat"])["rougeL"] == pytest.approx(100.0)
    scores = rouge_l(["the cat sat"], ["the cat sat on the mat"])  # LCS 3: P 1, R 0.5
    assert scores["rougeL_precision"] == pytest.approx(100.0)
    assert scores["rougeL_recall"] == pytest.approx(50.0)
    assert scores["rougeL"] == pytest.approx(200 / 3)
    both = rouge_l(["the cat sat", "a dog"], ["the cat sat on the mat", "a dog"])  # F1 2/3 and 1, in order
    assert both["rougeL_per_example"] == pytest.approx([200 / 3, 100.0])
    assert both["rougeL"] == pytest.approx((200 / 3 + 100) / 2)
    assert rouge_l(["dogs run"], [["cats sleep", "dogs run"]])["rougeL"] == pytest.approx(100.0)  # best reference
    with pytest.raises(ValueError, match="references"):
        rouge_l(["a"], [])


# ---------------------------------------------------------------- perplexity
def direct_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-token NLL of ids[1:] given everything before, in one forward."""
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0]
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none")


def test_sliding_windows_score_every_token_once():
    for n, length, stride in [(50, 16, 8), (50, 16, 16), (7, 16, 4), (33, 10, 3)]:
        windows = sliding_windows(n, length, stride)
        assert sum(t for _, _, t in windows) == n
        assert all(end - begin <= length and t <= end - begin for begin, end, t in windows)
        assert windows[-1][1] == n


def test_perplexity_equals_exp_mean_nll():
    model = tiny_llama()
    ids = torch.randint(3, VOCAB, (50,), generator=torch.Generator().manual_seed(1))
    full = perplexity(model, ids, max_length=64, progress=False)
    assert full["tokens"] == 49
    assert full["perplexity"] == pytest.approx(math.exp(direct_nll(model, ids).mean().item()), rel=1e-5)
    # non-overlapping windows: each chunk scored on its own
    chunks = perplexity(model, ids, max_length=16, stride=16, batch_size=3, progress=False)
    nll = torch.cat([direct_nll(model, ids[i : i + 16]) for i in range(0, 50, 16)])
    assert chunks["tokens"] == nll.numel() == 46
    assert chunks["perplexity"] == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    # overlapping windows: batching (with a padded short last window) changes nothing
    one = perplexity(model, ids, max_length=16, stride=5, batch_size=1, progress=False)
    many = perplexity(model, ids, max_length=16, stride=5, batch_size=4, progress=False)
    assert one["tokens"] == 49 and one["perplexity"] == pytest.approx(many["perplexity"], rel=1e-5)
    assert full["ffn_sparsity"] == 0.0 and full["gflops_per_token"] > 0


def test_perplexity_from_text_and_dataset():
    model = tiny_llama()
    text = " ".join(WORDS * 4)
    ds = lm_dataset_from_text(text, TOK, block_size=8)
    a = perplexity(model, TOK, text, max_length=32, stride=16, progress=False)
    b = perplexity(model, ds, max_length=32, stride=16, progress=False)
    assert a["perplexity"] == pytest.approx(b["perplexity"]) and a["tokens"] == len(ds.token_ids) - 1
    with pytest.raises(ValueError, match="text"):
        perplexity(model, TOK, progress=False)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [5], progress=False)


def test_perplexity_reports_lte_stats():
    base = tiny_llama()
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(2))
    dense = perplexity(base, ids, max_length=64, progress=False)
    lmodel = lte.get_lte_model(base, lte.LTEConfig(expert_size=32), progress=False)
    lmodel.set_routing("dense")
    same = perplexity(lmodel, ids, max_length=64, progress=False)
    assert same["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4)
    lmodel.set_routing("hard")
    hard = perplexity(lmodel, ids, max_length=64, progress=False)
    assert len(hard["per_layer_sparsity"]) == 2 and 0.0 <= hard["ffn_sparsity"] <= 1.0
    assert hard["ffn_sparsity"] == pytest.approx(sum(hard["per_layer_sparsity"]) / 2)
    assert hard["gflops_per_token"] <= hard["dense_gflops_per_token"] + 1e-3


DECODERS = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "opt", "gpt_neox")


@pytest.mark.parametrize("family", DECODERS)
def test_chunked_scores_equal_full_logits(family, monkeypatch):
    """Scoring from chunks of selected logits gives the NLL of the model's own full logits (every family,
    Gemma's soft-capped logits included), for a plain model and its LTE version in hard routing."""
    from lte.evaluation import _common
    from tiny_models import VOCAB as V
    from tiny_models import batch, build

    monkeypatch.setattr(_common, "LOGIT_CHUNK", 3 * V)  # three rows a chunk: many chunks per batch
    inputs = batch(seed=3, batch_size=3, length=9)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[1, :4] = -100  # a prompt that is not scored
    base = build(family)
    for model in (base, lte.get_lte_model(build(family), lte.LTEConfig(grouping="contiguous"), progress=False)):
        if hasattr(model, "set_routing"):
            model.set_routing("hard")
        with torch.no_grad():
            logits = model(**inputs).logits
            want = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                                   reduction="sum")
            got, count = _common.selected_nll(model, inputs["input_ids"], inputs["attention_mask"], labels)
        assert count == int((labels[:, 1:] != -100).sum())
        assert got == pytest.approx(float(want), rel=1e-5)


# ---------------------------------------------------------------- GLUE
def write_sst(tmp_path):
    rows = ["the movie is good", "bad movie", "it is fun", "the cat sat on a mat", "no", "good good . ?", "red"]
    lines = ["sentence\tlabel"] + [f"{r}\t{i % 2}" for i, r in enumerate(rows)]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_evaluate_glue_matches_direct_predictions(tmp_path):
    ds = load_glue("sst2", write_sst(tmp_path), TOK)
    model = tiny_bert()
    result = evaluate_glue(model, ds, batch_size=3, progress=False)
    with torch.no_grad():
        preds = [int(model(**{k: v[None] for k, v in ds[i].items() if k != "labels"}).logits.argmax()) for i in range(len(ds))]
    assert result["accuracy"] == pytest.approx(accuracy(preds, ds.labels))
    assert result["examples"] == 7 and result["metric"] == "accuracy" and result["score"] == result["accuracy"]
    with pytest.raises(ValueError, match="num_labels=2"):
        evaluate_glue(tiny_bert(num_labels=3), ds, progress=False)


def test_evaluate_glue_regression_and_lte(tmp_path):
    path = tmp_path / "sts.tsv"
    path.write_text("index\tsentence1\tsentence2\tscore\n" + "".join(
        f"{i}\tthe cat {w}\ta dog\t{i * 0.7:.2f}\n" for i, w in enumerate(["sat", "is", "good", "bad", "fun"])))
    ds = load_glue("stsb", path, TOK)
    result = evaluate_glue(tiny_bert(num_labels=1), ds, progress=False)
    assert {"pearson", "spearman", "score"} <= set(result) and -1 <= result["pearson"] <= 1
    mrpc_model = lte.get_lte_model(tiny_bert(), lte.LTEConfig(expert_size=32), progress=False)
    mrpc_model.set_routing("hard")
    sst = evaluate_glue(mrpc_model, load_glue("sst2", write_sst(tmp_path), TOK), progress=False)
    assert sst["routing"] == "hard" and len(sst["per_layer_sparsity"]) == 2


# ---------------------------------------------------------------- generation
def test_evaluate_generation_runs_greedy(tmp_path):
    model = tiny_llama()
    pairs = [("the cat", "sat on a mat"), ("a dog is", "good"), ("it", ["fun", "bad"])]
    result = evaluate_generation(model, TOK, pairs, "{source} ?", max_new_tokens=5, batch_size=2, progress=False)
    assert result["count"] == 3 and 0.0 <= result["rougeL"] <= 100.0
    assert len(result["samples"]) == 3 and result["ffn_sparsity"] == 0.0
    # greedy output of a batch equals unbatched greedy output (left padding is right)
    single = evaluate_generation(model, TOK, pairs[:1], "{source} ?", max_new_tokens=5, batch_size=1, progress=False)
    assert single["samples"][0]["prediction"] == result["samples"][0]["prediction"]
    lmodel = lte.get_lte_model(model, lte.LTEConfig(expert_size=32), progress=False)
    lmodel.set_routing("hard")
    sparse = evaluate_generation(lmodel, TOK, pairs, "{source}", max_new_tokens=3, batch_size=3, progress=False)
    assert sparse["routing"] == "hard" and len(sparse["per_layer_sparsity"]) == 2
    with pytest.raises(ValueError, match="source"):
        evaluate_generation(model, TOK, pairs, "no placeholder", progress=False)


# ---------------------------------------------------------------- multiple choice
def choice_logliks(model, prompt: str, choices: list[str]) -> list[float]:
    """Direct log-likelihood of each continuation, one forward per choice."""
    out = []
    ctx = TOK(prompt)["input_ids"]
    for choice in choices:
        cont = TOK(choice, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(ctx + cont)
        out.append(-direct_nll(model, ids)[len(ctx) - 1 :].sum().item())
    return out


@pytest.mark.parametrize("choices", [[" red", " blue", " green"], [" the cat sat", " a dog", " it is fun ."]])
def test_multiple_choice_picks_max_loglik(choices):
    model = tiny_llama()
    prompts = ["the cat is", "a dog sat on", "it is good ?", "movie"]
    best = [max(range(3), key=choice_logliks(model, p, choices).__getitem__) for p in prompts]
    right = [MCExample(p, choices, b) for p, b in zip(prompts, best)]
    wrong = [MCExample(p, choices, (b + 1) % 3) for p, b in zip(prompts, best)]
    assert multiple_choice_accuracy(model, TOK, right, batch_size=3, progress=False)["accuracy"] == 1.0
    assert multiple_choice_accuracy(model, TOK, wrong, batch_size=2, progress=False)["accuracy"] == 0.0


def test_multiple_choice_few_shot_and_subjects():
    model = tiny_llama()
    shots = [MCExample("the cat is", [" red", " blue"], 1)]
    examples = [MCExample("a dog is", [" red", " blue"], 0, subject="x"),
                {"prompt": "it is", "choices": [" red", " blue"], "answer": 1, "subject": "y"}]
    result = multiple_choice_accuracy(model, TOK, examples, few_shot_examples=shots, progress=False)
    assert set(result["per_subject"]) == {"x", "y"} and result["count"] == 2
    expected = [max(range(2), key=choice_logliks(model, "the cat is blue\n\n" + p, [" red", " blue"]).__getitem__)
                for p in ("a dog is", "it is")]
    assert result["accuracy"] == pytest.approx(((expected[0] == 0) + (expected[1] == 1)) / 2)
    with pytest.raises(ValueError, match="lacks"):
        multiple_choice_accuracy(model, TOK, [{"prompt": "a"}], progress=False)


# ---------------------------------------------------------------- plots
def test_plots_write_files(tmp_path):
    one = plot_layer_sparsity([0.1, 0.5, 0.9], tmp_path / "layers.png", title="t")
    two = plot_layer_sparsity({"eta 0.2": [0.1, 0.2], "eta 0.5": [0.5, 0.6]}, tmp_path / "sub" / "layers2.png")
    three = plot_tradeoff([{"sparsity": 0.0, "quality": 90.0, "label": "dense"},
                           {"sparsity": 0.8, "quality": 89.0, "series": "lte"}], tmp_path / "trade.png", "accuracy")
    for path in (one, two, three):
        with open(path, "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="quality"):
        plot_tradeoff([{"sparsity": 0.1}], tmp_path / "x.png")


def test_png_figures_are_palette_images_that_keep_the_drawing(tmp_path):
    """PNGs are written with a 256-colour palette (a third of the bytes in the results folders); a
    drawn square keeps its colour and place, and other formats are written as asked."""
    from matplotlib.patches import Rectangle
    from PIL import Image

    from lte.evaluation.plots import new_figure, save_figure

    figure = new_figure(2.0, 2.0)  # 240 x 240 pixels at 120 dpi
    figure.patches.append(Rectangle((0.25, 0.25), 0.5, 0.5, transform=figure.transFigure,
                                    facecolor=(1.0, 0.0, 0.0), figure=figure))
    out = save_figure(figure, tmp_path / "square.png")
    with Image.open(out) as image:
        assert image.mode == "P" and image.size == (240, 240)
        rgb = image.convert("RGB")
        assert rgb.getpixel((120, 120)) == (255, 0, 0) and rgb.getpixel((10, 10)) == (255, 255, 255)
    pdf = save_figure(new_figure(), tmp_path / "plot.pdf")
    with open(pdf, "rb") as handle:
        assert handle.read(5) == b"%PDF-"


def test_harness_adapter_without_lm_eval_says_how_to_install(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if lm-eval were not installed
    monkeypatch.delitem(sys.modules, "lte.evaluation.harness", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'lte\[lmeval\]'"):
        importlib.import_module("lte.evaluation.harness")
