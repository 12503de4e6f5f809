"""Tests for dllm/prepare.py (and the format it writes, dllm/corpus.py): round trips,
resume after an interruption, verification, bad records, parallel workers, SFT
corpora, lazy reads, and the RL problem set with the difficulty filter."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorstore as ts

import subprocess_runs as runs
from dllm import corpus, data, prepare, tasks
from dllm import tokenizer as tokenizer_lib

GOLDEN = (math.sqrt(5) - 1) / 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    cfg = data.default_config()
    cfg.max_documents = 60
    path = str(tmp_path_factory.mktemp("tok") / "sp.model")
    return tokenizer_lib.train_sentencepiece(data.load_documents(cfg), 600, path,
                                             max_bytes=300_000)


def _documents(n=40, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        body = "\n".join(f"    v{j} = {int(x)}" for j, x in enumerate(rng.integers(0, 999, i % 7)))
        docs.append(f"def doc_{i}():  # café ✓\n{body}\n    return {i}\n")
    docs[3] = ""    # an empty document is a document too
    return docs


def _write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def _prepare(tok, path, out, **kw):
    kw = {"eval_fraction": 0.25, "docs_per_shard": 6, **kw}
    return prepare.prepare("jsonl", path, str(out), tokenizer=tok.path, **kw)


def _documents_of(out, split):
    c = corpus.PreparedCorpus(str(out), split)
    offsets = c.offsets()
    return [c.read(offsets[d], offsets[d + 1]).tolist() for d in range(c.num_documents)]


def _arrays(out):
    """Every stored array of a prepared directory, read whole."""
    url = corpus.kvstore_url(str(out))
    return {(split, name): corpus.open_array(corpus.array_url(url, split, name)).read().result()
            for split in corpus.SPLITS for name in ("tokens", "offsets")}


def test_prepared_corpus_decodes_to_its_documents(tok, tmp_path):
    docs = _documents()
    meta = _prepare(tok, _write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "out")
    is_eval = [((j + 1) * GOLDEN) % 1.0 < 0.25 for j in range(len(docs))]
    for split, wanted in (("train", False), ("eval", True)):
        expected = [d for d, e in zip(docs, is_eval) if e == wanted]
        stored = _documents_of(tmp_path / "out", split)
        assert all(ids[-1] == tok.eos_id for ids in stored)
        assert [tok.decode(ids[:-1]) for ids in stored] == expected
        assert stored == [tok.encode(d) + [tok.eos_id] for d in expected]
        assert meta["splits"][split]["documents"] == len(expected)
        assert meta["splits"][split]["tokens"] == sum(map(len, stored))
    assert 5 <= sum(is_eval) <= 15
    assert meta["kind"] == "pretrain" and meta["dtype"] == "uint16" and meta["records"] == 40
    assert meta["tokenizer"]["sha256"] == tok.checksum() and meta["shards"] == 7
    assert corpus.PreparedCorpus(str(tmp_path / "out")).tokens.dtype.numpy_dtype == np.uint16
    with open(tmp_path / "out" / "tokenizer.model", "rb") as f:
        assert f.read() == tok.to_file()[1]


def test_interrupted_preparation_resumes_to_identical_arrays(tok, tmp_path, monkeypatch):
    path = _write_jsonl(tmp_path / "docs.jsonl", _documents())
    whole = _prepare(tok, path, tmp_path / "whole")
    # Crash after shard 2's arrays are written but before it is recorded.
    write_json = prepare._write_json

    def crash_on_shard_2(url, key, value):
        if key.endswith("shard-000000002.json"):
            raise KeyboardInterrupt
        write_json(url, key, value)

    monkeypatch.setattr(prepare, "_write_json", crash_on_shard_2)
    with pytest.raises(KeyboardInterrupt):
        _prepare(tok, path, tmp_path / "resumed")
    with pytest.raises(FileNotFoundError, match="has not finished"):
        corpus.PreparedCorpus(str(tmp_path / "resumed"))
    monkeypatch.setattr(prepare, "_write_json", write_json)
    tokenized = []
    tokenize = prepare._tokenize_shard
    monkeypatch.setattr(prepare, "_tokenize_shard",
                        lambda task: tokenized.append(task[0]) or tokenize(task))
    resumed = _prepare(tok, path, tmp_path / "resumed")
    assert tokenized == [2, 3, 4, 5, 6]        # shards 0 and 1 were kept, not redone
    assert resumed == whole
    a, b = _arrays(tmp_path / "whole"), _arrays(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=str(key))


def test_finished_preparation_is_verified(tok, tmp_path):
    path = _write_jsonl(tmp_path / "docs.jsonl", _documents())
    meta = _prepare(tok, path, tmp_path / "out")
    assert _prepare(tok, path, tmp_path / "out") == meta        # rerun: verified, unchanged
    with pytest.raises(ValueError, match="other settings.*eval_fraction"):
        _prepare(tok, path, tmp_path / "out", eval_fraction=0.5)
    tokens = corpus.open_array(corpus.array_url(corpus.kvstore_url(str(tmp_path / "out")),
                                                "train", "tokens"), write=True)
    tokens[20:21].write(np.array([(int(tokens[20].read().result()) + 1) % 600],
                                 np.uint16)).result()
    with pytest.raises(ValueError, match=r"\(train\): shard 0 does not match its checksum"):
        prepare.verify(str(tmp_path / "out"))


def test_bad_records_are_skipped_and_counted_or_stop(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a = 1"}\n{"text": "b = 2"\n\n{"body": "no text"}\n'
                    '{"text": "c = 3"}\n')
    meta = _prepare(tok, str(path), tmp_path / "skip", eval_fraction=0.0)
    assert meta["bad_records"]["count"] == 2 and meta["records"] == 5
    first = [where for where, _ in meta["bad_records"]["first"]]
    assert first == [f"{path}:2", f"{path}:4"]
    assert "malformed JSON" in meta["bad_records"]["first"][0][1]
    assert [tok.decode(d[:-1]) for d in _documents_of(tmp_path / "skip", "train")] == [
        "a = 1", "c = 3"]
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        _prepare(tok, str(path), tmp_path / "stop", eval_fraction=0.0, bad_records="stop")


@pytest.mark.slow   # spawns two worker processes (~7 s)
def test_parallel_workers_write_what_one_process_writes(tok, tmp_path):
    path = _write_jsonl(tmp_path / "docs.jsonl", _documents())
    serial = _prepare(tok, path, tmp_path / "serial", workers=0)
    parallel = _prepare(tok, path, tmp_path / "parallel", workers=2)
    assert serial == parallel
    a, b = _arrays(tmp_path / "serial"), _arrays(tmp_path / "parallel")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_text_source_and_trained_tokenizer(tmp_path):
    (tmp_path / "src").mkdir()
    texts = {f"m{i}.py": f"def f{i}(x):\r\n    return x * {i}  # é\n" for i in range(12)}
    for name, text in texts.items():
        (tmp_path / "src" / name).write_bytes(text.encode())
    meta = prepare.prepare("text", str(tmp_path / "src"), str(tmp_path / "out"),
                           vocab_size=300, eval_fraction=0.0, docs_per_shard=5)
    tok = tokenizer_lib.load_tokenizer(str(tmp_path / "out" / "tokenizer.model"))
    assert meta["tokenizer"]["sha256"] == tok.checksum()
    docs = [tok.decode(ids[:-1]) for ids in _documents_of(tmp_path / "out", "train")]
    assert docs == [texts[name] for name in sorted(texts)]   # files in path order, verbatim


def test_sft_corpus_stores_prompt_then_response(tok, tmp_path):
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name?"},
            {"role": "assistant", "content": "dllm"}]
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "Add.", "response": "a + b"}) + "\n"
                    + json.dumps({"messages": chat}) + "\n")
    meta = prepare.prepare("sft", str(path), str(tmp_path / "out"), tokenizer=tok.path,
                           eval_fraction=0.0)
    assert meta["kind"] == "sft"
    c = corpus.PreparedCorpus(str(tmp_path / "out"))
    offsets, prompts = c.offsets(), c.prompt_lengths()
    expected = [(tokenizer_lib.chat_template([{"role": "user", "content": "Add."}]), "a + b"),
                (tokenizer_lib.chat_template(chat[:2]), "dllm")]
    for d, (prompt, response) in enumerate(expected):
        ids = c.read(offsets[d], offsets[d + 1]).tolist()
        assert prompts[d] == len(tok.encode(prompt))
        assert ids == tok.encode(prompt) + tok.encode(response) + [tok.im_end_id]


def test_a_read_touches_only_the_chunks_it_spans(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "TOKEN_CHUNKS", (1024, 128))
    docs = _documents(200, seed=1)
    _prepare(tok, _write_jsonl(tmp_path / "docs.jsonl", docs), tmp_path / "out",
             eval_fraction=0.0, docs_per_shard=50)
    c = corpus.PreparedCorpus(str(tmp_path / "out"))
    assert c.num_tokens > 8 * 1024      # several files of several chunks each
    stored = sum(p.stat().st_size for p in (tmp_path / "out" / "train" / "tokens").rglob("*"))

    def bytes_read():
        return sum(v["value"] for m in ts.experimental_collect_matching_metrics(
            "/tensorstore/kvstore/file/bytes_read") for v in m["values"])

    before = bytes_read()
    window = c.read(5000, 5064)
    spent = bytes_read() - before
    flat = np.concatenate([tok.encode(d) + [tok.eos_id] for d in docs])
    np.testing.assert_array_equal(window, flat[5000:5064])
    assert 0 < spent < stored / 10


# ----------------------------------------------------------------------------- RL problems


def _reference_percentile(values, q):
    """Linear-interpolation percentile, written out (numpy's default definition)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _reference_keep(rates, max_mean_q, min_std_q):
    means = [sum(r) / len(r) for r in rates]
    stds = [math.sqrt(sum((x - m) ** 2 for x in r) / len(r)) for r, m in zip(rates, means)]
    t_mean = _reference_percentile(means, max_mean_q)
    hard = [i for i, m in enumerate(means) if m <= t_mean]
    t_std = _reference_percentile([stds[i] for i in hard], min_std_q)
    return {i for i in hard if stds[i] >= t_std}


@pytest.mark.parametrize("max_mean_q,min_std_q", [(20, 40), (50, 10), (100, 0)])
def test_difficulty_filter_matches_a_reference(max_mean_q, min_std_q):
    rng = np.random.default_rng(0)
    # Pass rates of 8 samples, 4 models: many ties, and exact means and spreads in
    # binary floating point, so the two computations agree to the bit.
    rates = rng.integers(0, 9, (300, 4)) / 8
    keep = prepare.difficulty_filter(rates, max_mean_q, min_std_q)
    assert set(np.flatnonzero(keep)) == _reference_keep(rates.tolist(), max_mean_q, min_std_q)
    if (max_mean_q, min_std_q) == (20, 40):
        assert 0.05 * 300 < keep.sum() < 0.2 * 300
    if (max_mean_q, min_std_q) == (100, 0):
        assert keep.all()


def _problems_file(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_prepare_problems_writes_tasks_that_load(tmp_path):
    rng = np.random.default_rng(1)
    rows = []
    for i in range(50):
        question = (f"Write f{i}(x) returning x + {i}." if i % 2 else
                    f"Complete:\n```python\ndef f{i}(x):\n```")
        rows.append({"task_id": f"p{i}", "question": question, "entry_point": f"f{i}",
                     "tests": [f"assert f{i}(1) == {1 + i}", f"assert f{i}(0) == {i}"],
                     "pass_rates": {"a": float(rng.random()), "b": float(rng.random())}})
    summary = prepare.prepare_problems(_problems_file(tmp_path / "p.jsonl", rows),
                                       str(tmp_path / "hard.jsonl"))
    rates = [[r["pass_rates"]["a"], r["pass_rates"]["b"]] for r in rows]
    kept = sorted(_reference_keep(rates, 20, 40))
    assert summary == {"problems": 50, "kept": len(kept), "models": ["a", "b"]}
    loaded = tasks.load_tasks(str(tmp_path / "hard.jsonl"))
    assert [t.task_id for t in loaded] == [f"p{i}" for i in kept]
    for t in loaded:
        i = int(t.task_id[1:])
        assert t.tests == tuple(rows[i]["tests"]) and t.entry_point == f"f{i}"
        expected = rows[i]["question"] + ("" if i % 2 == 0 else
                                          f"\nTest cases: assert f{i}(1) == {1 + i}")
        assert t.prompt == expected


def test_problems_lacking_a_model_or_tests_name_the_line(tmp_path):
    rows = [{"question": "q", "tests": ["assert 1"], "pass_rates": {"a": 0.5, "b": 0.1}},
            {"question": "q2", "tests": ["assert 1"], "pass_rates": {"a": 0.5}}]
    path = _problems_file(tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=r"p\.jsonl:2: no pass rate for model\(s\) \['b'\]"):
        prepare.prepare_problems(path, str(tmp_path / "out.jsonl"))
    assert prepare.prepare_problems(path, str(tmp_path / "out.jsonl"), models=["a"],
                                    max_mean_percentile=100, min_std_percentile=0)["kept"] == 2
    path = _problems_file(tmp_path / "q.jsonl", [{"question": "q", "tests": []}])
    with pytest.raises(ValueError, match=r"q\.jsonl:1: `tests` must be a non-empty list"):
        prepare.prepare_problems(path, str(tmp_path / "out.jsonl"))


@pytest.mark.slow   # two interpreters start (~5 s)
def test_cli_prepares_then_verifies_and_filters_problems(tok, tmp_path):
    env = {**os.environ, "PYTHONPATH": runs.ROOT}
    path = _write_jsonl(tmp_path / "docs.jsonl", _documents(12))
    command = [sys.executable, "-m", "dllm.prepare", "--source=jsonl", f"--path={path}",
               f"--out={tmp_path / 'out'}", f"--tokenizer={tok.path}", "--workers=1"]
    first = subprocess.run(command, env=env, capture_output=True, text=True,
                           timeout=runs.TIMEOUT_S)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"{tmp_path / 'out'} train:" in first.stdout
    again = subprocess.run(command, env=env, capture_output=True, text=True,
                           timeout=runs.TIMEOUT_S)
    assert again.returncode == 0 and "already prepared; verifying" in again.stdout
    problems = _problems_file(tmp_path / "p.jsonl", [
        {"question": f"q{i}", "tests": ["assert True"], "pass_rates": {"m": i / 10}}
        for i in range(10)])
    rl = subprocess.run([sys.executable, "-m", "dllm.prepare", "--source=rl",
                         f"--path={problems}", f"--out={tmp_path / 'hard.jsonl'}",
                         "--min_std_percentile=0"], env=env, capture_output=True, text=True,
                        timeout=runs.TIMEOUT_S)
    assert rl.returncode == 0, rl.stderr[-3000:]
    assert "kept 2 of 10 problems" in rl.stdout    # means 0.0, 0.1 <= the 20th percentile, 0.18
