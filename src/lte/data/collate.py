"""Dynamic padding of a list of examples into a batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# What each sequence field is padded with (input_ids uses the tokenizer's pad id).
PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "labels": -100, "position_ids": 0}


def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.tensor(value)


def pad_collate(
    tokenizer=None, pad_token_id: int | None = None, padding_side: str = "right", pad_to_multiple_of: int | None = None
) -> Callable[[Sequence[dict]], dict[str, torch.Tensor]]:
    """A collate function that pads every 1-D field to the longest in the batch.

    ``input_ids`` get the tokenizer's pad id (or ``pad_token_id``), ``attention_mask`` and
    ``token_type_ids`` 0, ``labels`` -100. Scalar fields (classification labels) are stacked, keeping
    their dtype. Items may hold lists or tensors. Use with ``DataLoader(collate_fn=...)`` or as a
    Trainer ``data_collator``.
    """
    if pad_token_id is None:
        if tokenizer is None:
            raise ValueError("pad_collate needs a tokenizer or a pad_token_id.")
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("the tokenizer has no pad or eos token; set tokenizer.pad_token first.")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")

    def collate(items: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("cannot collate an empty batch.")
        batch = {}
        for key in items[0]:
            values = [_as_tensor(item[key]) for item in items]
            if values[0].dim() == 0:
                batch[key] = torch.stack(values)
                continue
            length = max(len(v) for v in values)
            if pad_to_multiple_of:
                length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
            fill = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
            padded = torch.full((len(values), length), fill, dtype=values[0].dtype)
            for row, v in enumerate(values):
                if padding_side == "right":
                    padded[row, : len(v)] = v
                else:
                    padded[row, length - len(v) :] = v
            batch[key] = padded
        return batch

    return collate
