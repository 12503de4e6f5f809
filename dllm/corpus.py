"""Prepared corpora: the on-disk format `python -m dllm.prepare` writes, read lazily.

A prepared directory (a local path or any tensorstore kvstore URL, e.g. gs://bucket/dir):

  metadata.json           written last (its presence means the preparation finished):
                          kind ("pretrain" | "sft"), source, tokenizer {file, sha256,
                          vocab_size}, dtype, splits {train, eval: {documents, tokens,
                          sha256}}, bad records, layout
  tokenizer.model | tokenizer.json   the tokenizer the ids come from
  {train,eval}/tokens           zarr3 uint16 | uint32 [tokens]: the documents' ids, concatenated
  {train,eval}/offsets          zarr3 int64 [documents + 1]: document d is
                                tokens[offsets[d]:offsets[d + 1]]
  {train,eval}/prompt_lengths   (kind "sft") zarr3 int32 [documents]
  progress/                     one JSON record per finished shard (resume, checksums)

A pretraining document is stored followed by <|endoftext|>, so the token array is the
stream the in-memory pipeline packs; an SFT pair is [chat-templated prompt][response,
<|im_end|>] with the prompt's length in prompt_lengths.
"""
from __future__ import annotations

import json
import os

import numpy as np
import tensorstore as ts

METADATA = "metadata.json"    # written last by dllm.prepare: its presence means finished
SPLITS = ("train", "eval")


def kvstore_url(path: str) -> str:
    """The tensorstore kvstore URL of a directory: "gs://..." (any URL) as given, a
    local path as file://."""
    url = path if "://" in path else "file://" + os.path.abspath(path)
    return url.rstrip("/") + "/"


def array_url(url: str, split: str, name: str) -> str:
    """The kvstore directory of array `name` ("tokens", "offsets", "prompt_lengths") of a
    split, under the prepared directory at kvstore URL `url`."""
    return f"{url}{split}/{name}/"


def read_bytes(url: str, key: str) -> bytes | None:
    """The contents of `key` in the kvstore directory `url`; None if absent."""
    result = ts.KvStore.open(url).result().read(key).result()
    return result.value if result.state == "value" else None


def read_json(url: str, key: str):
    """The JSON value stored under `key` in the kvstore directory `url`; None if absent."""
    contents = read_bytes(url, key)
    return None if contents is None else json.loads(contents)


def open_array(url: str, *, write: bool = False, metadata: dict | None = None) -> ts.TensorStore:
    """The zarr3 array at kvstore directory `url`: opened for reading (or also writing),
    or created from the zarr3 `metadata`, replacing any array there."""
    spec = {"driver": "zarr3", "kvstore": url}
    if metadata is not None:
        return ts.open({**spec, "metadata": metadata}, create=True,
                       delete_existing=True).result()
    return ts.open(spec, open=True, read=True, write=write).result()


class PreparedCorpus:
    """One split ("train" or "eval") of a directory written by `python -m dllm.prepare`.

    Reads are lazy slices: `read(a, b)` touches only the chunks of tokens a..b.
    Documents: document d is tokens[offsets[d]:offsets[d+1]]; a pretraining corpus
    (kind "pretrain") stores each document followed by <|endoftext|>; an SFT corpus
    (kind "sft") stores [templated prompt][response, <|im_end|>], with the prompt's
    length in prompt_lengths[d].
    """

    def __init__(self, path: str, split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        url = kvstore_url(path)
        self.path, self.split = path, split
        self.metadata = read_json(url, METADATA)
        if self.metadata is None:
            raise FileNotFoundError(
                f"{path}: no {METADATA}: not a prepared corpus, or its preparation has not "
                "finished (rerun the same `python -m dllm.prepare` command to resume it)")
        self.kind = self.metadata["kind"]
        self.tokens = open_array(array_url(url, split, "tokens"))
        self._url = url
        counts = self.metadata["splits"][split]
        if self.tokens.shape[0] != counts["tokens"]:
            raise ValueError(f"{path} ({split}): {self.tokens.shape[0]} tokens stored but "
                             f"{METADATA} says {counts['tokens']}")
        self.num_tokens, self.num_documents = counts["tokens"], counts["documents"]

    def read(self, start: int, stop: int) -> np.ndarray:
        """int32[stop - start]: tokens start..stop-1."""
        return self.tokens[start:stop].read().result().astype(np.int32)

    def offsets(self) -> np.ndarray:
        """int64[num_documents + 1]: where each document starts (and the end)."""
        out = open_array(array_url(self._url, self.split, "offsets")).read().result()
        if len(out) != self.num_documents + 1:
            raise ValueError(f"{self.path} ({self.split}): {len(out) - 1} document offsets "
                             f"stored but {METADATA} says {self.num_documents}")
        return out

    def prompt_lengths(self) -> np.ndarray:
        """int32[num_documents] (SFT corpora): the templated prompt's tokens per pair."""
        if self.kind != "sft":
            raise ValueError(f"{self.path}: a {self.kind!r} corpus has no prompts (packing "
                             "'sft' needs a corpus prepared with --source=sft)")
        lengths = open_array(array_url(self._url, self.split, "prompt_lengths"))
        return lengths.read().result().astype(np.int32)


