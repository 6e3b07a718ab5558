"""Reading JSON records, from a local file or a Hugging Face hub dataset.

Prompt sets (firm.prompts) and preference pairs (firm.rewards.pairs) are both lists of JSON
objects. Each source yields ``(where, record)`` items, ``where`` naming the place of the record
("path:LINE" or "hf:NAME row N") so that the caller's errors can point back at the data:

* a local ``.jsonl`` / ``.jsonl.gz`` file (one object per line, blank lines skipped) or a
  ``.json`` / ``.json.gz`` file (a list of objects, or one object), read by `read_records`;
* ``hf:OWNER/NAME[/DATA_DIR][:SPLIT]``, loaded with the ``datasets`` library by `hub_records`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from firm.errors import FirmError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
JSON_SUFFIXES = (".json", ".json.gz")
HUB_PREFIX = "hf:"
HUB_FORM = "hf:OWNER/NAME[/DATA_DIR][:SPLIT]"

Record = tuple[str, Any]
"""(where, decoded JSON value)"""


class RecordFileError(FirmError, ValueError):
    """A record file cannot be read or decoded; the message names the file and, where known, the line."""


class HubDatasetError(FirmError, ConnectionError):
    """A hub dataset cannot be loaded (offline, unknown name, bad split); the message says what to do."""


def read_records(path: str | Path) -> Iterator[Record]:
    """The records of a local .jsonl / .jsonl.gz / .json / .json.gz file, in file order.

    JSON Lines files are read as a stream, so a caller that stops early does not read (or
    check) the rest."""
    path = Path(path)
    lowered = path.name.lower()
    if lowered.endswith(JSONL_SUFFIXES):
        yield from jsonl_records(_stream_lines(path), str(path))
    elif lowered.endswith(JSON_SUFFIXES):
        yield from _json_document_records(_read_text(path), str(path))
    else:
        raise RecordFileError(f"{path}: unsupported file type; expected one of {JSONL_SUFFIXES + JSON_SUFFIXES}")


def jsonl_records(lines: Iterable[str], name: str) -> Iterator[Record]:
    """("name:LINE", decoded value) for every non-blank line; line numbers count from 1.

    Split text on "\\n" only: str.splitlines also breaks on U+2028, which JSON strings may hold."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name}:{line_number}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as error:
            raise RecordFileError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") else open(path, encoding="utf-8")


def _stream_lines(path: Path) -> Iterator[str]:
    """The lines of a text file, gunzipped when the name ends in .gz; read errors name the line."""
    line_number = 0
    try:
        with _open_text(path) as handle:
            for line_number, line in enumerate(handle, start=1):
                yield line
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise RecordFileError(f"{path}: cannot read the file ({error})") from error
    except UnicodeDecodeError as error:
        raise RecordFileError(f"{path}:{line_number + 1}: not UTF-8 text") from error


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 text, gunzipped when the name ends in .gz."""
    try:
        with _open_text(path) as handle:
            return handle.read()
    except (OSError, EOFError) as error:
        raise RecordFileError(f"{path}: cannot read the file ({error})") from error
    except UnicodeDecodeError as error:
        raise RecordFileError(f"{path}: not UTF-8 text ({error})") from error


def _json_document_records(text: str, name: str) -> Iterator[Record]:
    """Records of a .json file (a list of objects, or one object) with the line each starts on.

    The whole document is decoded once to report syntax errors with their line; a second
    pass walks the list with `raw_decode` only to learn where each element starts, so that
    an error about record 412 points at its line rather than at "record 412".
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecordFileError(f"{name}:{error.lineno}: invalid JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(document, list):
        yield f"{name}:{_line_of(text, _skip_whitespace(text, 0))}", document
        return
    decoder = json.JSONDecoder()
    position = _skip_whitespace(text, _skip_whitespace(text, 0) + 1)  # just past "["
    for element in document:
        _, end = decoder.raw_decode(text, position)
        yield f"{name}:{_line_of(text, position)}", element
        position = _skip_whitespace(text, end)
        if text[position] == ",":
            position = _skip_whitespace(text, position + 1)


def _skip_whitespace(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def hub_records(spec: str) -> Iterator[Record]:
    """The rows of ``hf:OWNER/NAME[/DATA_DIR][:SPLIT]`` (split "train" by default) as
    ("spec row N", row), N counting from 1. There is no offline copy to fall back on, so a
    hub that cannot be reached is a HubDatasetError saying to pass a local file instead."""
    name_part, _, split = spec[len(HUB_PREFIX):].partition(":")
    if not name_part:
        raise RecordFileError(f"{spec!r} names no dataset; expected {HUB_FORM}")
    pieces = name_part.split("/")
    if len(pieces) < 2 or not all(pieces):
        raise RecordFileError(f"{spec}: expected {HUB_FORM}")
    name, data_dir = "/".join(pieces[:2]), "/".join(pieces[2:]) or None
    split = split or "train"
    import datasets  # deferred: importing it costs seconds and only this path needs it

    try:
        rows = datasets.load_dataset(name, data_dir=data_dir, split=split)
    except Exception as error:  # offline, unknown dataset, bad split: all end the same way
        raise HubDatasetError(
            f"{spec}: cannot load the dataset from the Hugging Face Hub ({type(error).__name__}: {error}). "
            "The hub may be unreachable from this machine (or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set); "
            "download the data and pass a local .jsonl, .jsonl.gz, .json or .json.gz file instead."
        ) from None
    for index, row in enumerate(rows, start=1):
        yield f"{spec} row {index}", row
