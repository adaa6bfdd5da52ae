"""GLUE-style sentence (pair) classification and regression from the standard TSV files."""

from __future__ import annotations

import copy
import csv
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from lte.data._common import DataError, hub_dataset, read_utf8

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long QNLI/RTE passages


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task's TSV is laid out."""

    name: str  # canonical key, e.g. "sst2"
    folder: str  # folder name in the GLUE data layout, e.g. "SST-2"
    text_columns: tuple  # column names (header files) or indices (no header)
    label_column: str | int
    header: bool
    label_names: tuple = ()  # string labels in id order; empty when labels are already ints / floats
    is_regression: bool = False
    metric: str = "accuracy"  # the task's main metric

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else max(2, len(self.label_names))


GLUE_TASKS: dict[str, GlueTask] = {
    "sst2": GlueTask("sst2", "SST-2", ("sentence",), "label", True),
    "cola": GlueTask("cola", "CoLA", (3,), 1, False, metric="matthews"),
    "mrpc": GlueTask("mrpc", "MRPC", ("#1 String", "#2 String"), "Quality", True, metric="f1"),
    "rte": GlueTask("rte", "RTE", ("sentence1", "sentence2"), "label", True, ("entailment", "not_entailment")),
    "qnli": GlueTask("qnli", "QNLI", ("question", "sentence"), "label", True, ("entailment", "not_entailment")),
    "wnli": GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), "label", True),
    "stsb": GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), "score", True, is_regression=True, metric="pearson"),
    "qqp": GlueTask("qqp", "QQP", ("question1", "question2"), "is_duplicate", True, metric="f1"),
    "mnli": GlueTask(
        "mnli", "MNLI", ("sentence1", "sentence2"), "gold_label", True, ("entailment", "neutral", "contradiction")
    ),
}

SPLIT_FILES = {"train": ("train.tsv",), "dev": ("dev.tsv", "dev_matched.tsv", "validation.tsv"), "test": ("test.tsv",)}


def glue_task(task: str) -> GlueTask:
    """Look a task up by any usual spelling ("SST-2", "sst2", "sst-2", "STS-B", ...)."""
    key = str(task).lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise DataError(f"unknown GLUE task '{task}'; valid tasks: {sorted(GLUE_TASKS)}.")
    return GLUE_TASKS[key]


class GlueDataset(Dataset):
    """Tokenized GLUE examples: items ``{input_ids, attention_mask, [token_type_ids], labels}``.

    Attributes: ``task``, ``num_labels`` (1 for regression), ``is_regression``, ``metric`` (main metric
    name: accuracy | f1 | matthews | pearson), ``label_names``, ``texts`` (the raw text tuples),
    ``pad_token_id`` (for :func:`lte.data.pad_collate`).
    """

    def __init__(self, task: GlueTask, features: list[dict], texts: list[tuple], labels: list,
                 pad_token_id: int = 0):
        self.task = task.name
        self.pad_token_id = pad_token_id
        self.num_labels = task.num_labels
        self.is_regression = task.is_regression
        self.metric = task.metric
        self.label_names = list(task.label_names)
        self.features = features
        self.texts = texts
        self.labels = labels

    def __len__(self) -> int:
        return len(self.features)

    def select(self, indices) -> GlueDataset:
        """The examples at `indices` (e.g. a range) as a dataset of the same task."""
        out = copy.copy(self)
        idx = list(indices)
        out.features = [self.features[i] for i in idx]
        out.texts = [self.texts[i] for i in idx]
        out.labels = [self.labels[i] for i in idx]
        return out

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {k: torch.tensor(v, dtype=torch.long) for k, v in self.features[i].items()}
        dtype = torch.float32 if self.is_regression else torch.long
        item["labels"] = torch.tensor(self.labels[i], dtype=dtype)
        return item


def find_split_file(task: GlueTask, data_dir_or_file: str | os.PathLike, split: str) -> Path:
    """The TSV for ``split``: the file itself, ``DIR/<split>.tsv``, or ``DIR/<TaskFolder>/<split>.tsv``."""
    if split not in SPLIT_FILES:
        raise DataError(f"unknown split '{split}'; choose one of {list(SPLIT_FILES)}.")
    p = Path(data_dir_or_file).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        for folder in (p, p / task.folder, p / task.name, p / task.folder.lower()):
            for name in SPLIT_FILES[split]:
                if (folder / name).is_file():
                    return folder / name
        raise DataError(
            f"no {split} file for {task.folder} under '{p}': looked for {list(SPLIT_FILES[split])} in it and in "
            f"'{task.folder}/'. Pass the GLUE data folder, the task folder, or the .tsv file."
        )
    raise DataError(f"GLUE data not found: '{p}'. Pass the GLUE data folder, the task folder, or a .tsv file.")


def _parse_label(raw: str, task: GlueTask, where: str):
    raw = raw.strip()
    if task.is_regression:
        try:
            return float(raw)
        except ValueError as err:
            raise DataError(f"{where}: label '{raw}' is not a number (STS-B scores are floats).") from err
    if task.label_names:
        if raw in task.label_names:
            return task.label_names.index(raw)
        if raw.isdigit() and int(raw) < len(task.label_names):
            return int(raw)
        raise DataError(f"{where}: label '{raw}' is not one of {list(task.label_names)}.")
    if raw in ("0", "1"):
        return int(raw)
    raise DataError(f"{where}: label '{raw}' is not 0 or 1.")


def read_glue_tsv(task: GlueTask, path: Path) -> tuple[list[tuple], list]:
    """Parse a GLUE TSV into text tuples and labels; rows are checked and errors carry the line number."""
    rows = list(csv.reader(io.StringIO(read_utf8(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise DataError(f"'{path}' is empty.")
    first_line = 1
    if task.header:
        header = [c.strip() for c in rows[0]]
        wanted = [*task.text_columns, task.label_column]
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(
                f"'{path}' lacks column(s) {missing} needed for {task.folder}; found columns {header}. "
                f"(Is this the right task? CoLA files have no header line.)"
            )
        text_idx = [header.index(c) for c in task.text_columns]
        label_idx = header.index(task.label_column)
        rows, first_line = rows[1:], 2
    else:
        text_idx, label_idx = list(task.text_columns), task.label_column
        if rows[0] and rows[0][0].strip().lower() in ("index", "sentence", "id"):
            raise DataError(f"'{path}' starts with a header line {rows[0]}, but {task.folder} files have none.")
    needed = max([*text_idx, label_idx]) + 1
    texts, labels = [], []
    for offset, row in enumerate(rows):
        where = f"'{path}' line {first_line + offset}"
        if len(row) < needed:
            raise DataError(f"{where}: {len(row)} tab-separated fields, {task.folder} needs at least {needed}.")
        texts.append(tuple(row[i].strip() for i in text_idx))
        labels.append(_parse_label(row[label_idx], task, where))
    if not texts:
        raise DataError(f"'{path}' holds a header but no examples.")
    return texts, labels


def _hub_glue(task: GlueTask, split: str) -> tuple[list[tuple], list]:
    hub_split = {"dev": "validation_matched" if task.name == "mnli" else "validation"}.get(split, split)
    data = hub_dataset("nyu-mll/glue", hub_split, config=task.name)
    names = {"sst2": ("sentence",), "cola": ("sentence",), "mrpc": ("sentence1", "sentence2"),
             "stsb": ("sentence1", "sentence2"), "rte": ("sentence1", "sentence2"),
             "wnli": ("sentence1", "sentence2"), "qnli": ("question", "sentence"),
             "qqp": ("question1", "question2"), "mnli": ("premise", "hypothesis")}[task.name]
    texts = list(zip(*(data[n] for n in names)))
    return texts, list(data["label"])


def load_glue(
    task: str,
    data_dir_or_file: str | os.PathLike,
    tokenizer,
    split: str = "train",
    max_length: int = 128,
    max_examples: int | None = None,
) -> GlueDataset:
    """Load a GLUE task split, tokenized (truncated to ``max_length``, padded later by :func:`pad_collate`).

    ``task``: sst2, cola, mrpc, rte, qnli, wnli, stsb (regression), qqp, mnli (any usual spelling).
    ``data_dir_or_file``: the GLUE folder (with ``SST-2/`` etc.), the task folder, a .tsv file, or
    ``"hub"`` (needs ``datasets`` and a network).
    """
    spec = glue_task(task)
    if str(data_dir_or_file) == "hub":
        texts, labels = _hub_glue(spec, split)
    else:
        texts, labels = read_glue_tsv(spec, find_split_file(spec, data_dir_or_file, split))
    if max_examples is not None:
        texts, labels = texts[:max_examples], labels[:max_examples]
    columns = list(zip(*texts))  # one tuple per text column
    encoded = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    return GlueDataset(spec, features, texts, labels, pad_token_id=pad_id)
