"""Files on local paths and object stores (gs://) alike: what a run directory needs
(open, exists, makedirs, listdir, copy, remove, whole-file reads and writes) and the
package's one JSONL reader (task suites, samples, corpora, SFT pairs; `dllm.prepare`
parses line by line with `parse_jsonl_line`). Errors name the file and line.

Object stores go through `etils.epath` (what orbax uses too): gs:// needs `gcsfs`
installed (or TensorFlow, which epath then prefers). An object is written whole and
cannot be appended to, so a file opened for writing on an object store is kept in
memory and uploaded whole (readers see the old object or the new one, never part of
one); opened with "a", it starts from the existing object. Local writes through
`write_bytes` / `write_text` are atomic too (temporary file, then rename).
"""
from __future__ import annotations

import builtins
import contextlib
import gzip
import json
import os
import time
import uuid
from typing import IO, Iterator

from etils import epath

# A file being written to an object store is uploaded on flush() at most this often
# (each upload rewrites the whole object), and always on close().
UPLOAD_EVERY_S = 30.0


def is_remote(path: str) -> bool:
    """Whether `path` names an object-store URL (gs://bucket/...), not a local path."""
    return "://" in str(path)


def open(path: str, mode: str = "r") -> IO:  # noqa: A001 (the file-system layer's open)
    """`path` opened in `mode` (r, rb, w, wb, a, ab), local or remote (see the module doc)."""
    if mode not in ("r", "rb", "w", "wb", "a", "ab"):
        raise ValueError(f"{path}: unsupported mode {mode!r} (r, rb, w, wb, a, ab)")
    if not is_remote(path):
        return builtins.open(path, mode)
    if mode.startswith("r"):
        return epath.Path(path).open(mode)
    return _ObjectWriter(path, binary=mode.endswith("b"), append=mode.startswith("a"))


class _ObjectWriter:
    """A file on an object store being written: the whole content in memory, uploaded
    on flush() (at most every UPLOAD_EVERY_S) and on close()."""

    def __init__(self, path: str, binary: bool, append: bool):
        self.path, self.binary = path, binary
        self._data = bytearray(read_bytes(path) if append and exists(path) else b"")
        self._dirty, self._uploaded_at = True, -float("inf")

    def write(self, data) -> int:
        self._data += data if self.binary else data.encode("utf-8")
        self._dirty = True
        return len(data)

    def flush(self):
        if time.monotonic() - self._uploaded_at >= UPLOAD_EVERY_S:
            self._upload()

    def close(self):
        self._upload()

    def _upload(self):
        if self._dirty:
            with epath.Path(self.path).open("wb") as f:
                f.write(bytes(self._data))
            self._dirty, self._uploaded_at = False, time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def exists(path: str) -> bool:
    return epath.Path(path).exists()


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir()


def makedirs(path: str):
    """Creates the directory and its parents if missing (object stores have no
    directories: nothing to do there beyond what the store does)."""
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: str) -> list[str]:
    """The sorted names (not paths) of the entries of directory `path`."""
    return sorted(p.name for p in epath.Path(path).iterdir())


def rename(src: str, dst: str):
    """Renames the file or directory `src` to `dst` (on an object store: copied, then
    deleted)."""
    epath.Path(src).rename(dst)


def remove(path: str):
    """Deletes the file `path`."""
    epath.Path(path).unlink()


def read_bytes(path: str) -> bytes:
    if not exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    return epath.Path(path).read_bytes()


def read_text(path: str) -> str:
    """The UTF-8 text of `path` (bytes as stored: no newline translation)."""
    return decode_utf8(read_bytes(path), path)


def write_bytes(path: str, data: bytes):
    """Writes `path` whole and atomically (a reader sees the old file or the new one)."""
    if is_remote(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    tmp = f"{path}.tmp{uuid.uuid4().hex}"  # unique per process: several may write at once
    with builtins.open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_text(path: str, text: str):
    write_bytes(path, text.encode("utf-8"))


def copy(src: str, dst: str):
    """Copies the file `src` to `dst` (either may be local or remote), atomically."""
    write_bytes(dst, read_bytes(src))


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


@contextlib.contextmanager
def open_lines(path: str) -> Iterator[IO[bytes]]:
    """Within: a binary file object over a .jsonl or .jsonl.gz file, local or remote
    (a missing one raises)."""
    if not exists(path) or isdir(path):
        raise FileNotFoundError(f"no such file: {path}")
    with open(path, "rb") as raw:
        with gzip.open(raw) if path.endswith(".gz") else contextlib.nullcontext(raw) as f:
            yield f


def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for each non-blank line of a .jsonl or .jsonl.gz file, where
    `where` is "path:line" and record a JSON object. A missing file, bad UTF-8,
    malformed JSON or a line that is not an object raises naming file and line."""
    with open_lines(path) as f:
        for lineno, raw in enumerate(f, 1):
            record = parse_jsonl_line(raw, path, lineno)
            if record is not None:
                yield f"{path}:{lineno}", record
