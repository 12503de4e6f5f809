"""Tests for dllm/data.py: corpora, packing, sharding, shuffling, iterator state, SFT, errors."""
import ast
import collections
import json
import os
import re

import numpy as np
import pytest

from dllm import data, fs
from dllm import tokenizer as tokenizer_lib

SEQ_LEN, BATCH = 32, 4
SFT_TINY = os.path.join(os.path.dirname(__file__), "..", "experiments", "data", "sft_tiny.jsonl")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    cfg = data.default_config()
    cfg.max_documents = 100
    path = str(tmp_path_factory.mktemp("tok") / "sp.model")
    return tokenizer_lib.train_sentencepiece(data.load_documents(cfg), 1024, path,
                                             max_bytes=500_000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl corpus of 60 distinct small documents."""
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(60):
            body = "\n".join(f"    x{j} = {int(v)}" for j, v in enumerate(rng.integers(0, 999, 8)))
            f.write(json.dumps({"text": f"def doc_{i}():\n{body}\n", "id": i}) + "\n")
    return str(path)


def _cfg(**overrides):
    cfg = data.default_config()
    cfg.update(dict(source="jsonl", seq_len=SEQ_LEN, eval_fraction=0.2), **overrides)
    return cfg


def _rows(batches):
    """Counter of the rows (as tuples) of a list of batches."""
    return collections.Counter(tuple(r) for b in batches for r in b["tokens"])


def _take(it, n):
    return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------- corpora


def test_stdlib_files():
    files = data.stdlib_files()
    assert len(files) > 500 and files == sorted(files)
    assert all(f.endswith(".py") and "site-packages" not in f.split(os.sep) for f in files)
    assert any(f.endswith(os.sep + "json" + os.sep + "decoder.py") for f in files)


def test_stdlib_documents_are_files_verbatim():
    cfg = data.default_config()
    cfg.max_documents = 50
    docs = data.load_documents(cfg)
    contents = set()
    for path in data.stdlib_files():
        with open(path, "rb") as f:
            contents.add(f.read())
    assert len(docs) == 50 and all(d.encode("utf-8") in contents for d in docs)


def test_max_documents_and_fixed_split(corpus):
    docs = data.load_documents(_cfg(path=corpus))
    assert len(docs) == 60 and docs == data.load_documents(_cfg(path=corpus))
    assert sorted(docs) == sorted(json.loads(l)["text"] for l in open(corpus))
    assert docs[:7] != sorted(docs)[:7]  # a pseudo-random order, not the file order
    capped = data.load_documents(_cfg(path=corpus, max_documents=10))
    assert capped == docs[:10]
    train, held_out = data.split_documents(docs, 0.2)
    assert len(held_out) == 12 and len(train) == 48 and not set(train) & set(held_out)


def test_text_source_reads_files_and_dirs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(b"first\r\nfile\n")
    (tmp_path / "sub" / "b.py").write_bytes("x = '\u00e9'\n".encode())
    expected = {"first\r\nfile\n", "x = '\u00e9'\n"}
    assert set(data.load_documents(_cfg(source="text", path=str(tmp_path)))) == expected
    assert data.load_documents(_cfg(source="text", path=str(tmp_path / "**" / "*.py"))) == [
        "x = '\u00e9'\n"]


def test_corpus_on_gs(corpus, fake_gcs):
    """A jsonl object, or the text objects under a prefix, on gs:// (fake: in memory)."""
    fs.copy(corpus, "gs://bkt/data/docs.jsonl")
    assert data.load_documents(_cfg(path="gs://bkt/data/docs.jsonl")) == \
        data.load_documents(_cfg(path=corpus))
    fs.write_bytes("gs://bkt/text/a.txt", b"first\r\nfile\n")
    fs.write_bytes("gs://bkt/text/b.py", "x = '\u00e9'\n".encode())
    assert sorted(data.load_documents(_cfg(source="text", path="gs://bkt/text"))) == [
        "first\r\nfile\n", "x = '\u00e9'\n"]
    with pytest.raises(FileNotFoundError, match="gs://bkt/nowhere"):
        data.load_documents(_cfg(path="gs://bkt/nowhere"))


# ----------------------------------------------------------------------------- errors


def test_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_documents(_cfg(source="text", path=str(tmp_path / "nowhere")))


def test_empty_corpus(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        data.load_documents(_cfg(source="text", path=str(tmp_path)))


@pytest.mark.parametrize("lines,message", [
    (['{"text": "ok"}', '{"text": "ok"', '{"text": "x"}'], r"bad\.jsonl:2: malformed JSON"),
    (['{"text": "ok"}', '', '["a list"]'], r"bad\.jsonl:3: expected a JSON object"),
    (['{"text": "ok"}', '{"body": "no text"}'], r"bad\.jsonl:2: field 'text' missing"),
    (['{"text": 3}'], r"bad\.jsonl:1: field 'text' missing or not a string"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=message):
        data.load_documents(_cfg(path=str(path)))


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(b"ok\nstill ok\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt:3: not valid UTF-8"):
        data.load_documents(_cfg(source="text", path=str(path)))


def test_sft_missing_response_names_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n')
    with pytest.raises(ValueError, match=r"pairs\.jsonl:2: field 'response' missing"):
        data.load_sft_pairs(str(path))


def test_unknown_source_lists_the_allowed_ones(tok):
    with pytest.raises(ValueError, match="'stdlib', 'text', 'jsonl', 'sft'"):
        data.make_dataset(_cfg(source="csv"), tok, split="train", batch_size=1, seed=0)


def test_too_little_data_for_a_batch(tok, corpus):
    with pytest.raises(ValueError, match="less than one batch"):
        data.make_dataset(_cfg(path=corpus), tok, split="eval", batch_size=1000, seed=0)


# ----------------------------------------------------------------------------- packing


def _packed(tok, cfg, split):
    """The split's rows, packed here independently: list of seq_len tuples, in order."""
    train, held_out = data.split_documents(data.load_documents(cfg), cfg.eval_fraction)
    flat = [t for d in (train if split == "train" else held_out)
            for t in tok.encode(d) + [tok.eos_id]]
    return [tuple(flat[i:i + SEQ_LEN]) for i in range(0, len(flat) - SEQ_LEN + 1, SEQ_LEN)]


def test_pack_documents():
    packed = data.pack_documents([[1, 2, 3], [4, 5], [6, 7]], eos_id=9, seq_len=3)
    # 1 2 3 | 9 4 5 | 9 6 7 | 9 -> the tail "9" is dropped.
    np.testing.assert_array_equal(packed, [[1, 2, 3], [9, 4, 5], [9, 6, 7]])
    assert packed.dtype == np.int32


def test_train_epoch_is_the_packed_corpus_shuffled(tok, corpus):
    cfg = _cfg(path=corpus)
    expected = _packed(tok, cfg, "train")
    it = iter(data.make_dataset(cfg, tok, split="train", batch_size=1, seed=0))
    batches = _take(it, len(expected))
    assert set(batches[0]) == {"tokens"}
    assert batches[0]["tokens"].shape == (1, SEQ_LEN) and batches[0]["tokens"].dtype == np.int32
    assert _rows(batches) == collections.Counter(expected)
    assert [tuple(b["tokens"][0]) for b in batches] != expected  # shuffled


def test_eval_is_one_ordered_pass_independent_of_seed(tok, corpus):
    cfg, batch_size = _cfg(path=corpus), 3
    expected = _packed(tok, cfg, "eval")
    assert len(expected) % batch_size  # so there is a partial batch to drop
    batches = list(data.make_dataset(cfg, tok, split="eval", batch_size=batch_size, seed=0))
    assert len(batches) == len(expected) // batch_size > 0
    assert all(b["tokens"].shape == (batch_size, SEQ_LEN) for b in batches)
    assert [tuple(r) for b in batches for r in b["tokens"]] == expected[:len(batches) * batch_size]
    other_seed = list(data.make_dataset(cfg, tok, split="eval", batch_size=batch_size, seed=9))
    assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(batches, other_seed))


# ----------------------------------------------------------------------------- shuffling


def test_shuffle_determined_by_seed_and_new_each_epoch(tok, corpus):
    cfg = _cfg(path=corpus)
    n = len(_packed(tok, cfg, "train"))

    def rows(seed, count):
        it = iter(data.make_dataset(cfg, tok, split="train", batch_size=1, seed=seed))
        return [tuple(b["tokens"][0]) for b in _take(it, count)]

    a = rows(0, 2 * n)
    assert a == rows(0, 2 * n)
    assert a[:n] != rows(1, n)
    assert a[:n] != a[n:] and sorted(a[:n]) == sorted(a[n:])


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("split", ["train", "eval"])
def test_each_sequence_read_by_exactly_one_process_per_epoch(tok, corpus, split):
    cfg, count = _cfg(path=corpus), 3
    expected = collections.Counter(_packed(tok, cfg, split))
    assert max(expected.values()) == 1   # distinct sequences: a repeat would show
    per_process = len(expected) // count
    union = collections.Counter()
    for index in range(count):
        it = iter(data.make_dataset(cfg, tok, split=split, batch_size=1, seed=5,
                                    process_index=index, process_count=count))
        union += _rows(_take(it, per_process))
    assert per_process > 0
    assert sum(union.values()) == per_process * count and max(union.values()) == 1
    assert not union - expected


def test_global_batches_do_not_depend_on_the_process_count(tok, corpus):
    """Process p's b-th batch is rows [p B, (p+1) B) of the one-process run's b-th
    global batch of P x B rows: a sharded run sees the data of a one-process run."""
    cfg, count, local = _cfg(path=corpus), 2, 2
    whole = _take(iter(data.make_dataset(cfg, tok, split="train", batch_size=count * local,
                                         seed=7)), 6)
    parts = [_take(iter(data.make_dataset(cfg, tok, split="train", batch_size=local, seed=7,
                                          process_index=p, process_count=count)), 6)
             for p in range(count)]
    for b, batch in enumerate(whole):
        np.testing.assert_array_equal(
            batch["tokens"], np.concatenate([parts[p][b]["tokens"] for p in range(count)]))


# ----------------------------------------------------------------------------- checkpointing


def test_iterator_state_restores_identical_batches(tok, corpus):
    ds = data.make_dataset(_cfg(path=corpus), tok, split="train", batch_size=BATCH, seed=3)
    it = iter(ds)
    n_train = len(_packed(tok, _cfg(path=corpus), "train"))
    _take(it, n_train // BATCH + 2)  # into the second epoch
    state = json.loads(json.dumps(it.get_state()))
    after = _take(it, 5)
    restored = iter(data.make_dataset(_cfg(path=corpus), tok, split="train", batch_size=BATCH,
                                      seed=3))
    restored.set_state(state)
    for a, b in zip(after, _take(restored, 5)):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])


# ----------------------------------------------------------------------------- tokenizer cache


def test_get_tokenizer_trains_once_then_reuses(corpus, tmp_path):
    cfg = _cfg(path=corpus, vocab_size=400)
    tok = data.get_tokenizer(cfg, str(tmp_path))
    path = tmp_path / "tokenizer.model"
    assert path.exists() and tok.vocab_size <= 400
    mtime = path.stat().st_mtime_ns
    again = data.get_tokenizer(cfg, str(tmp_path))
    assert path.stat().st_mtime_ns == mtime and again.encode("def f") == tok.encode("def f")
    given = data.get_tokenizer(_cfg(path=corpus, tokenizer=str(path)), str(tmp_path / "other"))
    assert given.vocab_size == tok.vocab_size and not (tmp_path / "other").exists()


# ----------------------------------------------------------------------------- SFT


def _sft_cfg(path, seq_len):
    return _cfg(source="sft", path=str(path), seq_len=seq_len, eval_fraction=0.0)


def test_sft_examples(tok, tmp_path):
    pairs = [("Add two numbers.", "```python\ndef add(a, b):\n    return a + b\n```"),
             ("Say hi.", "hi")]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    batch = next(iter(data.make_dataset(_sft_cfg(path, 96), tok, split="train", batch_size=2,
                                        seed=0)))
    assert set(batch) == {"tokens", "prompt_mask", "pad_mask"}
    assert batch["tokens"].shape == batch["prompt_mask"].shape == (2, 96)
    assert batch["prompt_mask"].dtype == batch["pad_mask"].dtype == np.bool_
    decoded = set()
    for tokens, prompt_mask, pad_mask in zip(batch["tokens"], batch["prompt_mask"],
                                             batch["pad_mask"]):
        n_prompt, n_pad = prompt_mask.sum(), pad_mask.sum()
        assert prompt_mask[:n_prompt].all() and pad_mask[96 - n_pad:].all()  # prefix, suffix
        assert (tokens[pad_mask] == tok.pad_id).all() and tok.pad_id not in tokens[~pad_mask]
        prompt = tok.decode(tokens[prompt_mask])
        response = tok.decode(tokens[~prompt_mask & ~pad_mask])
        decoded.add((prompt, response))
    assert decoded == {(tok.apply_chat_template([{"role": "user", "content": p}], True),
                        r + "<|im_end|>") for p, r in pairs}


def test_sft_truncation(tok):
    prompt = " ".join(f"word{i}" for i in range(200))
    full_prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": prompt}], True))
    response = tok.encode("return 1") + [tok.im_end_id]
    # Long prompt: cut from the left, response kept whole.
    out = data.sft_examples(tok, [(prompt, "return 1")], seq_len=64)
    assert out["tokens"][0].tolist() == full_prompt[-(64 - len(response)):] + response
    assert out["prompt_mask"][0].sum() == 64 - len(response) and not out["pad_mask"].any()
    # Response longer than seq_len: no prompt left, response cut from the right.
    long_response = "\n".join(f"x{i} = {i}" for i in range(100))
    out = data.sft_examples(tok, [(prompt, long_response)], seq_len=64)
    assert out["tokens"][0].tolist() == tok.encode(long_response)[:64]
    assert not out["prompt_mask"].any() and not out["pad_mask"].any()


def test_sft_tiny_file(tok):
    pairs = data.load_sft_pairs(SFT_TINY)
    assert 50 <= len(pairs) <= 200 and len(set(pairs)) == len(pairs)
    for _, response in pairs:
        code = re.fullmatch(r"```python\n(.*)\n```", response, re.DOTALL)
        ast.parse(code.group(1))
    out = data.sft_examples(tok, pairs, seq_len=256)
    assert out["pad_mask"].any(axis=1).all()  # everything fits in 256 tokens, untruncated


def test_stdlib_path_selects_a_subset_by_glob():
    files = data.stdlib_files("json/*.py,email/mime/*.py")
    assert files and all(("/json/" in f) or ("/email/mime/" in f) for f in files)
    assert any(f.endswith("json/decoder.py") for f in files)
    assert len(files) < len(data.stdlib_files()) / 10
