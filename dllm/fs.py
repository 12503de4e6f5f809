"""Reading the package's files: the one JSONL reader (task suites, samples, corpora,
SFT pairs). Errors name the file and line."""
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


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of a .jsonl or .jsonl.gz file, where
    `where` is "path:line" and record a JSON object. A missing file, bad UTF-8,
    malformed JSON or a line that is not an object raises naming file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, lineno)
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record
