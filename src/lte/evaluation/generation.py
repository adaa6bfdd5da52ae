"""Generation tasks (XSum, E2E): greedy decoding and ROUGE-L."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from lte.data.collate import pad_collate
from lte.errors import LTEError
from lte.evaluation._common import finish_stats, is_lte, pad_id_of, prepare_model, start_stats, to_device


def rouge_l(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-L (F1, precision, recall, in percent) with the ``rouge-score`` package (Porter stemming),
    and each prediction's F1 (``rougeL_per_example``, in order) for paired comparisons between models
    scored on the same examples.

    A reference may be a list of strings (several references): the best-scoring one counts.
    """
    try:
        from rouge_score import rouge_scorer
    except ImportError as err:
        raise LTEError("ROUGE needs the `rouge-score` package: pip install rouge-score") from err
    if len(predictions) != len(references):
        raise LTEError(f"{len(predictions)} predictions but {len(references)} references.")
    if not predictions:
        raise LTEError("no predictions to score.")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    totals = {"f": 0.0, "p": 0.0, "r": 0.0}
    per_example = []
    for prediction, reference in zip(predictions, references):
        candidates = [reference] if isinstance(reference, str) else list(reference)
        best = max((scorer.score(ref, prediction)["rougeL"] for ref in candidates), key=lambda s: s.fmeasure)
        totals["f"] += best.fmeasure
        totals["p"] += best.precision
        totals["r"] += best.recall
        per_example.append(100 * best.fmeasure)
    n = len(predictions)
    return {"rougeL": 100 * totals["f"] / n, "rougeL_precision": 100 * totals["p"] / n,
            "rougeL_recall": 100 * totals["r"] / n, "count": n, "rougeL_per_example": per_example}


def truncate_tokens(text: str, tokenizer, max_tokens: int | None) -> str:
    """The text cut to its first ``max_tokens`` tokens (unchanged when it is shorter or no limit is set)."""
    if max_tokens is None:
        return text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def _clean(generated: str, stop_at_newline: bool) -> str:
    text = generated.strip()
    return text.split("\n", 1)[0].strip() if stop_at_newline else text


def _until_stop(tokens: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """The generated tokens up to and including the first eos/pad (what was really decoded)."""
    stops = torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device)).nonzero()
    return tokens if len(stops) == 0 else tokens[: int(stops[0]) + 1]


@torch.no_grad()
def generate_greedy(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64, batch_size: int = 8,
    device: torch.device | None = None, progress: bool = True,
) -> tuple[list[str], list[torch.Tensor]]:
    """Greedy continuations of the prompts (left-padded batches). Returns texts and full token sequences."""
    run_device = device or prepare_model(model, None)
    pad_id = pad_id_of(tokenizer)
    collate = pad_collate(pad_token_id=pad_id, padding_side="left")
    stop_ids = [t for t in (tokenizer.eos_token_id, pad_id) if t is not None]
    texts, sequences = [], []
    for start in tqdm(range(0, len(prompts), batch_size), desc="generate", disable=not progress, leave=False):
        chunk = prompts[start : start + batch_size]
        encoded = [tokenizer(p) for p in chunk]
        batch = collate([{"input_ids": e["input_ids"], "attention_mask": e["attention_mask"]} for e in encoded])
        batch = to_device(batch, run_device)
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
        prompt_len = batch["input_ids"].shape[1]
        for row in range(len(chunk)):
            new_tokens = output[row, prompt_len:]
            texts.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
            keep = batch["attention_mask"][row].bool()
            sequences.append(torch.cat([batch["input_ids"][row][keep], _until_stop(new_tokens, stop_ids)]).cpu())
    return texts, sequences


@torch.no_grad()
def _sequence_stats(model, sequences: list[torch.Tensor], pad_id: int, batch_size: int,
                    device: torch.device) -> dict[str, Any]:
    """LTE statistics of one teacher-forced forward over prompt + generated tokens.

    Generation may call the base model directly (bypassing LTEModel's statistics), so sparsity is
    measured on the finished sequences; in hard routing a token's experts depend only on its
    hidden state, so this equals what decoding used.
    """
    collate = pad_collate(pad_token_id=pad_id)
    start_stats(model)
    if is_lte(model):
        for start in range(0, len(sequences), batch_size):
            items = [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in sequences[start : start + batch_size]]
            model(**to_device(collate(items), device))
    return finish_stats(model)


def evaluate_generation(
    model,
    tokenizer,
    pairs: Sequence[tuple[str, str | Sequence[str]]],
    prompt_template: str = "{source}",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_source_tokens: int | None = None,
    stop_at_newline: bool = True,
    max_examples: int | None = None,
    num_shown: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Greedy generation on ``(source, reference)`` pairs, scored with ROUGE-L, plus LTE statistics.

    ``prompt_template`` holds ``{source}`` (see :data:`lte.data.PROMPT_TEMPLATES`); ``max_source_tokens``
    cuts long sources (XSum articles) before formatting; ``stop_at_newline`` keeps the first line of
    each output. Returns ``{"rougeL", "rougeL_precision", "rougeL_recall", "count", "samples",
    "ffn_sparsity", ...}`` (``samples``: the first ``num_shown`` predictions with their references).
    """
    if "{source}" not in prompt_template:
        raise LTEError(f"prompt_template must contain '{{source}}'; got {prompt_template!r}.")
    pairs = list(pairs)[:max_examples] if max_examples else list(pairs)
    if not pairs:
        raise LTEError("no (source, reference) pairs to evaluate.")
    run_device = prepare_model(model, device)
    prompts = [prompt_template.format(source=truncate_tokens(src, tokenizer, max_source_tokens)) for src, _ in pairs]
    outputs, sequences = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, run_device, progress)
    predictions = [_clean(text, stop_at_newline) for text in outputs]
    references = [ref for _, ref in pairs]
    result: dict[str, Any] = dict(rouge_l(predictions, references))
    result["samples"] = [{"prediction": p, "reference": r} for p, r in zip(predictions[:num_shown], references)]
    result.update(_sequence_stats(model, sequences, pad_id_of(tokenizer), batch_size, run_device))
    return result
