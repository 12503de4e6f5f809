"""Corpora tokenized once into tensorstore arrays (the format: dllm/corpus.py), and the
RL problem set filtered by difficulty.

    python -m dllm.prepare --source=stdlib --out=data/stdlib --vocab_size=512
    python -m dllm.prepare --source=jsonl --path='code/*.jsonl' --out=gs://BUCKET/code \\
        --tokenizer=Qwen2.5-Coder-7B
    python -m dllm.prepare --source=sft --path=pairs.jsonl --out=data/sft --tokenizer=...
    python -m dllm.prepare --source=rl --path=problems.jsonl --out=data/hard.jsonl

Sources: "stdlib", "text", "jsonl" and "sft" read as `dllm.data` reads them (see its
docstring); "rl" is `prepare_problems`. The records (files, or jsonl lines) are taken
in a fixed order, files sorted by path and lines in file order, and cut into shards of
`docs_per_shard` records; shards are tokenized in `workers` processes and written in
order, and each finished shard is recorded under progress/. An interrupted preparation
rerun with the same flags continues at the first unrecorded shard and ends with the
same arrays; a finished one rerun is verified (counts and checksums).

A record that cannot be read (bad UTF-8, malformed JSON, a missing field) is named by
file and line and skipped (counted; the first 100 are listed in metadata.json) or stops
the run (`bad_records="stop"`). Record j goes to the eval split when
frac((j + 1) * phi) < eval_fraction (phi = 0.618..., the golden ratio): a fixed share of
documents spread evenly over the corpus.

Without `tokenizer`, a sentencepiece BPE of `vocab_size` is trained on the first 4 MB of
documents. The tokenizer is copied into the output (its identity: a sha256); training
reads it from there.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import itertools
import json
import multiprocessing
import os
import tempfile
from typing import Iterator, Sequence

import numpy as np
import tensorstore as ts
from tqdm import tqdm

from dllm import corpus, data, fs
from dllm import tokenizer as tokenizer_lib

FORMAT = 1
SOURCES = ("stdlib", "text", "jsonl", "sft", "rl")
PHI = (5 ** 0.5 - 1) / 2
# zarr3 layout: files (shards) of 2^22 tokens holding zstd-compressed chunks of 2^13
# tokens, the unit a read fetches and decodes (16-32 KiB: a 512-token window read
# from 2^15-token chunks ran 5x slower, from 2^11 no faster); document indices likewise.
TOKEN_CHUNKS = (1 << 22, 1 << 13)
INDEX_CHUNKS = (1 << 20, 1 << 14)
_LISTED_BAD = 100
_TOKENIZER_BYTES = 4_000_000


def _zarr3_metadata(dtype: str, chunks: tuple[int, int]) -> dict:
    """An empty 1-d zarr3 array of `dtype` in files of chunks[0] elements, each holding
    independently readable chunks of chunks[1]."""
    le = {"name": "bytes", "configuration": {"endian": "little"}}
    return {"shape": [0], "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [chunks[0]]}},
            "codecs": [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": [chunks[1]],
                "codecs": [le, {"name": "zstd", "configuration": {"level": 3}}],
                "index_codecs": [le, {"name": "crc32c"}]}}]}


def held_out(records: np.ndarray, eval_fraction: float) -> np.ndarray:
    """bool[n]: which record indices go to the eval split."""
    return np.mod((np.asarray(records, np.float64) + 1) * PHI, 1.0) < eval_fraction


# ----------------------------------------------------------------------------- records


def _files(source: str, path: str) -> list[str]:
    return data.stdlib_files(path) if source == "stdlib" else data.resolve_paths(path)


def _records(source: str, path: str) -> Iterator[tuple[str, bytes | str]]:
    """(where, payload) of every record in order: a file's path, or a jsonl line's bytes."""
    for file in _files(source, path):
        if source in ("stdlib", "text"):
            yield file, file
            continue
        with fs.open_lines(file) as f:
            for lineno, raw in enumerate(f, 1):
                yield f"{file}:{lineno}", raw


def _document(source: str, where: str, payload, text_field: str):
    """A record's document: text, (prompt messages, response) for "sft", or None for a
    blank jsonl line. Unreadable records raise ValueError naming `where`."""
    if source in ("stdlib", "text"):
        return fs.read_text(payload)
    path, lineno = where.rsplit(":", 1)
    record = fs.parse_jsonl_line(payload, path, int(lineno))
    if record is None:
        return None
    if source == "sft":
        return data.sft_pair(record, where)
    return data.record_fields(record, where, [text_field])[0]


def _shards(source: str, path: str, size: int, skip: int) -> Iterator[tuple[int, list]]:
    """(shard index, [(where, payload)] of `size` records), from shard `skip` on."""
    records = _records(source, path)
    for index in itertools.count():
        chunk = [next(records, None) for _ in range(size)]
        chunk = [r for r in chunk if r is not None]
        if not chunk:
            return
        if index >= skip:
            yield index, chunk


# ----------------------------------------------------------------------------- tokenizing

_WORKER = {}


def _init_worker(tokenizer_path: str, settings: dict):
    _WORKER.update(tok=tokenizer_lib.load_tokenizer(tokenizer_path), settings=settings)


def _tokenize_shard(task: tuple[int, list]) -> dict:
    """One shard's documents as token arrays per split, and its unreadable records.

    Returns {"index", "records", "bytes", "bad": [(where, message)], "train" / "eval":
    (tokens int64[T], lengths int64[D], prompt lengths int64[D])}.
    """
    index, records = task
    tok, s = _WORKER["tok"], _WORKER["settings"]
    docs, ids, bad = [], [], []
    for k, (where, payload) in enumerate(records):
        try:
            doc = _document(s["source"], where, payload, s["text_field"])
        except ValueError as e:
            bad.append((where, str(e)))
            continue
        if doc is not None:
            docs.append(doc)
            ids.append(index * s["docs_per_shard"] + k)
    if s["source"] == "sft":
        prompts, responses = data.sft_token_pairs(tok, docs)
    else:
        prompts, responses = [[] for _ in docs], [d + [tok.eos_id] for d in tok.encode_batch(docs)]
    evaluate = held_out(np.array(ids), s["eval_fraction"])
    out = {"index": index, "records": len(records), "bad": bad,
           "bytes": sum(len(p) if isinstance(p, bytes) else os.path.getsize(p)
                        for _, p in records)}
    for split, chosen in (("train", ~evaluate), ("eval", evaluate)):
        seqs = [prompts[i] + responses[i] for i in np.flatnonzero(chosen)]
        lengths = np.fromiter(map(len, seqs), np.int64, len(seqs))
        out[split] = (np.fromiter(itertools.chain.from_iterable(seqs), np.int64, lengths.sum()),
                      lengths,
                      np.array([len(prompts[i]) for i in np.flatnonzero(chosen)], np.int64))
    return out


def _tokenized(shards: Iterator, workers: int, tokenizer_path: str,
               settings: dict) -> Iterator[dict]:
    """`_tokenize_shard` of each shard, in order: in this process (workers <= 1) or in
    `workers` spawned processes with at most 2 x workers shards in flight."""
    if workers <= 1:
        _init_worker(tokenizer_path, settings)
        yield from map(_tokenize_shard, shards)
        return
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(tokenizer_path, settings)) as pool:
        pending = collections.deque()
        for shard in shards:
            pending.append(pool.submit(_tokenize_shard, shard))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ----------------------------------------------------------------------------- writing


def _digest(tokens: np.ndarray, lengths: np.ndarray, prompt_lengths: np.ndarray | None,
            dtype: str) -> str:
    """sha256 of a shard's part of a split: its tokens (as stored), document lengths and
    (SFT) prompt lengths."""
    h = hashlib.sha256(tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes())
    h.update(lengths.astype("<i8").tobytes())
    if prompt_lengths is not None:
        h.update(prompt_lengths.astype("<i4").tobytes())
    return h.hexdigest()


class _SplitArrays:
    """The arrays of one split, appended to shard by shard."""

    def __init__(self, url: str, split: str, kind: str, dtype: str,
                 documents: int = 0, tokens: int = 0, create: bool = False):
        names = {"tokens": (dtype, TOKEN_CHUNKS), "offsets": ("int64", INDEX_CHUNKS)}
        if kind == "sft":
            names["prompt_lengths"] = ("int32", INDEX_CHUNKS)
        self.arrays = {}
        for name, (dt, chunks) in names.items():
            array_url = corpus.array_url(url, split, name)
            self.arrays[name] = (corpus.open_array(array_url, metadata=_zarr3_metadata(dt, chunks))
                                 if create else corpus.open_array(array_url, write=True))
        if create:
            self.arrays["offsets"] = self.arrays["offsets"].resize(exclusive_max=[1]).result()
            self.arrays["offsets"][0:1].write(np.zeros(1, np.int64)).result()
        self.documents, self.tokens, self.dtype = documents, tokens, dtype
        # Drop whatever an interrupted shard wrote past the last recorded one.
        self._write({"tokens": np.zeros(0), "offsets": np.zeros(0),
                     "prompt_lengths": np.zeros(0)})

    def _write(self, parts: dict[str, np.ndarray]):
        starts = {"tokens": self.tokens, "offsets": self.documents + 1,
                  "prompt_lengths": self.documents}
        futures = []
        for name, array in self.arrays.items():
            start, part = starts[name], parts[name]
            self.arrays[name] = array = array.resize(
                exclusive_max=[start + len(part)]).result()
            if len(part):
                futures.append(array[start:start + len(part)].write(
                    part.astype(array.dtype.numpy_dtype)))
        for f in futures:
            f.result()

    def append(self, tokens: np.ndarray, lengths: np.ndarray, prompt_lengths: np.ndarray) -> dict:
        """Writes one shard's documents; returns its record {documents, tokens, sha256}."""
        sft = "prompt_lengths" in self.arrays
        self._write({"tokens": tokens, "offsets": self.tokens + np.cumsum(lengths),
                     "prompt_lengths": prompt_lengths})
        self.documents += len(lengths)
        self.tokens += len(tokens)
        return {"documents": len(lengths), "tokens": len(tokens),
                "sha256": _digest(tokens, lengths, prompt_lengths if sft else None, self.dtype)}


def _write_json(url: str, key: str, value):
    ts.KvStore.open(url).result().write(key, json.dumps(value, indent=1).encode()).result()


def _recorded_shards(url: str) -> list[dict]:
    """The records of the finished shards, in order (they are a prefix: 0, 1, ...)."""
    store = ts.KvStore.open(url + "progress/").result()
    keys = sorted(k.decode() for k in store.list().result() if k.startswith(b"shard-"))
    reads = [store.read(k) for k in keys]
    records = [json.loads(r.result().value) for r in reads]
    if [r["index"] for r in records] != list(range(len(records))):
        raise ValueError(f"{url}progress/: shard records are not 0..{len(records) - 1}")
    return records


def _tokenizer(url: str, tokenizer: str, vocab_size: int, source: str, path: str,
               text_field: str, local_dir: str) -> tuple[str, tokenizer_lib.Tokenizer]:
    """(local path, tokenizer): the one already in the output (a resumed run), else
    `tokenizer`, else one trained on the first documents; copied into the output."""
    for name in ("tokenizer.model", "tokenizer.json"):
        contents = corpus.read_bytes(url, name)
        if contents is not None:
            break
    else:
        if tokenizer:
            name, contents = tokenizer_lib.load_tokenizer(tokenizer).to_file()
        else:
            name, contents = _train_tokenizer(source, path, text_field, vocab_size,
                                              local_dir).to_file()
        ts.KvStore.open(url).result().write(name, contents).result()
    local = os.path.join(local_dir, name)
    with open(local, "wb") as f:
        f.write(contents)
    tok = tokenizer_lib.load_tokenizer(local)
    if tokenizer and tokenizer_lib.load_tokenizer(tokenizer).checksum() != tok.checksum():
        raise ValueError(f"{url}: was started with another tokenizer than {tokenizer!r}; "
                         "use a new --out")
    return local, tok


def _train_tokenizer(source, path, text_field, vocab_size, local_dir):
    def texts():
        for where, payload in _records(source, path):
            try:
                doc = _document(source, where, payload, text_field)
            except ValueError:
                continue
            if isinstance(doc, tuple):
                yield from [m["content"] for m in doc[0]] + [doc[1]]
            elif doc is not None:
                yield doc
    return tokenizer_lib.train_sentencepiece(texts(), vocab_size,
                                             os.path.join(local_dir, "trained.model"),
                                             max_bytes=_TOKENIZER_BYTES)


def prepare(source: str, path: str, out: str, *, tokenizer: str = "", vocab_size: int = 4096,
            text_field: str = "text", eval_fraction: float = 0.01, docs_per_shard: int = 1024,
            workers: int = 0, bad_records: str = "skip") -> dict:
    """Tokenizes the corpus `source`/`path` into the prepared directory `out` (a local
    path or a kvstore URL such as gs://...), resuming an interrupted preparation; a
    finished one is verified instead. Returns its metadata (see dllm/corpus.py).
    workers: tokenizing processes (<= 1: in this process)."""
    if source not in SOURCES[:-1]:
        raise ValueError(f"source {source!r}: allowed {SOURCES[:-1]} ('rl': prepare_problems)")
    if bad_records not in ("skip", "stop"):
        raise ValueError(f"bad_records {bad_records!r}: allowed 'skip', 'stop'")
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    url = corpus.kvstore_url(out)
    with tempfile.TemporaryDirectory() as local_dir:
        local, tok = _tokenizer(url, tokenizer, vocab_size, source, path, text_field, local_dir)
        settings = dict(format=FORMAT, source=source, path=path, text_field=text_field,
                        eval_fraction=eval_fraction, docs_per_shard=docs_per_shard,
                        tokenizer_sha256=tok.checksum())
        _check_settings(url, out, settings)
        if corpus.read_json(url, corpus.METADATA) is not None:
            print(f"{out}: already prepared; verifying it")
            return verify(out)
        return _write_shards(url, settings, local, tok, workers, bad_records)


def _check_settings(url: str, out: str, settings: dict):
    """Records the settings of a new preparation; a resumed or finished one must match."""
    saved = corpus.read_json(url, "progress/settings.json")
    if saved is None:
        _write_json(url, "progress/settings.json", settings)
        return
    differ = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if differ:
        raise ValueError(f"{out} was prepared with other settings ({differ}: was, now); "
                         "rerun with the same flags or use a new --out")


def _write_shards(url: str, settings: dict, local_tokenizer: str, tok, workers: int,
                  bad_records: str) -> dict:
    """Tokenizes and writes the shards not yet recorded, then writes metadata.json."""
    kind = "sft" if settings["source"] == "sft" else "pretrain"
    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "uint32"
    done = _recorded_shards(url)
    arrays = {split: _SplitArrays(url, split, kind, dtype, create=not done,
                                  documents=sum(r[split]["documents"] for r in done),
                                  tokens=sum(r[split]["tokens"] for r in done))
              for split in corpus.SPLITS}
    files = _files(settings["source"], settings["path"])
    total = None if any(f.endswith(".gz") for f in files) else sum(map(os.path.getsize, files))
    bar = tqdm(total=total, initial=sum(r["bytes"] for r in done), unit="B", unit_scale=True,
               desc=f"prepare {settings['path'] or settings['source']}", dynamic_ncols=True)
    shards = _shards(settings["source"], settings["path"], settings["docs_per_shard"], len(done))
    for result in _tokenized(shards, workers, local_tokenizer, settings):
        if result["bad"] and bad_records == "stop":
            raise ValueError(f"{result['bad'][0][1]} (pass --bad_records=skip to skip such "
                             "records; the shards before this one are kept)")
        record = {"index": result["index"], "records": result["records"],
                  "bytes": result["bytes"], "bad": result["bad"]}
        for split in corpus.SPLITS:
            record[split] = arrays[split].append(*result[split])
        _write_json(url, f"progress/shard-{result['index']:09d}.json", record)
        done.append(record)
        bar.update(result["bytes"])
        bar.set_postfix(tokens=f"{sum(a.tokens for a in arrays.values()):.3g}")
    bar.close()
    metadata = _metadata(settings, kind, dtype, tok, done)
    _write_json(url, corpus.METADATA, metadata)
    bad = metadata["bad_records"]
    if bad["count"]:
        print(f"skipped {bad['count']} unreadable record(s), e.g. {bad['first'][0][1]}")
    return metadata


def _metadata(settings: dict, kind: str, dtype: str, tok, shards: list[dict]) -> dict:
    bad = [b for r in shards for b in r["bad"]]
    return {
        "format": FORMAT, "kind": kind, "dtype": dtype,
        "source": {k: settings[k] for k in ("source", "path", "text_field", "eval_fraction")},
        "tokenizer": {"file": tok.to_file()[0], "sha256": tok.checksum(),
                      "vocab_size": tok.vocab_size},
        "splits": {split: {"documents": sum(r[split]["documents"] for r in shards),
                           "tokens": sum(r[split]["tokens"] for r in shards),
                           "sha256": hashlib.sha256("".join(
                               r[split]["sha256"] for r in shards).encode()).hexdigest()}
                   for split in corpus.SPLITS},
        "records": sum(r["records"] for r in shards), "shards": len(shards),
        "docs_per_shard": settings["docs_per_shard"],
        "bad_records": {"count": len(bad), "first": bad[:_LISTED_BAD]},
        "layout": {"token_chunks": list(TOKEN_CHUNKS), "index_chunks": list(INDEX_CHUNKS)},
    }


def verify(out: str) -> dict:
    """Checks a finished preparation against its records: array sizes, and every
    shard's checksum (reads the whole corpus once). Returns its metadata; a mismatch
    raises naming the split and shard."""
    url = corpus.kvstore_url(out)
    metadata = corpus.read_json(url, corpus.METADATA)
    if metadata is None:
        raise FileNotFoundError(f"{out}: no {corpus.METADATA} (not a finished preparation)")
    shards = _recorded_shards(url)
    if len(shards) != metadata["shards"]:
        raise ValueError(f"{out}: {len(shards)} shard records, metadata says {metadata['shards']}")
    for split in corpus.SPLITS:
        c = corpus.PreparedCorpus(out, split)
        offsets = c.offsets()
        prompts = c.prompt_lengths() if c.kind == "sft" else None
        d0 = 0
        for r in tqdm(shards, desc=f"verify {split}", dynamic_ncols=True):
            d1 = d0 + r[split]["documents"]
            tokens = c.tokens[offsets[d0]:offsets[d1]].read().result()
            got = _digest(tokens, np.diff(offsets[d0:d1 + 1]),
                          None if prompts is None else prompts[d0:d1], metadata["dtype"])
            if got != r[split]["sha256"]:
                raise ValueError(f"{out} ({split}): shard {r['index']} does not match its "
                                 "checksum: the arrays were changed or damaged")
            d0 = d1
    return metadata


# ----------------------------------------------------------------------------- RL problems


def problem_prompt(question: str, tests: Sequence[str]) -> str:
    """DiffuCoder's RL prompt: the question, followed by "\\nTest cases: " and the first
    test when the question holds no code block (so the expected signature is visible)."""
    return question if "```" in question else f"{question}\nTest cases: {tests[0]}"


def load_problems(path: str) -> list[dict]:
    """Problems with tests from a jsonl file, one per line:
    {"question": str, "tests": [assert statements, ...], "task_id": str | int (default
    "FILE:LINE"), "entry_point": str (default ""), "pass_rates": {model: float in [0, 1]}
    (optional: each reference model's pass rate, for `difficulty_filter`)}.
    Returns them as dicts with every key, and `where` ("path:line")."""
    problems, seen = [], set()
    for where, record in fs.read_jsonl(path):
        question = data.record_fields(record, where, ["question"])[0]
        tests, rates = record.get("tests"), record.get("pass_rates", {})
        if not (isinstance(tests, list) and tests and all(isinstance(t, str) for t in tests)):
            raise ValueError(f"{where}: `tests` must be a non-empty list of strings")
        if not (isinstance(rates, dict) and all(
                isinstance(v, (int, float)) and 0 <= v <= 1 for v in rates.values())):
            raise ValueError(f"{where}: `pass_rates` must map model names to numbers in [0, 1]")
        task_id = str(record.get("task_id", os.path.basename(where)))
        if task_id in seen:
            raise ValueError(f"{where}: duplicate task_id {task_id!r}")
        seen.add(task_id)
        problems.append(dict(task_id=task_id, question=question, tests=tests,
                             entry_point=str(record.get("entry_point", "")),
                             pass_rates=rates, where=where))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def difficulty_filter(pass_rates: np.ndarray, max_mean_percentile: float = 20.0,
                      min_std_percentile: float = 40.0) -> np.ndarray:
    """DiffuCoder's hard problems. pass_rates: float[N, M], problem x reference model.

    Keeps the problems whose mean pass rate is at or below the `max_mean_percentile`-th
    percentile of the N means; of those, the ones whose spread (standard deviation over
    the models) is at or above the `min_std_percentile`-th percentile of their spreads.
    Percentiles interpolate linearly (numpy's default). Returns bool[N].
    """
    rates = np.asarray(pass_rates, np.float64)
    mean, spread = rates.mean(axis=1), rates.std(axis=1)
    hard = mean <= np.percentile(mean, max_mean_percentile)
    return hard & (spread >= np.percentile(spread[hard], min_std_percentile))


def prepare_problems(path: str, out: str, *, max_mean_percentile: float = 20.0,
                     min_std_percentile: float = 40.0, models: Sequence[str] = ()) -> dict:
    """Writes the problems of `path` that pass `difficulty_filter` (on the pass rates of
    `models`, default every model named in the file) to `out`, as task records
    {task_id, prompt, entry_point, tests, pass_rate_mean, pass_rate_std} that
    `dllm.tasks.load_tasks` reads. Without any pass rates every problem is kept. Returns
    {"problems", "kept", "models"}."""
    problems = load_problems(path)
    names = list(models) or sorted({m for p in problems for m in p["pass_rates"]})
    rates = None
    if names:
        missing = [(p["where"], sorted(set(names) - set(p["pass_rates"]))) for p in problems
                   if set(names) - set(p["pass_rates"])]
        if missing:
            raise ValueError(f"{missing[0][0]}: no pass rate for model(s) {missing[0][1]} "
                             f"({len(missing)} problems lack some; choose models with --models)")
        rates = np.array([[p["pass_rates"][m] for m in names] for p in problems])
        keep = difficulty_filter(rates, max_mean_percentile, min_std_percentile)
    else:
        keep = np.ones(len(problems), bool)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        for i in np.flatnonzero(keep):
            p = problems[i]
            task = dict(task_id=p["task_id"], prompt=problem_prompt(p["question"], p["tests"]),
                        entry_point=p["entry_point"], tests=p["tests"])
            if rates is not None:
                task.update(pass_rate_mean=float(rates[i].mean()),
                            pass_rate_std=float(rates[i].std()))
            f.write(json.dumps(task) + "\n")
    os.replace(out + ".tmp", out)
    return {"problems": len(problems), "kept": int(keep.sum()), "models": names}


# ----------------------------------------------------------------------------- CLI


def _define_flags():
    from absl import flags
    flags.DEFINE_enum("source", None, list(SOURCES), "What to prepare (see dllm/data.py; "
                      "rl: problems with tests -> the hard-problem task file).", required=True)
    flags.DEFINE_string("path", "", "Input file, directory or glob (stdlib: optional globs).")
    flags.DEFINE_string("out", None, "Output directory (local or gs://...); rl: a .jsonl file.",
                        required=True)
    flags.DEFINE_string("tokenizer", "", "Tokenizer (.model, tokenizer.json or HF directory); "
                        "'' = train a sentencepiece BPE of --vocab_size on the corpus.")
    flags.DEFINE_integer("vocab_size", 4096, "Vocabulary of a trained tokenizer.")
    flags.DEFINE_string("text_field", "text", "jsonl: the document's key.")
    flags.DEFINE_float("eval_fraction", 0.01, "Share of documents held out as the eval split.")
    flags.DEFINE_integer("docs_per_shard", 1024, "Records per shard (the unit of work and resume).")
    flags.DEFINE_integer("workers", os.cpu_count() or 1, "Tokenizing processes.")
    flags.DEFINE_enum("bad_records", "skip", ["skip", "stop"], "An unreadable record: skip "
                      "it (counted, listed in metadata.json) or stop.")
    flags.DEFINE_float("max_mean_percentile", 20.0, "rl: keep mean pass rate <= this percentile.")
    flags.DEFINE_float("min_std_percentile", 40.0, "rl: then keep spread >= this percentile.")
    flags.DEFINE_list("models", [], "rl: reference models whose pass rates count (default all).")


def main(argv):
    from absl import app, flags
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    if f.source == "rl":
        summary = prepare_problems(f.path, f.out, max_mean_percentile=f.max_mean_percentile,
                                   min_std_percentile=f.min_std_percentile, models=f.models)
        print(f"{f.out}: kept {summary['kept']} of {summary['problems']} problems "
              f"(reference models: {', '.join(summary['models']) or 'none'})")
        return
    meta = prepare(f.source, f.path, f.out, tokenizer=f.tokenizer, vocab_size=f.vocab_size,
                   text_field=f.text_field, eval_fraction=f.eval_fraction,
                   docs_per_shard=f.docs_per_shard, workers=f.workers, bad_records=f.bad_records)
    for split, c in meta["splits"].items():
        print(f"{f.out} {split}: {c['documents']} documents, {c['tokens']} tokens")
    print(f"records {meta['records']}, skipped {meta['bad_records']['count']}; tokenizer "
          f"{meta['tokenizer']['file']} sha256 {meta['tokenizer']['sha256'][:12]}")


if __name__ == "__main__":
    from dllm import cli
    _define_flags()
    cli.run(main)
