"""Reading the package's files: the one JSONL reader (task suites, samples, corpora,
SFT pairs; `dllm.prepare` parses line by line with `parse_jsonl_line`). Errors name the
file and line."""
from __future__ import annotations

import gzip
import json
import os
from typing import Iterator


def decode_utf8(data: bytes, where: str, first_line: int = 1) -> str:
    """bytes -> str; invalid UTF-8 raises ValueError naming `where` and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + data[:e.start].count(b"\n")
        raise ValueError(f"{where}:{line}: not valid UTF-8 ({e.reason})") from None


def parse_jsonl_line(raw: bytes, path: str, lineno: int) -> dict | None:
    """The JSON object on one line of a .jsonl file (None for a blank line). Bad UTF-8,
    malformed JSON or a value that is not an object raises ValueError naming file and line."""
    line = decode_utf8(raw, path, lineno)
    if not line.strip():
        return None
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def open_lines(path: str):
    """A binary file object over a .jsonl or .jsonl.gz file (a missing one raises)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    return (gzip.open if path.endswith(".gz") else open)(path, "rb")


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of a .jsonl or .jsonl.gz file, where
    `where` is "path:line" and record a JSON object. A missing file, bad UTF-8,
    malformed JSON or a line that is not an object raises naming file and line."""
    with open_lines(path) as f:
        for lineno, raw in enumerate(f, 1):
            record = parse_jsonl_line(raw, path, lineno)
            if record is not None:
                yield f"{path}:{lineno}", record
