"""Multiple-choice accuracy by log-likelihood of each answer continuation (MMLU, PIQA, BoolQ, ...)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from lte.data.tasks import MCExample
from lte.errors import LTEError
from lte.evaluation._common import finish_stats, pad_id_of, prepare_model, selected_logits, start_stats


@dataclass
class _Request:
    """One forward: ``context + continuation`` tokens; scores for ``continuations`` are read from it.

    ``single_token`` requests hold only the context and score every one-token continuation at the
    last position (one forward for all choices).
    """

    example: int
    choice: int  # -1 for a single_token request covering all choices
    tokens: list[int]
    n_context: int
    continuations: list[list[int]]


def _as_example(item: MCExample | Mapping, index: int) -> MCExample:
    if isinstance(item, MCExample):
        return item
    missing = [k for k in ("prompt", "choices", "answer") if k not in item]
    if missing:
        raise LTEError(f"example {index} lacks {missing}; found keys {sorted(item)}. Use lte.data.MCExample.")
    return MCExample(item["prompt"], list(item["choices"]), int(item["answer"]), item.get("subject", ""))


def build_requests(tokenizer, examples: list[MCExample], prefix: str, max_length: int | None) -> list[_Request]:
    """Tokenize contexts and continuations into scoring requests (contexts cut from the left to fit)."""
    requests = []
    for i, ex in enumerate(examples):
        context = tokenizer(prefix + ex.prompt)["input_ids"]
        continuations = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in ex.choices]
        if any(len(c) == 0 for c in continuations):
            raise LTEError(f"example {i} has an empty answer choice {ex.choices}.")
        if all(len(c) == 1 for c in continuations):
            tokens = context[-max_length:] if max_length else context
            requests.append(_Request(i, -1, tokens, len(tokens), continuations))
            continue
        for j, cont in enumerate(continuations):
            keep = max_length - len(cont) if max_length else len(context)
            if keep < 1:
                raise LTEError(f"example {i} choice {j} is longer than max_length={max_length}.")
            ctx = context[-keep:]
            requests.append(_Request(i, j, ctx + cont, len(ctx), [cont]))
    return requests


@torch.no_grad()
def _score_batch(model, requests: list[_Request], device: torch.device, pad_id: int) -> list[list[float]]:
    """Log-likelihood of each request's continuation(s).

    Logits are computed only at the positions that predict a continuation token
    (`_common.selected_logits`), never for the whole batch.
    """
    length = max(len(r.tokens) for r in requests)
    input_ids = torch.full((len(requests), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    select = torch.zeros_like(input_ids, dtype=torch.bool)
    wanted: list[list[int]] = []  # per selected position (row-major): the token ids whose log-prob is read
    for row, r in enumerate(requests):
        input_ids[row, : len(r.tokens)] = torch.tensor(r.tokens)
        attention_mask[row, : len(r.tokens)] = 1
        if r.choice == -1:  # every choice is one token, predicted at the last context position
            select[row, r.n_context - 1] = True
            wanted.append([c[0] for c in r.continuations])
        else:  # positions n_context-1 .. len-2 predict the continuation tokens
            select[row, r.n_context - 1 : len(r.tokens) - 1] = True
            wanted.extend([t] for t in r.continuations[0])
    logprobs: list[torch.Tensor] = []
    for logits in selected_logits(model, input_ids.to(device), attention_mask.to(device), select):
        rows = torch.log_softmax(logits, dim=-1)  # [n, V]
        for k in range(rows.shape[0]):
            ids = torch.tensor(wanted[len(logprobs)], device=rows.device)
            logprobs.append(rows[k, ids].cpu())
    scores, position = [], 0
    for r in requests:
        if r.choice == -1:
            scores.append([float(v) for v in logprobs[position]])
            position += 1
        else:
            n = len(r.continuations[0])
            scores.append([float(sum(float(v) for v in logprobs[position : position + n]))])
            position += n
    return scores


def _few_shot_prefix(few_shot_examples: Sequence[MCExample | Mapping]) -> str:
    shots = [_as_example(ex, i) for i, ex in enumerate(few_shot_examples)]
    return "".join(shot.as_shot() + "\n\n" for shot in shots)


def multiple_choice_accuracy(
    model,
    tokenizer,
    examples: Sequence[MCExample | Mapping],
    few_shot_examples: Sequence[MCExample | Mapping] = (),
    batch_size: int = 8,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Accuracy of picking the choice with the highest log-likelihood after the prompt.

    ``examples``: :class:`lte.data.MCExample` (or dicts with prompt, choices, answer). The few-shot
    examples, solved, are put before every prompt (MMLU prompts from :func:`lte.data.load_mmlu`
    already hold their own). ``max_length`` (default: the model's context) cuts contexts from the
    left. Returns ``accuracy`` (sum of log-probs) and ``accuracy_norm`` (divided by the
    continuation's length in characters), ``per_subject`` when examples carry subjects, and the LTE
    statistics.
    """
    items = [_as_example(ex, i) for i, ex in enumerate(examples)]
    if not items:
        raise LTEError("no multiple-choice examples to evaluate.")
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    run_device = prepare_model(model, device)
    requests = build_requests(tokenizer, items, _few_shot_prefix(few_shot_examples), max_length)
    order = sorted(range(len(requests)), key=lambda k: -len(requests[k].tokens))  # similar lengths together
    per_choice: list[list[float]] = [[0.0] * len(ex.choices) for ex in items]
    start_stats(model)
    pad_id = pad_id_of(tokenizer)
    for start in tqdm(range(0, len(order), batch_size), desc="multiple choice", disable=not progress, leave=False):
        batch = [requests[k] for k in order[start : start + batch_size]]
        for r, values in zip(batch, _score_batch(model, batch, run_device, pad_id)):
            if r.choice == -1:
                per_choice[r.example] = values
            else:
                per_choice[r.example][r.choice] = values[0]
    return _summarise(items, per_choice) | finish_stats(model)


def _summarise(items: list[MCExample], per_choice: list[list[float]]) -> dict[str, Any]:
    correct, correct_norm = [], []
    for ex, logliks in zip(items, per_choice):
        normed = [ll / max(1, len(c)) for ll, c in zip(logliks, ex.choices)]
        correct.append(max(range(len(logliks)), key=logliks.__getitem__) == ex.answer)
        correct_norm.append(max(range(len(normed)), key=normed.__getitem__) == ex.answer)
    result: dict[str, Any] = {
        "accuracy": sum(correct) / len(items),
        "accuracy_norm": sum(correct_norm) / len(items),
        "count": len(items),
    }
    subjects = defaultdict(list)
    for ex, ok in zip(items, correct):
        if ex.subject:
            subjects[ex.subject].append(ok)
    if subjects:
        result["per_subject"] = {s: sum(v) / len(v) for s, v in sorted(subjects.items())}
        result["macro_accuracy"] = sum(result["per_subject"].values()) / len(subjects)
    return result
