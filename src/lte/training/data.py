"""A stage's training data: the task's dataset from a path, the collator, calibration batches, held-out tails."""

from __future__ import annotations

from typing import Any

import torch

from lte.data.text import is_text_source
from lte.training.args import TrainArgs
from lte.training.errors import StageInputError

__all__ = ["calibration_batch", "check_data_sources", "examples_for_tokens", "first_batch", "load_task_data",
           "make_collator", "split_holdout", "spread_indices"]


def check_data_sources(task: str, data: Any) -> None:
    """Several sources (a list: a mix) are read only for causal LM; other tasks take one."""
    if isinstance(data, (list, tuple)) and task != "causal-lm":
        raise StageInputError(f"several data sources (a mix) are for --task causal-lm; {task} takes one: "
                              f"got {[str(d) for d in data]}")


def load_task_data(task: str, data: Any, tokenizer, hp: TrainArgs, split: str = "train",
                   holdout: float | None = None):
    """The training dataset of a task from a path (a Dataset passes through).

    `holdout` (causal LM): train on all but this final fraction of the text, which stays unseen
    for evaluation (`lte run` scores it).
    """
    check_data_sources(task, data)
    if not is_text_source(data):
        dataset = data
    elif task == "causal-lm":
        from lte.data import load_text_lm

        if holdout:
            dataset = load_text_lm(data, tokenizer, block_size=hp.block_size, max_tokens=hp.max_tokens,
                                   split_ratio=holdout, text_field=hp.text_field)[0]
        else:
            dataset = load_text_lm(data, tokenizer, block_size=hp.block_size, max_tokens=hp.max_tokens,
                                   text_field=hp.text_field)
    elif task == "classification":
        from lte.data import load_glue

        if not hp.glue_task:
            raise StageInputError("--task classification needs --glue-task (e.g. SST-2, MRPC, RTE, CoLA, STS-B)")
        dataset = load_glue(hp.glue_task, data, tokenizer, split=split, max_length=hp.max_length,
                            max_examples=hp.max_examples)
    else:
        from lte.data import load_instructions

        dataset = load_instructions(data, tokenizer, max_length=hp.max_length, max_examples=hp.max_examples)
    try:
        n = len(dataset)
    except TypeError:
        n = None
    if n == 0:
        raise StageInputError(f"the training data '{data}' gave no examples; check the file and the task")
    return dataset


def first_batch(dataset, tokenizer, batch_size: int) -> dict[str, torch.Tensor] | None:
    """The first `batch_size` examples, collated (for router calibration); None if unavailable."""
    try:
        items = [dataset[i] for i in range(min(batch_size, len(dataset)))]
    except (TypeError, IndexError, KeyError):
        return None
    return make_collator(tokenizer)(items) if items else None


def spread_indices(total: int, count: int) -> list[int]:
    """`count` indices evenly spaced over range(total) (all of them when count >= total), first one 0."""
    if count >= total:
        return list(range(total))
    return [i * total // count for i in range(count)]


def example_tokens(item: dict[str, Any]) -> int:
    """Tokens of one tokenized example: the ones of its attention mask, else the length of its input ids."""
    mask = item.get("attention_mask")
    if mask is not None:
        return int(torch.as_tensor(mask).sum())
    return len(item["input_ids"])


def examples_for_tokens(dataset, tokens: int, sample: str = "first", holdout: int = 0) -> int:
    """The fewest examples a calibration batch (`calibration_batch`'s `sample`) needs to hold at least `tokens`
    tokens (`example_tokens`), or every usable one when the data holds fewer. "first" counts in order; "spread"
    starts from the mean length of the usable examples and grows the count until its spaced pick is enough."""
    total = len(dataset)
    if sample == "first":
        count, seen = 0, 0
        while count < total and seen < tokens:
            seen += example_tokens(dataset[count])
            count += 1
        return max(count, 1)
    usable = total - _held_out(total, holdout)
    lengths = [example_tokens(dataset[i]) for i in range(usable)]  # [N] tokens per usable example
    count = min(usable, max(1, -(-tokens * usable // max(1, sum(lengths)))))  # ceil(tokens / mean length)
    while count < usable and sum(lengths[i] for i in spread_indices(usable, count)) < tokens:
        count += max(1, count // 16)
    return min(count, usable)


def _held_out(total: int, holdout: int) -> int:
    """Examples the tau hold-out takes from the end (`split_holdout`'s rule), 0 without one."""
    return max(1, min(holdout, total // 5)) if holdout > 0 and total > 1 else 0


def calibration_batch(dataset, tokenizer, batch_size: int, sample: str = "first",
                      holdout: int = 0) -> dict[str, torch.Tensor] | None:
    """The stage-1 calibration batch: `first_batch`, or with `sample` "spread" `batch_size` examples evenly
    spaced over the data, leaving out the last `holdout` examples (`split_holdout`'s tau hold-out).
    None if the dataset cannot be indexed."""
    if sample == "first":
        return first_batch(dataset, tokenizer, batch_size)
    if sample != "spread":
        raise StageInputError(f"calibration_sample must be 'first' or 'spread', got {sample!r}")
    try:
        total = len(dataset)
        items = [dataset[i] for i in spread_indices(total - _held_out(total, holdout), batch_size)]
    except (TypeError, IndexError, KeyError):
        return None
    return make_collator(tokenizer)(items) if items else None


def make_collator(tokenizer):
    """`lte.data.pad_collate(tokenizer)` (pads input_ids/attention_mask, labels with -100)."""
    from lte.data import pad_collate

    return pad_collate(tokenizer)


def split_holdout(dataset, n: int):
    """(training subset, held-out tail of `n` examples); at most a fifth of the data is held out."""
    from torch.utils.data import Subset

    total = len(dataset)
    n = max(1, min(n, total // 5))
    if total - n < 1:
        raise StageInputError(f"the training data has {total} examples: too few to hold {n} out for the tau "
                              "calibration; give more data or drop --calibrate-tau / --target-sparsity")
    return Subset(dataset, range(total - n)), Subset(dataset, range(total - n, total))
