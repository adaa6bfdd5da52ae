"""Causal language-modelling data: plain text or JSONL packed into fixed-size blocks."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lte.data._common import (
    DataError,
    hub_dataset,
    looks_local,
    nonempty_text,
    read_json_records,
    require_fields,
)

BUILTIN = "builtin"  # the name load_text_lm takes for builtin_text()
TEXT_SUFFIXES = (".txt", ".text", ".md", ".raw", ".tokens")
JSON_SUFFIXES = (".json", ".jsonl")
_CHUNK_CHARS = 20_000  # plain text is tokenized in pieces of about this many characters (split at newlines)


def builtin_text() -> str:
    """English prose that ships with Python itself (the pydoc help topics), about 0.5 MB.

    Used by the offline demo: needs no download and no package beyond the standard library.
    """
    from pydoc_data import topics

    return "\n\n".join(topics.topics[key].strip() for key in sorted(topics.topics))


class LMDataset(Dataset):
    """Blocks of ``block_size`` token ids; each item is ``{input_ids, attention_mask, labels}``.

    ``labels`` equal ``input_ids`` (the model shifts them) with -100 on padding. The flat token
    stream is kept as ``token_ids`` (used by :func:`lte.evaluation.perplexity`).
    """

    def __init__(self, token_ids: torch.Tensor, block_size: int, pad_to_block: bool = False, pad_token_id: int = 0):
        if block_size < 2:
            raise DataError(f"block_size must be at least 2, got {block_size}.")
        self.token_ids = token_ids  # [N] int64
        self.block_size = block_size
        self.pad_to_block = pad_to_block
        self.pad_token_id = pad_token_id
        n_full, rest = divmod(len(token_ids), block_size)
        self._num_blocks = n_full + (1 if pad_to_block and rest >= 2 else 0)
        if self._num_blocks == 0:
            raise DataError(
                f"the text has {len(token_ids)} tokens, fewer than one block of {block_size}; "
                "give more text or a smaller block_size."
            )

    def __len__(self) -> int:
        return self._num_blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self._num_blocks:
            raise IndexError(i)
        block = self.token_ids[i * self.block_size : (i + 1) * self.block_size]
        n_real = len(block)
        mask = torch.ones(self.block_size, dtype=torch.long)
        if n_real < self.block_size:  # only the last block when pad_to_block
            pad = torch.full((self.block_size - n_real,), self.pad_token_id, dtype=block.dtype)
            block = torch.cat([block, pad])
            mask[n_real:] = 0
        labels = block.clone()
        labels[mask == 0] = -100
        return {"input_ids": block.clone(), "attention_mask": mask, "labels": labels}

    @property
    def num_tokens(self) -> int:
        """Tokens covered by the blocks (not counting padding)."""
        return min(len(self.token_ids), self._num_blocks * self.block_size)

    def split(self, eval_fraction: float) -> tuple[LMDataset, LMDataset]:
        """Split by position: the last ``eval_fraction`` of the token stream becomes the eval set."""
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"split_ratio must be in (0, 1), got {eval_fraction}.")
        n_eval_blocks = max(1, round(len(self) * eval_fraction))
        if n_eval_blocks >= len(self):
            raise DataError(f"only {len(self)} block(s): too few to split off {eval_fraction:.0%} for evaluation.")
        cut = (len(self) - n_eval_blocks) * self.block_size
        head = LMDataset(self.token_ids[:cut], self.block_size, self.pad_to_block, self.pad_token_id)
        tail = LMDataset(self.token_ids[cut:], self.block_size, self.pad_to_block, self.pad_token_id)
        return head, tail


def _text_pieces(text: str, chunk_chars: int = _CHUNK_CHARS) -> list[str]:
    """Cut text at newlines into pieces of about ``chunk_chars`` characters (keeping every character)."""
    pieces, start = [], 0
    while start < len(text):
        end = min(len(text), start + chunk_chars)
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        pieces.append(text[start:end])
        start = end
    return pieces


def tokenize_documents(documents: list[str], tokenizer, separator_id: int | None) -> torch.Tensor:
    """Tokenize documents (no special tokens) and join them, with ``separator_id`` after each document."""
    ids: list[int] = []
    for start in range(0, len(documents), 256):
        batch = documents[start : start + 256]
        for doc_ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            ids.extend(doc_ids)
            if separator_id is not None:
                ids.append(separator_id)
    return torch.tensor(ids, dtype=torch.long)


def tokenize_text(text: str, tokenizer) -> torch.Tensor:
    """Token ids of one long text, tokenized piecewise (pieces cut at newlines)."""
    pieces = _text_pieces(text)
    ids: list[int] = []
    for start in range(0, len(pieces), 64):
        for piece_ids in tokenizer(pieces[start : start + 64], add_special_tokens=False)["input_ids"]:
            ids.extend(piece_ids)
    return torch.tensor(ids, dtype=torch.long)


def is_text_source(source) -> bool:
    """Whether `source` names text to read (a path, ``"builtin"``, a hub name, or a list of them),
    as opposed to a dataset object."""
    if isinstance(source, (list, tuple)):
        return bool(source) and all(isinstance(s, (str, os.PathLike)) for s in source)
    return isinstance(source, (str, os.PathLike))


def read_documents(path, text_field: str = "text", split: str = "train") -> list[str] | str:
    """Read text from a file, a folder of text files, ``"builtin"``, a hub dataset name, or a list
    of these (their documents in the order given: the last source's text ends the mix).

    Returns one string for plain text, or a list of documents for JSON/JSONL, hub data or a list.
    """
    if isinstance(path, (list, tuple)):
        if not path:
            raise DataError("an empty list of text sources: name at least one file, folder or 'builtin'.")
        docs: list[str] = []
        for source in path:
            part = read_documents(source, text_field, split)
            docs.extend([part] if isinstance(part, str) else part)
        return docs
    if str(path) == BUILTIN:
        return builtin_text()
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in TEXT_SUFFIXES + JSON_SUFFIXES)
        if not files:
            raise DataError(f"folder '{p}' holds no {TEXT_SUFFIXES + JSON_SUFFIXES} files to read.")
        docs: list[str] = []
        for f in files:
            part = read_documents(f, text_field)
            docs.extend([part] if isinstance(part, str) else part)
        return docs
    if p.is_file():
        if p.suffix in JSON_SUFFIXES:
            records = read_json_records(p)
            for i, record in enumerate(records):
                require_fields(record, [text_field], f"'{p}' record {i + 1}",
                               "Name the field that holds the text with --text-field FIELD (text_field= in Python).")
            docs = [str(r[text_field]) for r in records if str(r[text_field]).strip()]
            if not docs:
                raise DataError(f"'{p}' has no non-empty '{text_field}' values.")
            return docs
        return nonempty_text(p)
    if looks_local(path):  # do not send a mistyped path to the hub
        raise DataError(
            f"text file not found: '{p}'. Pass a .txt/.jsonl file, a folder of them, '{BUILTIN}' "
            "(text shipped with Python), or a hub dataset name."
        )
    data = hub_dataset(str(path), split)
    if text_field not in data.column_names:
        raise DataError(f"hub dataset '{path}' has no column '{text_field}'; columns: {data.column_names}.")
    return [t for t in data[text_field] if t and t.strip()]


def lm_dataset_from_text(
    text: str | list[str],
    tokenizer,
    block_size: int = 512,
    max_tokens: int | None = None,
    pad_to_block: bool = False,
) -> LMDataset:
    """Pack a text (or a list of documents, joined with the eos token) into an :class:`LMDataset`."""
    if isinstance(text, str):
        if not text.strip():
            raise DataError("the text is empty.")
        token_ids = tokenize_text(text, tokenizer)
    else:
        if not text:
            raise DataError("no documents to load.")
        token_ids = tokenize_documents(list(text), tokenizer, tokenizer.eos_token_id)
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return LMDataset(token_ids, block_size, pad_to_block=pad_to_block, pad_token_id=pad_id)


def load_text_lm(
    path: str | os.PathLike,
    tokenizer,
    block_size: int = 512,
    max_tokens: int | None = None,
    split_ratio: float | None = None,
    text_field: str = "text",
    pad_to_block: bool = False,
    split: str = "train",
):
    """Load plain text / JSON / JSONL (or ``"builtin"``, or a hub name) as causal-LM blocks.

    - ``path``: a ``.txt`` file (read whole), a ``.json``/``.jsonl`` file of objects with
      ``text_field``, a folder of such files, ``"builtin"`` (:func:`builtin_text`), a hub
      dataset name (``"name:config"``, needs ``datasets`` and a network), or a list of these
      (a mix, in order; each source's text is one document).
    - Tokens are packed into blocks of ``block_size``; JSON documents are joined with the eos token.
      ``pad_to_block=True`` keeps the final short block, padded, with ``attention_mask`` 0 there.
    - ``max_tokens`` keeps only the first tokens.
    - ``split_ratio``: when given (e.g. 0.1), returns ``(train, eval)`` with the last fraction of
      the text as eval; otherwise one :class:`LMDataset`.
    """
    documents = read_documents(path, text_field=text_field, split=split)
    dataset = lm_dataset_from_text(documents, tokenizer, block_size, max_tokens, pad_to_block)
    return dataset.split(split_ratio) if split_ratio is not None else dataset
