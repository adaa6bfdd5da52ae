"""Tiny random HF models of every supported family, built in code with odd widths.

D = 40 (model width), F = 100 (FFN width: 3 experts of 32 + one of 4), 2 layers.
"""

from __future__ import annotations

import random
import string

import torch
import transformers as tf

D, F, LAYERS, VOCAB = 40, 100, 2, 101

_COMMON = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=F, num_hidden_layers=LAYERS,
               num_attention_heads=4, max_position_embeddings=64)


def _decoder(cfg_cls, model_cls, **extra):
    def build():
        kwargs = {**_COMMON, "num_key_value_heads": 2, **extra}
        return model_cls(cfg_cls(**kwargs))
    return build


def _encoder(cfg_cls, model_cls, **extra):
    def build():
        kwargs = {**_COMMON, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                  "num_labels": 3, **extra}
        return model_cls(cfg_cls(**kwargs))
    return build


FAMILIES = {
    "llama": _decoder(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": _decoder(tf.MistralConfig, tf.MistralForCausalLM),
    "qwen2": _decoder(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": _decoder(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=10),
    "gemma": _decoder(tf.GemmaConfig, tf.GemmaForCausalLM, head_dim=10),
    "gemma2": _decoder(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=10),
    "gemma3_text": _decoder(tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=10),
    "phi3": _decoder(tf.Phi3Config, tf.Phi3ForCausalLM, pad_token_id=0),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        vocab_size=VOCAB, n_embd=D, n_inner=F, n_layer=LAYERS, n_head=4, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "opt": lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=D, ffn_dim=F, num_hidden_layers=LAYERS, num_attention_heads=4,
        word_embed_proj_dim=D, max_position_embeddings=64, dropout=0.0, pad_token_id=1)),
    "gpt_neox": _decoder(tf.GPTNeoXConfig, tf.GPTNeoXForCausalLM, hidden_dropout=0.0, attention_dropout=0.0),
    "bert": _encoder(tf.BertConfig, tf.BertForSequenceClassification),
    "roberta": _encoder(tf.RobertaConfig, tf.RobertaForSequenceClassification, pad_token_id=1),
    "mpnet": _encoder(tf.MPNetConfig, tf.MPNetForSequenceClassification, pad_token_id=1),
}


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    model.eval()
    return model


def batch(seed: int = 0, batch_size: int = 2, length: int = 7, pad_last: int = 2) -> dict[str, torch.Tensor]:
    """input_ids + attention_mask with the last `pad_last` positions of row 0 padded (right padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch_size, length), generator=g)
    mask = torch.ones(batch_size, length, dtype=torch.long)
    if pad_last:
        mask[0, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------------- saved tiny models and text for the training tests
def char_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_llama(path, seed: int = 0, tie_word_embeddings: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=tie_word_embeddings)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_text(path, lines: int = 200):
    rng = random.Random(0)
    words = "the cat sat on a mat and the dog ran over hills while birds sang in green trees".split()
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(lines)))
    return path


def free_port() -> int:
    """A free local TCP port for a multi-process test's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wide_llama_lte():
    """A converted 3-layer Llama (D 48, F 320) with 10 experts of 32 neurons per layer, in eval mode."""
    import lte

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=320, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return lte.get_lte_model(tf.LlamaForCausalLM(cfg).eval(), lte.LTEConfig(expert_size=32))

