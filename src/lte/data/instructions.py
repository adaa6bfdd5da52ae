"""Instruction data (``{instruction, input, output}``, the Alpaca layout) with the loss on the answer only."""

from __future__ import annotations

import os
import warnings

import torch
from torch.utils.data import Dataset

from lte.data._common import (
    DataError,
    existing_path,
    hub_dataset,
    looks_local,
    read_json_records,
    require_fields,
)

# Our prompt layout; {input_block} is empty when the example has no input.
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
INPUT_BLOCK = "### Input:\n{input}\n\n"


def format_prompt(instruction: str, input_text: str = "", template: str = PROMPT_TEMPLATE) -> str:
    """The prompt the model sees before the answer."""
    input_block = INPUT_BLOCK.format(input=input_text) if input_text and input_text.strip() else ""
    return template.format(instruction=instruction, input_block=input_block, input=input_text)


class InstructionDataset(Dataset):
    """Variable-length examples ``{input_ids, attention_mask, labels}``; labels are -100 on the prompt.

    Padding (labels -100 there too) is done per batch by :func:`lte.data.pad_collate`.
    ``records`` keeps the raw ``(prompt, answer)`` pairs, e.g. for generation-based evaluation.
    """

    def __init__(self, examples: list[dict], records: list[tuple[str, str]]):
        self.examples = examples
        self.records = records

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: torch.tensor(v, dtype=torch.long) for k, v in self.examples[i].items()}


def encode_instruction(prompt: str, answer: str, tokenizer, max_length: int) -> dict | None:
    """Token ids of prompt + answer (+ eos) truncated to ``max_length``; None when no answer token fits."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    input_ids = (prompt_ids + answer_ids)[:max_length]
    n_prompt = min(len(prompt_ids), len(input_ids))
    if n_prompt == len(input_ids):
        return None
    labels = [-100] * n_prompt + input_ids[n_prompt:]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def read_instruction_records(
    path: str | os.PathLike, fields: tuple[str, str, str] = ("instruction", "input", "output"), split: str = "train"
) -> list[tuple[str, str, str]]:
    """Read ``(instruction, input, output)`` triples from JSON/JSONL (``input`` may be absent) or the hub."""
    instr_key, input_key, output_key = fields
    if looks_local(path):
        hint = "Pass a JSON or JSONL file of {instruction, input, output} objects."
        records = read_json_records(existing_path(path, "instruction file", hint))
    else:
        data = hub_dataset(str(path), split)
        records = [dict(zip(data.column_names, values)) for values in zip(*(data[c] for c in data.column_names))]
    if not records:
        raise DataError(f"'{path}' holds no examples.")
    triples = []
    for i, record in enumerate(records):
        require_fields(record, [instr_key, output_key], f"'{path}' record {i + 1}")
        triples.append((str(record[instr_key]), str(record.get(input_key) or ""), str(record[output_key])))
    return triples


def load_instructions(
    path: str | os.PathLike,
    tokenizer,
    max_length: int = 512,
    max_examples: int | None = None,
    fields: tuple[str, str, str] = ("instruction", "input", "output"),
    template: str = PROMPT_TEMPLATE,
) -> InstructionDataset:
    """Load instruction data for causal-LM fine-tuning with the loss on the answer only.

    Examples whose prompt alone fills ``max_length`` are dropped (with a warning).
    """
    triples = read_instruction_records(path, fields)
    if max_examples is not None:
        triples = triples[:max_examples]
    examples, records, dropped = [], [], 0
    for instruction, input_text, output in triples:
        prompt = format_prompt(instruction, input_text, template)
        encoded = encode_instruction(prompt, output, tokenizer, max_length)
        if encoded is None:
            dropped += 1
            continue
        examples.append(encoded)
        records.append((prompt, output))
    if dropped:
        warnings.warn(f"{dropped} example(s) dropped: their prompt alone fills max_length={max_length}.", stacklevel=2)
    if not examples:
        raise DataError(f"no example of '{path}' fits in max_length={max_length}; raise max_length.")
    return InstructionDataset(examples, records)
