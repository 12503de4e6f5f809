"""Corpora and grain input pipelines: read, tokenize, pack, shard by process, shuffle, batch.

`config.data` fields (an ml_collections.ConfigDict; `default_config()` has the defaults):

  source          "stdlib": every .py file of the running interpreter's standard library
                    (real code on every machine, no download; site-packages excluded, the
                    few files that are deliberately not UTF-8 skipped);
                  "text": each file under `path` is one document, read as UTF-8;
                  "jsonl": each line of the files under `path` is a JSON object whose
                    `text_field` is one document;
                  "sft": each line of the files under `path` is {"prompt": str,
                    "response": str} or {"messages": [{"role", "content"}, ...]} whose
                    last message is the assistant's response, for supervised fine-tuning
                    with the chat template;
                  "tasks": the (question, reference solution) pairs of the task suite
                    named by `path` (dllm.tasks.load_tasks, e.g. "synthetic:sft"),
                    as "sft" pairs;
                  "prepared": arrays written by `python -m dllm.prepare` (tokenized once,
                    read lazily from a local path or gs://): `path` (one prepared
                    directory) or the sources of `mixture`.
                  The first five are read and tokenized in memory at the start of a run.
  path            a file, a directory (every file under it, recursively) or a glob;
                  for "stdlib", optional comma-separated globs relative to the stdlib
                  root that select a subset (e.g. "json/*.py,asyncio/*.py");
                  for "prepared", a prepared directory (when `mixture` is empty).
  text_field      the document's key in "jsonl" objects (default "text").
  seq_len         tokens per sequence (default 256).
  eval_fraction   share of documents (or SFT pairs) held out for evaluation, in [0, 1)
                  (default 0.05). The split is fixed (independent of the run's seed).
                  "prepared": fixed when the corpus was prepared (its eval split).
  max_documents   use at most this many documents / pairs, 0 = all (default 0). They are
                  a fixed pseudo-random subset, so a cap still samples the whole corpus.
  tokenizer       path of an existing tokenizer (.model, tokenizer.json or a Hugging Face
                  directory); "" = train a sentencepiece BPE
                  on the training documents, cached at `workdir/tokenizer.model`.
                  "prepared": "" = the prepared corpus's own tokenizer (copied to workdir);
                  a path must be the very tokenizer the corpus was prepared with.
  vocab_size      vocabulary size when training a tokenizer (default 4096; may come out
                  smaller on a tiny corpus: read `tokenizer.vocab_size`).
  packing         how "prepared" documents become rows of seq_len tokens:
                  "windows": the documents (each ending in <|endoftext|>) concatenated and
                    cut into consecutive windows, as the in-memory sources do (default);
                  "documents": whole documents packed greedily into rows, each row
                    starting at a document start and padded with <|dlm_pad|> (`pad_mask`);
                    a document longer than seq_len is cut into seq_len pieces;
                  "sft": one instruction pair per row (a corpus prepared with --source=sft).
  sft_overflow    a pair longer than seq_len: "truncate" (the prompt is cut from the left,
                  then the response from the right) or "drop" (default "truncate"); the
                  count is logged.
  sft_response_len  in-memory pair sources: 0 = each row is [prompt][response][pads] up to
                  seq_len (DiffuCoder's SFT; default); N > 0 = the layout of a rollout of
                  N tokens: the prompt left-padded to seq_len - N (the padding takes no
                  part: `valid`), then the response padded with <|dlm_pad|> to N. A model
                  warmed up for GRPO then sees in training what it sees when it decodes.
  mixture         "prepared" sources by name: {name: {path, weight, sample_weight, epochs}}.
                  A draw comes from source k with probability proportional to
                  (weight_k, or its number of training tokens when every weight is 0) x
                  sample_weight_k (the paper's math upsampling: sample_weight=3), in a fixed
                  interleaving; each source is shuffled by the seed, anew each epoch, and
                  repeats forever (epochs=0) or for `epochs` passes, after which the
                  mixture ends (Stage 2's 4 epochs). `mixture(config.data).realised(n)` is
                  the share of each source among the first n examples drawn.

Errors in the input name the file and, for line-based formats, the line.
"""
import fnmatch
import glob
import itertools
import os
import sysconfig
import zlib
from typing import Iterator, Sequence

import grain
import ml_collections
import numpy as np
from absl import logging

from dllm import corpus as corpus_lib, fs, mixture as mixture_lib, tasks as tasks_lib
from dllm import tokenizer as tokenizer_lib

# The document order (hence the eval split and the max_documents subset) must not change
# with the run's seed: a fixed seed of its own.
_ORDER_SEED = 20250626
_SOURCES = ("stdlib", "text", "jsonl", "sft", "tasks", "prepared")
_PAIR_SOURCES = ("sft", "tasks")  # (prompt messages, response) pairs: instruction tuning
_PACKINGS = ("windows", "documents", "sft")
_OVERFLOWS = ("truncate", "drop")
_MIXTURE_KEYS = dict(path="", weight=0.0, sample_weight=1.0, epochs=0)
_READ_THREADS = 8   # prepared corpora: rows read concurrently (tensorstore drops the GIL)


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` defaults (see the module docstring for the allowed values)."""
    return ml_collections.ConfigDict(dict(
        source="stdlib", path="", text_field="text", seq_len=256, eval_fraction=0.05,
        max_documents=0, tokenizer="", vocab_size=4096, packing="windows",
        sft_overflow="truncate", sft_response_len=0, mixture={}))


def validate_config(data_cfg: ml_collections.ConfigDict) -> None:
    """Checks `config.data` before a run starts (allowed values, the files it names);
    raises ValueError / FileNotFoundError naming the key."""
    for key, allowed in (("source", _SOURCES), ("packing", _PACKINGS),
                         ("sft_overflow", _OVERFLOWS)):
        if data_cfg[key] not in allowed:
            raise ValueError(f"data.{key}={data_cfg[key]!r}; allowed: {allowed}")
    if data_cfg.seq_len < 2:
        raise ValueError(f"data.seq_len={data_cfg.seq_len}; must be at least 2")
    if data_cfg.sft_response_len and (data_cfg.source not in _PAIR_SOURCES or not
                                      0 < data_cfg.sft_response_len < data_cfg.seq_len):
        raise ValueError(f"data.sft_response_len={data_cfg.sft_response_len}: for the sources "
                         f"{_PAIR_SOURCES} only, and in (0, data.seq_len={data_cfg.seq_len})")
    if not 0 <= data_cfg.eval_fraction < 1:
        raise ValueError(f"data.eval_fraction={data_cfg.eval_fraction}; must be in [0, 1)")
    if data_cfg.max_documents < 0:
        raise ValueError(f"data.max_documents={data_cfg.max_documents}; must be >= 0 (0 = all)")
    if data_cfg.tokenizer and not fs.exists(data_cfg.tokenizer):
        raise FileNotFoundError(f"data.tokenizer={data_cfg.tokenizer!r}: no such file or "
                                "directory")
    if data_cfg.source == "prepared":
        _mixture_sources(data_cfg)
    elif data_cfg.source == "tasks":
        tasks_lib.load_tasks(data_cfg.path)
    elif data_cfg.source != "stdlib":
        resolve_paths(data_cfg.path)


# ----------------------------------------------------------------------------- reading


def stdlib_files(patterns: str = "") -> list[str]:
    """Sorted paths of the .py files of this interpreter's stdlib, without site-packages;
    only those matching one of the comma-separated globs `patterns` (relative to the
    stdlib root, e.g. "json/*.py,asyncio/*.py") when given."""
    root = sysconfig.get_paths()["stdlib"]
    globs = [g.strip() for g in patterns.split(",") if g.strip()]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
        paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    if globs:
        paths = [p for p in paths
                 if any(fnmatch.fnmatch(os.path.relpath(p, root), g) for g in globs)]
    return sorted(paths)


def resolve_paths(path: str) -> list[str]:
    """The files named by `path` (a file, a directory searched recursively, or a glob;
    on gs://, an object or the objects directly under a prefix), sorted."""
    if fs.is_remote(path) and fs.isdir(path):
        found = [p for p in (os.path.join(path, n) for n in fs.listdir(path)) if not fs.isdir(p)]
    elif fs.is_remote(path):
        found = [path] if fs.exists(path) else []
    elif os.path.isfile(path):
        return [path]
    elif os.path.isdir(path):
        found = [os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
    else:
        found = [p for p in glob.glob(path, recursive=True) if os.path.isfile(p)]
    if not found:
        raise FileNotFoundError(f"data path {path!r}: no such file, directory or glob match "
                                "(or no files in it)")
    return sorted(found)


def record_fields(record: dict, where: str, fields: Sequence[str]) -> tuple[str, ...]:
    """The string values of `fields` in a JSON record; a missing one raises naming `where`."""
    for field in fields:
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: field {field!r} missing or not a string "
                             f"(keys: {sorted(record)})")
    return tuple(record[field] for field in fields)


def sft_pair(record: dict, where: str) -> tuple[tuple[dict, ...], str]:
    """(prompt messages, response) of an SFT record: {"prompt", "response"} is one user
    turn; {"messages": [...]} ends with the assistant's response, and the turns before
    it (system, user, earlier assistant turns) are the prompt."""
    if "messages" not in record:
        prompt, response = record_fields(record, where, ["prompt", "response"])
        return ({"role": "user", "content": prompt},), response
    messages = record["messages"]
    ok = isinstance(messages, list) and len(messages) >= 2 and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
        and isinstance(m.get("content"), str) for m in messages)
    if not ok or messages[-1]["role"] != "assistant":
        raise ValueError(f"{where}: `messages` must be a list of at least two "
                         '{"role": system|user|assistant, "content": str} ending with the '
                         "assistant's response")
    prompt = tuple({"role": m["role"], "content": m["content"]} for m in messages[:-1])
    return prompt, messages[-1]["content"]


def _fixed_order(items: list) -> list:
    """`items` in a pseudo-random order that depends only on their number."""
    return [items[i] for i in np.random.default_rng(_ORDER_SEED).permutation(len(items))]


def _stdlib_documents(patterns: str) -> Iterator[str]:
    for path in _fixed_order(stdlib_files(patterns)):
        try:
            yield fs.read_text(path)
        except ValueError:  # test data that is deliberately latin-1, koi8-r, ...
            continue


def load_documents(data_cfg: ml_collections.ConfigDict) -> list[str]:
    """The documents of a pretraining source, in a fixed pseudo-random order, capped.

    Only the first `max_documents` files are read when there is a cap (cheap tiny runs).
    """
    if data_cfg.source == "stdlib":
        docs = _stdlib_documents(data_cfg.path)
        where = f"stdlib {sysconfig.get_paths()['stdlib']!r} (path {data_cfg.path!r})"
    elif data_cfg.source == "text":
        paths = _fixed_order(resolve_paths(data_cfg.path))
        docs, where = map(fs.read_text, paths), repr(data_cfg.path)
    elif data_cfg.source == "jsonl":
        field = data_cfg.text_field
        rows = [record_fields(record, where, [field])[0]
                for p in resolve_paths(data_cfg.path) for where, record in fs.read_jsonl(p)]
        docs, where = iter(_fixed_order(rows)), repr(data_cfg.path)
    else:
        hint = ("use load_pairs" if data_cfg.source in _PAIR_SOURCES else
                "read with make_dataset" if data_cfg.source == "prepared" else
                f"one of {_SOURCES}")
        raise ValueError(f"data.source {data_cfg.source!r}: not an in-memory pretraining "
                         f"source ({hint})")
    docs = list(itertools.islice(docs, data_cfg.max_documents or None))
    if not any(docs):
        raise ValueError(f"empty corpus: no non-empty documents in {where}")
    return docs


def load_sft_pairs(path: str) -> list[tuple[tuple[dict, ...], str]]:
    """(prompt messages, response) pairs from the jsonl files of `path` (see `sft_pair`),
    in file order."""
    pairs = [sft_pair(record, where)
             for p in resolve_paths(path) for where, record in fs.read_jsonl(p)]
    if not pairs:
        raise ValueError(f"empty corpus: no SFT records in {path!r}")
    return pairs


def load_pairs(data_cfg: ml_collections.ConfigDict) -> list[tuple[tuple[dict, ...], str]]:
    """(prompt messages, response) pairs of a pair source ("sft" or "tasks"), in source
    order."""
    if data_cfg.source == "tasks":
        return tasks_lib.sft_pairs(tasks_lib.load_tasks(data_cfg.path))
    return load_sft_pairs(data_cfg.path)


def split_documents(items: list, eval_fraction: float) -> tuple[list, list]:
    """(train, eval): the first round(eval_fraction * n) items (at least one if the fraction
    is positive) are held out; the input order is already the fixed pseudo-random one."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}")
    n_eval = max(round(eval_fraction * len(items)), int(eval_fraction > 0))
    if n_eval >= len(items):
        raise ValueError(f"eval_fraction {eval_fraction} leaves no training data from "
                         f"{len(items)} documents")
    return items[n_eval:], items[:n_eval]


def _split(data_cfg: ml_collections.ConfigDict, split: str) -> list:
    """The documents (or SFT pairs) of `split`, "train" or "eval"."""
    if data_cfg.source in _PAIR_SOURCES:
        items = _fixed_order(load_pairs(data_cfg))[:data_cfg.max_documents or None]
    else:
        items = load_documents(data_cfg)
    train, held_out = split_documents(items, data_cfg.eval_fraction)
    return train if split == "train" else held_out


def get_tokenizer(data_cfg: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
    """`data_cfg.tokenizer` if set, else the one cached in `workdir`, else a new one trained
    on the training split (and cached there, so a resumed run sees the same ids).
    "prepared": the corpus's own tokenizer, copied to `workdir` (a set data.tokenizer must
    be that very tokenizer)."""
    if data_cfg.source == "prepared":
        return _prepared_tokenizer(data_cfg, workdir)
    if data_cfg.tokenizer:
        return tokenizer_lib.load_tokenizer(data_cfg.tokenizer)
    path = os.path.join(workdir, "tokenizer.model")
    if fs.exists(path):
        return tokenizer_lib.load_tokenizer(path)
    texts = _split(data_cfg, "train")
    if data_cfg.source in _PAIR_SOURCES:
        texts = [m["content"] for prompt, response in texts for m in prompt] + [
            response for _, response in texts]
    return tokenizer_lib.train_sentencepiece(texts, data_cfg.vocab_size, path)


# ----------------------------------------------------------------------------- examples


def pack_documents(token_lists: Sequence[Sequence[int]], eos_id: int, seq_len: int) -> np.ndarray:
    """Concatenates the documents, each followed by eos, and cuts seq_len chunks.

    Returns int32[n, seq_len] with n = total_tokens // seq_len; the tail is dropped.
    """
    flat = np.fromiter(itertools.chain.from_iterable(list(t) + [eos_id] for t in token_lists),
                       dtype=np.int32)
    n = len(flat) // seq_len
    return flat[:n * seq_len].reshape(n, seq_len)


def sft_example(prompt: Sequence[int], response: Sequence[int], seq_len: int,
                pad_id: int) -> dict[str, np.ndarray]:
    """One SFT row: [prompt][response][pad ...], seq_len tokens. Too long: the prompt is
    cut from the left, and only if the response alone does not fit is the response cut
    from the right (the prompt is then empty).

    prompt: the chat-templated prompt's ids; response: the response's ids, ending in
    <|im_end|>. Returns {"tokens": int32[S], "prompt_mask": bool[S] (True on the prompt),
    "pad_mask": bool[S] (True on the padding after the response)}.
    """
    response = np.asarray(response[:seq_len], np.int32)
    keep = min(len(prompt), seq_len - len(response))
    row = np.concatenate([np.asarray(prompt[len(prompt) - keep:], np.int32), response])
    tokens = np.full(seq_len, pad_id, np.int32)
    tokens[:len(row)] = row
    positions = np.arange(seq_len)
    return {"tokens": tokens, "prompt_mask": positions < keep,
            "pad_mask": positions >= len(row)}


def rollout_sft_example(prompt: Sequence[int], response: Sequence[int], seq_len: int,
                        response_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One SFT row in the layout of a rollout of N = response_len tokens: the prompt
    left-padded (or cut from the left) to P = seq_len - N, then the response cut or
    padded to N. Returns sft_example's arrays and "valid": bool[S] (False on the left
    padding, which takes no part in attention or the loss)."""
    p = seq_len - response_len
    prompt = np.asarray(prompt[max(len(prompt) - p, 0):], np.int32)
    response = np.asarray(response[:response_len], np.int32)
    tokens = np.full(seq_len, pad_id, np.int32)
    tokens[p - len(prompt):p] = prompt
    tokens[p:p + len(response)] = response
    positions = np.arange(seq_len)
    return {"tokens": tokens, "prompt_mask": positions < p,
            "pad_mask": positions >= p + len(response), "valid": positions >= p - len(prompt)}


def sft_token_pairs(tok: tokenizer_lib.Tokenizer, pairs: Sequence[tuple[Sequence[dict], str]]
                    ) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids) of (prompt messages, response) pairs: the prompt is
    `apply_chat_template(messages, add_generation_prompt=True)`, the response ends in
    <|im_end|>."""
    prompts = tok.encode_batch([tok.apply_chat_template(list(m), add_generation_prompt=True)
                                for m, _ in pairs])
    responses = [r + [tok.im_end_id] for r in tok.encode_batch([r for _, r in pairs])]
    return prompts, responses


def sft_examples(tok: tokenizer_lib.Tokenizer, pairs: Sequence[tuple[Sequence[dict], str]],
                 seq_len: int, overflow: str = "truncate", where: str = "sft",
                 response_len: int = 0) -> dict[str, np.ndarray]:
    """Renders (prompt messages, response) pairs as fixed-length SFT rows (`sft_example`,
    or `rollout_sft_example` when response_len > 0). Pairs longer than seq_len (or with
    a prompt or a response longer than its part) are truncated or dropped (`overflow`),
    and counted in the log. Returns {"tokens": int32[n, S], "prompt_mask": bool[n, S],
    "pad_mask": bool[n, S]} (and "valid" with response_len)."""
    prompts, responses = sft_token_pairs(tok, pairs)
    if response_len:
        over = np.array([len(p) > seq_len - response_len or len(r) > response_len
                         for p, r in zip(prompts, responses)])
        make = lambda i: rollout_sft_example(prompts[i], responses[i], seq_len, response_len,
                                             tok.pad_id)
    else:
        over = np.array([len(p) + len(r) > seq_len for p, r in zip(prompts, responses)])
        make = lambda i: sft_example(prompts[i], responses[i], seq_len, tok.pad_id)
    rows = [make(i) for i in _overflow_rows(over, seq_len, overflow, where)]
    if not rows:
        raise ValueError(f"{where}: every pair is longer than seq_len={seq_len} (all dropped)")
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _overflow_rows(over: np.ndarray, seq_len: int, overflow: str, where: str) -> np.ndarray:
    """The indices of the SFT pairs that become rows (over: bool [n], the pairs that do
    not fit), logging how many were too long."""
    if overflow not in _OVERFLOWS:
        raise ValueError(f"data.sft_overflow {overflow!r}: allowed {_OVERFLOWS}")
    if over.any():
        logging.warning("%s: %d of %d pairs are longer than seq_len=%d tokens (%.2f%%): %s",
                        where, over.sum(), len(over), seq_len, 100 * over.mean(),
                        "truncated" if overflow == "truncate" else "dropped")
    return np.flatnonzero(~over) if overflow == "drop" else np.arange(len(over))


# ----------------------------------------------------------------------------- prepared corpora

def _prepared_tokenizer(data_cfg: ml_collections.ConfigDict,
                        workdir: str) -> tokenizer_lib.Tokenizer:
    """The tokenizer of a prepared corpus (all sources of a mixture must share it),
    written to `workdir` for the run (or data.tokenizer, if it is that same tokenizer)."""
    metadata = [corpus_lib.PreparedCorpus(path).metadata["tokenizer"]
                for _, path, _, _, _ in _mixture_sources(data_cfg)]
    if len({m["sha256"] for m in metadata}) > 1:
        raise ValueError(f"data.mixture: the sources were prepared with different tokenizers "
                         f"({[m['sha256'][:12] for m in metadata]})")
    if data_cfg.tokenizer:
        tok = tokenizer_lib.load_tokenizer(data_cfg.tokenizer)
    else:
        path = os.path.join(workdir, metadata[0]["file"])
        if not fs.exists(path):
            source = corpus_lib.kvstore_url(_mixture_sources(data_cfg)[0][1])
            contents = corpus_lib.read_bytes(source, metadata[0]["file"])
            fs.makedirs(workdir)
            fs.write_bytes(path, contents)
        tok = tokenizer_lib.load_tokenizer(path)
    _check_tokenizer(tok, metadata[0], data_cfg.tokenizer or "the corpus's tokenizer")
    return tok


def _check_tokenizer(tok: tokenizer_lib.Tokenizer, metadata: dict, where: str):
    if tok.checksum() != metadata["sha256"]:
        raise ValueError(f"tokenizer {where} (sha256 {tok.checksum()[:12]}) is not the one the "
                         f"corpus was prepared with ({metadata['file']}, sha256 "
                         f"{metadata['sha256'][:12]}): its ids would be misread")


class _Windows:
    """Row i = tokens [i S, (i + 1) S) of a pretraining corpus (its documents, each ending
    in eos, cut into windows, as `pack_documents` does): {"tokens": int32[S]}."""

    def __init__(self, corpus: corpus_lib.PreparedCorpus, seq_len: int):
        self._corpus, self._seq_len = corpus, seq_len

    def __len__(self) -> int:
        return self._corpus.num_tokens // self._seq_len

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self._corpus.read(i * self._seq_len, (i + 1) * self._seq_len)}


def pack_rows(lengths: np.ndarray, seq_len: int) -> np.ndarray:
    """Greedy document-aware packing of consecutive documents into rows.

    Each document (of `lengths[d]` tokens) is cut into pieces of seq_len tokens (the
    last shorter); pieces are taken in order, a row holding as many as fit, so every
    row starts at a piece start and rows tile the token stream. Returns int64[R + 1]:
    row r is tokens starts[r]..starts[r + 1] - 1 (at most seq_len of them).
    """
    lengths = np.asarray(lengths, np.int64)
    doc_starts = np.cumsum(lengths) - lengths
    pieces = -(-lengths // seq_len)
    first = np.cumsum(pieces) - pieces                     # each document's first piece
    within = np.arange(pieces.sum()) - np.repeat(first, pieces)
    bounds = np.append(np.repeat(doc_starts, pieces) + seq_len * within, lengths.sum())
    # A row starting at piece j takes pieces j..m-1: the largest m with
    # bounds[m] <= bounds[j] + seq_len (m > j, as no piece is longer than seq_len).
    after = np.searchsorted(bounds, bounds[:-1] + seq_len, side="right") - 1
    after, rows, j = after.tolist(), [], 0
    while j < len(after):
        rows.append(j)
        j = after[j]
    return bounds[rows + [len(after)]]


class _PackedDocuments:
    """Rows of whole documents packed greedily (`pack_rows`), padded with pad_id:
    {"tokens": int32[S], "pad_mask": bool[S] (True on the padding)}."""

    def __init__(self, corpus: corpus_lib.PreparedCorpus, seq_len: int, pad_id: int):
        self._corpus, self._seq_len, self._pad_id = corpus, seq_len, pad_id
        self._starts = pack_rows(np.diff(corpus.offsets()), seq_len)

    def __len__(self) -> int:
        return len(self._starts) - 1

    def __getitem__(self, r: int) -> dict[str, np.ndarray]:
        start, stop = int(self._starts[r]), int(self._starts[r + 1])
        tokens = np.full(self._seq_len, self._pad_id, np.int32)
        tokens[:stop - start] = self._corpus.read(start, stop)
        return {"tokens": tokens, "pad_mask": np.arange(self._seq_len) >= stop - start}


class _SftRows:
    """One instruction pair per row (`sft_example`) of an SFT corpus; pairs longer than
    seq_len truncated or dropped (`overflow`)."""

    def __init__(self, corpus: corpus_lib.PreparedCorpus, seq_len: int, pad_id: int,
                 overflow: str):
        self._corpus, self._seq_len, self._pad_id = corpus, seq_len, pad_id
        self._offsets, self._prompt_lengths = corpus.offsets(), corpus.prompt_lengths()
        self._pairs = _overflow_rows(np.diff(self._offsets) > seq_len, seq_len, overflow,
                                     f"{corpus.path} ({corpus.split})")

    def __len__(self) -> int:
        return len(self._pairs)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        d = self._pairs[i]
        ids = self._corpus.read(int(self._offsets[d]), int(self._offsets[d + 1]))
        p = self._prompt_lengths[d]
        return sft_example(ids[:p], ids[p:], self._seq_len, self._pad_id)


def _prepared_rows(corpus: corpus_lib.PreparedCorpus, data_cfg: ml_collections.ConfigDict,
                   tok: tokenizer_lib.Tokenizer):
    """The random-access rows of one prepared source, per data.packing."""
    if data_cfg.packing not in _PACKINGS:
        raise ValueError(f"data.packing {data_cfg.packing!r}: allowed {_PACKINGS}")
    if (data_cfg.packing == "sft") != (corpus.kind == "sft"):
        raise ValueError(f"{corpus.path}: a {corpus.kind!r} corpus cannot be read with "
                         f"data.packing={data_cfg.packing!r} (SFT corpora need 'sft', "
                         "pretraining corpora 'windows' or 'documents')")
    if data_cfg.packing == "windows":
        return _Windows(corpus, data_cfg.seq_len)
    if data_cfg.packing == "documents":
        return _PackedDocuments(corpus, data_cfg.seq_len, tok.pad_id)
    return _SftRows(corpus, data_cfg.seq_len, tok.pad_id, data_cfg.sft_overflow)


# ----------------------------------------------------------------------------- mixtures


def _mixture_sources(data_cfg: ml_collections.ConfigDict) -> list[tuple]:
    """[(name, path, weight, sample_weight, epochs)] of a "prepared" config: the entries
    of data.mixture, or data.path as one source named after its last component."""
    if not data_cfg.mixture:
        if not data_cfg.path:
            raise ValueError("data.source='prepared' needs data.path (a directory written by "
                             "python -m dllm.prepare) or data.mixture")
        name = data_cfg.path.rstrip("/").rsplit("/", 1)[-1]
        return [(name, data_cfg.path, 0.0, 1.0, 0)]
    sources = []
    for name, entry in data_cfg.mixture.items():
        unknown = sorted(set(entry) - set(_MIXTURE_KEYS))
        if unknown or not entry.get("path"):
            raise ValueError(f"data.mixture.{name}: needs `path`; unknown key(s) {unknown}; "
                             f"allowed {sorted(_MIXTURE_KEYS)}")
        e = {**_MIXTURE_KEYS, **entry}
        if e["weight"] < 0 or e["sample_weight"] <= 0 or e["epochs"] < 0:
            raise ValueError(f"data.mixture.{name}: weight >= 0, sample_weight > 0 and "
                             f"epochs >= 0 required, got {dict(entry)}")
        sources.append((name, e["path"], float(e["weight"]), float(e["sample_weight"]),
                        int(e["epochs"])))
    weighted = [s[2] > 0 for s in sources]
    if any(weighted) and not all(weighted):
        raise ValueError("data.mixture: set `weight` on every source or on none (none: "
                         "shares by training tokens)")
    return sources


def mixture(data_cfg: ml_collections.ConfigDict) -> mixture_lib.Mixture:
    """The training mixture of `data_cfg` (reads only the prepared corpora's metadata).
    `mixture(cfg).realised(n)` is each source's share of the first n examples drawn
    (n = steps x global batch size): what to log. An in-memory source is a mixture of one."""
    if data_cfg.source != "prepared":
        return mixture_lib.Mixture((data_cfg.source,), (1.0,))
    sources = _mixture_sources(data_cfg)
    sizes = [w or corpus_lib.PreparedCorpus(path).num_tokens for _, path, w, _, _ in sources]
    return mixture_lib.Mixture([s[0] for s in sources],
                               [size * s[3] for size, s in zip(sizes, sources)])


def _prepared_dataset(data_cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer,
                      split: str, seed: int) -> grain.MapDataset:
    """The mixture of the prepared sources' rows: "train" shuffled per source by `seed`
    (anew each epoch), each source repeating forever or for its epochs; "eval" one
    ordered pass over each source's eval split, in the same proportions."""
    parts, available = [], []
    for name, path, _, _, epochs in _mixture_sources(data_cfg):
        corpus = corpus_lib.PreparedCorpus(path, split)
        _check_tokenizer(tok, corpus.metadata["tokenizer"], "of this run")
        rows = _prepared_rows(corpus, data_cfg, tok)
        if not len(rows):
            raise ValueError(f"{path} ({split} split): no rows of {data_cfg.seq_len} tokens "
                             "(an eval split needs --eval_fraction > 0 when preparing)")
        ds = grain.MapDataset.source(rows)
        if split == "train":
            ds = ds.shuffle(seed=zlib.crc32(f"{seed}/{name}".encode())).repeat(epochs or None)
            available.append(len(rows) * epochs if epochs else None)
        else:
            available.append(len(rows))
        parts.append(ds)
    mix = mixture(data_cfg)
    return grain.MapDataset.select_from_datasets(
        parts, mixture_lib.Selection(mix, mix.length(available)))


# ----------------------------------------------------------------------------- pipeline


def batch_shapes(data_cfg: ml_collections.ConfigDict, batch_size: int) -> dict:
    """{key: (shape, dtype)} of the batches `make_dataset` yields, without reading data
    (for planning memory and compiling ahead of time)."""
    keys = {"tokens": np.int32}
    prepared = data_cfg.source == "prepared"
    if data_cfg.source in _PAIR_SOURCES or (prepared and data_cfg.packing == "sft"):
        keys.update(prompt_mask=np.bool_, pad_mask=np.bool_)
        if data_cfg.sft_response_len:
            keys.update(valid=np.bool_)
    elif prepared and data_cfg.packing == "documents":
        keys.update(pad_mask=np.bool_)
    return {k: ((batch_size, data_cfg.seq_len), np.dtype(t)) for k, t in keys.items()}


class _Rows:
    """Random access to row i of every array: {key: arrays[key][i]}."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self._arrays.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self._arrays.items()}


def _in_memory_dataset(data_cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer,
                       split: str, seed: int) -> grain.MapDataset:
    """The rows of an in-memory source: "train" shuffled by `seed`, anew each epoch,
    repeating forever; "eval" one pass in a fixed order."""
    items = _split(data_cfg, split)
    if data_cfg.source in _PAIR_SOURCES:
        arrays = sft_examples(tok, items, data_cfg.seq_len, data_cfg.sft_overflow,
                              f"{data_cfg.path} ({split})", data_cfg.sft_response_len)
    else:
        arrays = {"tokens": pack_documents(tok.encode_batch(items), tok.eos_id, data_cfg.seq_len)}
    ds = grain.MapDataset.source(_Rows(arrays))
    return ds.shuffle(seed=seed).repeat() if split == "train" else ds


def make_dataset(data_cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, *,
                 split: str, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """This process's batches of `split` ("train" or "eval").

    The global batch b is the b-th run of process_count x batch_size sequences of the
    stream; process p reads the p-th `batch_size` of them (local batch b * process_count
    + p). So the global batches are the same for any process count, and each sequence is
    read by exactly one process per epoch. "train" is shuffled by `seed`, differently
    each epoch, and repeats forever (a prepared mixture: as its sources' epochs say);
    "eval" is one pass in a fixed order. Incomplete global batches are dropped.

    Yields dicts of numpy arrays, B = batch_size (per process), S = data_cfg.seq_len:
      pretraining sources: {"tokens": int32[B, S]} (documents packed, each ending in eos);
      "sft", "tasks" (or packing "sft"): {"tokens", "prompt_mask": bool[B, S], "pad_mask": bool[B, S]}
        (and "valid": bool[B, S] with sft_response_len);
      packing "documents": {"tokens", "pad_mask"}.
    `iter(ds)` has get_state() / set_state(state) with a JSON-serialisable state.
    """
    if split not in corpus_lib.SPLITS:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if data_cfg.source == "prepared":
        ds, threads = _prepared_dataset(data_cfg, tok, split, seed), _READ_THREADS
    elif data_cfg.source in _SOURCES:
        ds, threads = _in_memory_dataset(data_cfg, tok, split, seed), 0  # only the GIL to share
    else:
        raise ValueError(f"data.source {data_cfg.source!r}: allowed {_SOURCES}")
    if len(ds) < batch_size * process_count:
        raise ValueError(
            f"{split} split of {data_cfg.source!r} {data_cfg.path!r}: {len(ds)} sequences of "
            f"{data_cfg.seq_len} tokens make less than one batch of {batch_size} for each of "
            f"{process_count} process(es); use more data or a smaller batch / seq_len")
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds[:len(ds) - len(ds) % process_count][process_index::process_count]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=threads))
