"""Shared helpers of the data loaders: the error type, file checks, JSON/JSONL reading."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from lte.errors import LTEError


class DataError(LTEError):
    """Bad data input: a missing or empty file, a malformed row, wrong columns, an unknown task."""


PathLike = str | os.PathLike


def existing_path(path: PathLike, what: str, hint: str) -> Path:
    """Return ``path`` as a Path, or raise a DataError naming it and saying what to pass instead."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} not found: '{p}'. {hint}")
    return p


def read_utf8(path: Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped); a binary or non-UTF-8 file is a one-line DataError."""
    raw = Path(path).read_bytes()
    if b"\x00" in raw[:65536]:
        raise DataError(f"'{path}' is a binary file, not text (it holds NUL bytes); pass a UTF-8 text file "
                        "(.txt, .jsonl, .tsv).")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"'{path}' is not UTF-8 text: byte 0x{raw[err.start]:02x} on line {line} cannot be decoded. "
            f"Convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8 '{path}' > new.txt) and pass the new file."
        ) from None


def nonempty_text(path: Path) -> str:
    """Read a UTF-8 text file (a BOM is dropped); raise when it holds nothing but whitespace."""
    text = read_utf8(path)
    if not text.strip():
        raise DataError(f"'{path}' is empty: it holds no text to load.")
    return text


def read_json_records(path: Path) -> list[dict]:
    """Read a JSON list of objects or a JSONL file (one object a line) into a list of dicts.

    A malformed line is reported with its line number.
    """
    text = nonempty_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"'{path}' is not valid JSON (line {err.lineno}, column {err.colno}): {err.msg}.") from err
        _check_objects(records, path, offset=0)
        return records
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"'{path}' line {line_no} is not valid JSON ({err.msg}); expected one JSON object a line (JSONL)."
            ) from err
        if not isinstance(record, dict):
            raise DataError(f"'{path}' line {line_no} holds a {type(record).__name__}, expected a JSON object.")
        records.append(record)
    return records


def _check_objects(records: object, path: Path, offset: int) -> None:
    if not isinstance(records, list):
        raise DataError(f"'{path}' holds a JSON {type(records).__name__}; expected a list of objects or JSONL.")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"'{path}' item {i + offset} is a {type(record).__name__}, expected a JSON object.")


def require_fields(record: dict, fields: Iterable[str], where: str, hint: str = "") -> None:
    """Raise a DataError listing the found fields when ``record`` lacks one of ``fields``.

    ``hint`` says how to name the field instead (e.g. the ``--text-field`` flag); by default:
    rename the fields in the file.
    """
    missing = [f for f in fields if f not in record]
    if missing:
        raise DataError(
            f"{where}: missing field(s) {missing}; found fields {sorted(record)}. "
            + (hint or "Rename the fields in the file.")
        )


def hub_dataset(name: str, split: str, config: str | None = None):
    """Load a dataset from the Hugging Face hub with the optional ``datasets`` package.

    ``name`` may carry a config after a colon (``"wikitext:wikitext-2-raw-v1"``).
    """
    try:
        import datasets
    except ImportError as err:
        raise DataError(
            f"'{name}' is neither an existing local file nor folder, and hub dataset names need the "
            "`datasets` package (pip install datasets) and a network. Pass a path to a local file instead."
        ) from err
    if config is None and ":" in name:
        name, config = name.split(":", 1)
    from lte.hub import check_hub_dataset

    check_hub_dataset(name)
    try:
        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # network errors, unknown names, ...: say what failed
        raise DataError(f"could not load hub dataset '{name}' (config {config}, split {split}): {err}") from err


def looks_local(path: PathLike) -> bool:
    """True when ``path`` exists or looks like a file path rather than a hub name ("org/name").

    A path looks local when it has a file suffix (``.json``) or starts with ``/``, ``.`` or ``~``.
    """
    text = str(path)
    return Path(text).expanduser().exists() or text.startswith(("/", ".", "~")) or bool(Path(text).suffix)
