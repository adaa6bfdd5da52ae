"""Evaluation data: generation pairs (XSum, E2E) and multiple-choice questions (MMLU, PIQA, BoolQ, ...)."""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from lte.data._common import (
    DataError,
    existing_path,
    nonempty_text,
    read_json_records,
    read_utf8,
    require_fields,
)

# Prompt layouts for the generation tasks ({source} is the article / meaning representation).
PROMPT_TEMPLATES = {
    "xsum": "Article: {source}\n\nOne-sentence summary:",
    "e2e": "Meaning representation: {source}\nDescription:",
}


def load_xsum(
    path: str | os.PathLike,
    max_examples: int | None = None,
    source_field: str = "document",
    target_field: str = "summary",
) -> list[tuple[str, str]]:
    """XSum-style JSON/JSONL ``{document, summary}`` -> list of ``(article, reference summary)``."""
    p = existing_path(path, "XSum file", "Pass a JSONL file of {document, summary} objects.")
    records = read_json_records(p)
    pairs = []
    for i, record in enumerate(records[:max_examples] if max_examples else records):
        require_fields(record, [source_field, target_field], f"'{p}' record {i + 1}")
        pairs.append((str(record[source_field]).strip(), str(record[target_field]).strip()))
    if not pairs:
        raise DataError(f"'{p}' holds no examples.")
    return pairs


def load_e2e(path: str | os.PathLike, max_examples: int | None = None, group: bool = False) -> list[tuple]:
    """E2E NLG text file (``meaning representation || reference`` a line) -> ``(mr, reference)`` pairs.

    ``group=True`` returns one ``(mr, [references...])`` per distinct meaning representation, in
    file order (E2E has several references per MR; :func:`lte.evaluation.rouge_l` takes a list).
    ``max_examples`` counts returned items.
    """
    p = existing_path(path, "E2E file", "Pass the E2E text file with one 'MR||reference' a line.")
    pairs: list[tuple[str, str]] = []
    for line_no, line in enumerate(nonempty_text(p).splitlines(), start=1):
        if not line.strip():
            continue
        if "||" not in line:
            raise DataError(f"'{p}' line {line_no}: no '||' between the meaning representation and the reference.")
        source, reference = line.split("||", 1)
        pairs.append((source.strip(), reference.strip()))
    if not group:
        return pairs[:max_examples] if max_examples else pairs
    grouped: dict[str, list[str]] = {}
    for source, reference in pairs:
        grouped.setdefault(source, []).append(reference)
    items = list(grouped.items())
    return items[:max_examples] if max_examples else items


@dataclass
class MCExample:
    """One multiple-choice question, already in scoring form.

    The model scores each continuation ``choices[i]`` after ``prompt``; ``answer`` is the index of
    the right one. ``subject`` groups MMLU questions.
    """

    prompt: str
    choices: list[str]
    answer: int
    subject: str = ""
    meta: dict = field(default_factory=dict)

    def as_shot(self) -> str:
        """The solved example, as used in a few-shot prefix."""
        return self.prompt + self.choices[self.answer]


_OPTION = re.compile(r"^\s*([A-Z])[.)]\s?(.*)$")


def parse_options(options: str, where: str) -> list[tuple[str, str]]:
    """``"A. foo\\nB. bar"`` -> ``[("A", "foo"), ("B", "bar")]`` (a line without a letter continues the last)."""
    parsed: list[list[str]] = []
    for line in options.strip("\n").splitlines():
        match = _OPTION.match(line)
        if match:
            parsed.append([match.group(1), match.group(2).strip()])
        elif parsed and line.strip():
            parsed[-1][1] += " " + line.strip()
    if len(parsed) < 2:
        raise DataError(f"{where}: could not read at least two 'A. ...' options from {options[:80]!r}.")
    return [(letter, text) for letter, text in parsed]


def _answer_index(answer: str, options: list[tuple[str, str]], where: str) -> int:
    answer = str(answer).strip()
    letters = [letter for letter, _ in options]
    match = _OPTION.match(answer)
    if match and match.group(1) in letters:
        return letters.index(match.group(1))
    if answer in letters:
        return letters.index(answer)
    texts = [text for _, text in options]
    if answer in texts:
        return texts.index(answer)
    raise DataError(f"{where}: answer {answer!r} matches none of the options {letters}.")


def mcqa_example(record: dict, where: str) -> MCExample:
    """Turn one ``{question, options, answer[, passage]}`` record into an :class:`MCExample`.

    Records without options and with a True/False answer (BoolQ) become yes/no questions.
    """
    require_fields(record, ["question", "answer"], where)
    question = str(record["question"]).strip()
    passage = str(record.get("passage") or "").strip()
    context = f"{passage}\n" if passage else ""
    if not str(record.get("options") or "").strip():
        answer = str(record["answer"]).strip().lower()
        if answer not in ("true", "false", "yes", "no"):
            raise DataError(f"{where}: no 'options' and the answer {record['answer']!r} is not True/False.")
        prompt = f"{context}Question: {question}?\nAnswer:"
        return MCExample(prompt, [" no", " yes"], int(answer in ("true", "yes")))
    options = parse_options(str(record["options"]), where)
    prompt = f"{context}Question: {question}\nAnswer:"
    return MCExample(prompt, [" " + text for _, text in options], _answer_index(record["answer"], options, where))


def load_mcqa(path: str | os.PathLike, max_examples: int | None = None) -> list[MCExample]:
    """Multiple-choice JSONL (PIQA, BoolQ, CommonsenseQA, OpenBookQA, SIQA, ...) -> list of :class:`MCExample`.

    Each record: ``{question, options: "A. ...\\nB. ...", answer: "B. ..." or "B"[, passage]}``; BoolQ
    records (no options, answer True/False) score " no" / " yes".
    """
    p = existing_path(path, "multiple-choice file", "Pass a JSONL file of {question, options, answer} objects.")
    records = read_json_records(p)
    if max_examples:
        records = records[:max_examples]
    examples = [mcqa_example(r, f"'{p}' record {i + 1}") for i, r in enumerate(records)]
    if not examples:
        raise DataError(f"'{p}' holds no examples.")
    return examples


MMLU_COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
LETTERS = "ABCD"


def _read_mmlu_csv(path: Path) -> list[tuple[str, list[str], int]]:
    rows = list(csv.reader(io.StringIO(read_utf8(path), newline="")))
    if not rows:
        raise DataError(f"'{path}' is empty.")
    header = [c.strip() for c in rows[0]]
    if header[: len(MMLU_COLUMNS)] == list(MMLU_COLUMNS):
        rows = rows[1:]
        first_line = 2
    elif len(header) == 6 and header[5].strip() in LETTERS + "0123":
        first_line = 1  # the original MMLU files: no header, answer letter
    else:
        raise DataError(f"'{path}': expected columns {list(MMLU_COLUMNS)}; found {header}.")
    items = []
    for offset, row in enumerate(rows):
        if not row:
            continue
        where = f"'{path}' line {first_line + offset}"
        if len(row) != 6:
            raise DataError(f"{where}: {len(row)} columns, expected 6 (question, 4 choices, answer).")
        raw = row[5].strip()
        if raw in LETTERS:
            answer = LETTERS.index(raw)
        elif raw in ("0", "1", "2", "3"):
            answer = int(raw)
        else:
            raise DataError(f"{where}: answer {raw!r} is not 0-3 or A-D.")
        items.append((row[0].strip(), [c.strip() for c in row[1:5]], answer))
    return items


def _mmlu_block(question: str, choices: list[str]) -> str:
    lines = [question] + [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_subjects(mmlu_dir: str | os.PathLike, split: str = "test") -> list[str]:
    """Subjects that have a ``<split>/<subject>_<split>.csv`` file."""
    folder = existing_path(Path(mmlu_dir) / split, f"MMLU {split} folder", "Pass the MMLU folder holding dev/ and test/.")
    return sorted(f.name[: -len(f"_{split}.csv")] for f in folder.glob(f"*_{split}.csv"))


def load_mmlu(
    mmlu_dir: str | os.PathLike,
    subjects: list[str] | None = None,
    split: str = "test",
    num_shots: int = 5,
    max_per_subject: int | None = None,
) -> list[MCExample]:
    """MMLU questions as :class:`MCExample` (choices " A".." D"), each prompt with a ``num_shots`` dev prefix.

    Layout: ``<mmlu_dir>/{dev,test}/<subject>_{dev,test}.csv``. The prompt follows the usual MMLU
    form: a subject header, ``num_shots`` solved dev questions, then the question with lettered
    choices and ``Answer:``; the model scores the answer letters.
    """
    available = mmlu_subjects(mmlu_dir, split)
    if not available:
        raise DataError(f"no '*_{split}.csv' files under '{Path(mmlu_dir) / split}'.")
    chosen = available if subjects is None else list(subjects)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise DataError(f"unknown MMLU subject(s) {unknown}; available: {available}.")
    examples = []
    for subject in chosen:
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = ""
        if num_shots:
            dev_file = existing_path(Path(mmlu_dir) / "dev" / f"{subject}_dev.csv", "MMLU dev file",
                                     "Few-shot prompts need the dev split; pass num_shots=0 to go without.")
            for question, choices, answer in _read_mmlu_csv(dev_file)[:num_shots]:
                shots += f"{_mmlu_block(question, choices)} {LETTERS[answer]}\n\n"
        items = _read_mmlu_csv(Path(mmlu_dir) / split / f"{subject}_{split}.csv")
        for question, choices, answer in items[:max_per_subject] if max_per_subject else items:
            prompt = header + shots + _mmlu_block(question, choices)
            examples.append(MCExample(prompt, [f" {letter}" for letter in LETTERS], answer, subject=subject))
    return examples
