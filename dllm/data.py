"""Corpora and grain input pipelines: read, tokenize, pack, shard by process, shuffle, batch.

`config.data` fields (an ml_collections.ConfigDict; `default_config()` has the defaults):

  source          "stdlib": every .py file of the running interpreter's standard library
                    (real code on every machine, no download; site-packages excluded, the
                    few files that are deliberately not UTF-8 skipped);
                  "text": each file under `path` is one document, read as UTF-8;
                  "jsonl": each line of the files under `path` is a JSON object whose
                    `text_field` is one document;
                  "sft": each line of the files under `path` is {"prompt": str,
                    "response": str}, for supervised fine-tuning with the chat template.
  path            a file, a directory (every file under it, recursively) or a glob;
                  for "stdlib", optional comma-separated globs relative to the stdlib
                  root that select a subset (e.g. "json/*.py,asyncio/*.py").
  text_field      the document's key in "jsonl" objects (default "text").
  seq_len         tokens per sequence (default 256).
  eval_fraction   share of documents (or SFT pairs) held out for evaluation, in [0, 1)
                  (default 0.05). The split is fixed (independent of the run's seed).
  max_documents   use at most this many documents / pairs, 0 = all (default 0). They are
                  a fixed pseudo-random subset, so a cap still samples the whole corpus.
  tokenizer       path of an existing tokenizer (.model); "" = train a sentencepiece BPE
                  on the training documents, cached at `workdir/tokenizer.model`.
  vocab_size      vocabulary size when training a tokenizer (default 4096; may come out
                  smaller on a tiny corpus: read `tokenizer.vocab_size`).

Errors in the input name the file and, for line-based formats, the line.
"""
import fnmatch
import glob
import itertools
import os
import sysconfig
from typing import Iterator, Sequence

import grain
import ml_collections
import numpy as np

from dllm import fs
from dllm import tokenizer as tokenizer_lib

# The document order (hence the eval split and the max_documents subset) must not change
# with the run's seed: a fixed seed of its own.
_ORDER_SEED = 20250626
_SOURCES = ("stdlib", "text", "jsonl", "sft")


def default_config() -> ml_collections.ConfigDict:
    """The `config.data` defaults (see the module docstring for the allowed values)."""
    return ml_collections.ConfigDict(dict(
        source="stdlib", path="", text_field="text", seq_len=256, eval_fraction=0.05,
        max_documents=0, tokenizer="", vocab_size=4096))


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


def _resolve_paths(path: str) -> list[str]:
    """The files named by `path` (a file, a directory searched recursively, or a glob;
    on gs://, an object or the objects directly under a prefix)."""
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


def _read_jsonl(path: str, fields: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """The string values of `fields` in each line's JSON object (blank lines skipped)."""
    for where, obj in fs.read_jsonl(path):
        for field in fields:
            if not isinstance(obj.get(field), str):
                raise ValueError(f"{where}: field {field!r} missing or not a string "
                                 f"(keys: {sorted(obj)})")
        yield tuple(obj[field] for field in fields)


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
        paths = _fixed_order(_resolve_paths(data_cfg.path))
        docs, where = map(fs.read_text, paths), repr(data_cfg.path)
    elif data_cfg.source == "jsonl":
        field = data_cfg.text_field
        rows = [r for p in _resolve_paths(data_cfg.path) for r in _read_jsonl(p, [field])]
        docs, where = (text for text, in _fixed_order(rows)), repr(data_cfg.path)
    else:
        hint = "use load_sft_pairs" if data_cfg.source == "sft" else f"one of {_SOURCES}"
        raise ValueError(f"data.source {data_cfg.source!r}: not a pretraining source ({hint})")
    docs = list(itertools.islice(docs, data_cfg.max_documents or None))
    if not any(docs):
        raise ValueError(f"empty corpus: no non-empty documents in {where}")
    return docs


def load_sft_pairs(path: str) -> list[tuple[str, str]]:
    """(prompt, response) pairs from jsonl lines {"prompt": str, "response": str}, in file order."""
    pairs = [pair for p in _resolve_paths(path) for pair in _read_jsonl(p, ["prompt", "response"])]
    if not pairs:
        raise ValueError(f"empty corpus: no (prompt, response) lines in {path!r}")
    return pairs


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
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if data_cfg.source == "sft":
        items = _fixed_order(load_sft_pairs(data_cfg.path))[:data_cfg.max_documents or None]
    else:
        items = load_documents(data_cfg)
    train, held_out = split_documents(items, data_cfg.eval_fraction)
    return train if split == "train" else held_out


def get_tokenizer(data_cfg: ml_collections.ConfigDict, workdir: str) -> tokenizer_lib.Tokenizer:
    """`data_cfg.tokenizer` if set, else the one cached in `workdir`, else a new one trained
    on the training split (and cached there, so a resumed run sees the same ids)."""
    if data_cfg.tokenizer:
        return tokenizer_lib.load_tokenizer(data_cfg.tokenizer)
    path = os.path.join(workdir, "tokenizer.model")
    if fs.exists(path):
        return tokenizer_lib.load_tokenizer(path)
    texts = _split(data_cfg, "train")
    if data_cfg.source == "sft":
        texts = [text for pair in texts for text in pair]
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


def sft_examples(tok: tokenizer_lib.Tokenizer, pairs: Sequence[tuple[str, str]],
                 seq_len: int) -> dict[str, np.ndarray]:
    """Renders (prompt, response) pairs as fixed-length SFT examples.

    Each row is [chat-templated prompt][response, <|im_end|>][<|dlm_pad|> ...]: the prompt
    is `apply_chat_template([user message], add_generation_prompt=True)`. Too long: the
    prompt is cut from the left, and only if the response alone does not fit is the
    response cut from the right (the prompt is then empty).

    Returns {"tokens": int32[n, seq_len], "prompt_mask": bool[n, seq_len] (True on the
    prompt), "pad_mask": bool[n, seq_len] (True on the padding after the response)}.
    """
    prompts = tok.encode_batch([
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
        for p, _ in pairs])
    responses = tok.encode_batch([r for _, r in pairs])
    tokens = np.full((len(pairs), seq_len), tok.pad_id, dtype=np.int32)
    prompt_len = np.zeros(len(pairs), dtype=np.int32)
    end = np.zeros(len(pairs), dtype=np.int32)
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        response = (response + [tok.im_end_id])[:seq_len]
        prompt = prompt[len(prompt) - min(len(prompt), seq_len - len(response)):]
        row = prompt + response
        tokens[i, :len(row)] = row
        prompt_len[i], end[i] = len(prompt), len(row)
    positions = np.arange(seq_len)
    return {"tokens": tokens,
            "prompt_mask": positions < prompt_len[:, None],
            "pad_mask": positions >= end[:, None]}


# ----------------------------------------------------------------------------- pipeline


def batch_shapes(data_cfg: ml_collections.ConfigDict, batch_size: int) -> dict:
    """{key: (shape, dtype)} of the batches `make_dataset` yields, without reading data
    (for planning memory and compiling ahead of time)."""
    keys = {"tokens": np.int32}
    if data_cfg.source == "sft":
        keys.update(prompt_mask=np.bool_, pad_mask=np.bool_)
    return {k: ((batch_size, data_cfg.seq_len), np.dtype(t)) for k, t in keys.items()}


class _Rows:
    """Random access to row i of every array: {key: arrays[key][i]}."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self._arrays = arrays

    def __len__(self) -> int:
        return len(next(iter(self._arrays.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self._arrays.items()}


def make_dataset(data_cfg: ml_collections.ConfigDict, tok: tokenizer_lib.Tokenizer, *,
                 split: str, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
    """This process's batches of `split` ("train" or "eval").

    The global batch b is the b-th run of process_count x batch_size sequences of the
    stream; process p reads the p-th `batch_size` of them (local batch b * process_count
    + p). So the global batches are the same for any process count, and each sequence is
    read by exactly one process per epoch. "train" is shuffled by `seed`, differently
    each epoch, and repeats forever; "eval" is one pass in a fixed order. Incomplete
    global batches are dropped.

    Yields dicts of numpy arrays, B = batch_size (per process), S = data_cfg.seq_len:
      pretraining sources: {"tokens": int32[B, S]} (documents packed, each ending in eos);
      "sft": {"tokens": int32[B, S], "prompt_mask": bool[B, S], "pad_mask": bool[B, S]}.
    `iter(ds)` has get_state() / set_state(state) with a JSON-serialisable state.
    """
    items = _split(data_cfg, split)
    if data_cfg.source == "sft":
        arrays = sft_examples(tok, items, data_cfg.seq_len)
    else:
        arrays = {"tokens": pack_documents(tok.encode_batch(items), tok.eos_id, data_cfg.seq_len)}
    n = len(arrays["tokens"])
    if n < batch_size * process_count:
        raise ValueError(
            f"{split} split of {data_cfg.source!r} {data_cfg.path!r}: {n} sequences of "
            f"{data_cfg.seq_len} tokens make less than one batch of {batch_size} for each of "
            f"{process_count} process(es); use more data or a smaller batch / seq_len")
    ds = grain.MapDataset.source(_Rows(arrays))
    if split == "train":
        ds = ds.shuffle(seed=seed).repeat()  # shuffle before repeat: a new order each epoch
    ds = ds.batch(batch_size, drop_remainder=True)
    ds = ds[:len(ds) - len(ds) % process_count][process_index::process_count]
    # Data is in memory: reading threads would only contend for the GIL.
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
