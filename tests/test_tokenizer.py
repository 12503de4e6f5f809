"""Tests for dllm/tokenizer.py: byte-exact round trips, special tokens, chat template."""
import pytest

from dllm import data, fs
from dllm import tokenizer as tokenizer_lib


def _stdlib_texts(paths):
    """(path, raw bytes, text) of the UTF-8 files among `paths`."""
    out = []
    for path in paths:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            out.append((path, raw, raw.decode("utf-8")))
        except UnicodeDecodeError:
            pass
    return out


@pytest.fixture(scope="module")
def stdlib_sample():
    """Every 10th stdlib file (~180 files): a spread over packages, tests included."""
    return _stdlib_texts(data.stdlib_files()[::10])


@pytest.fixture(scope="module")
def tok(tmp_path_factory, stdlib_sample):
    # Trained on other files than the sample, so the round trip is on unseen code.
    train_texts = [t for _, _, t in _stdlib_texts(data.stdlib_files()[5::10])]
    path = str(tmp_path_factory.mktemp("tok") / "sp.model")
    return tokenizer_lib.train_sentencepiece(train_texts, 2048, path, max_bytes=1_500_000)


def test_roundtrip_stdlib_sample_byte_for_byte(tok, stdlib_sample):
    assert len(stdlib_sample) > 150
    bad = [path for path, raw, text in stdlib_sample
           if tok.decode(tok.encode(text)).encode("utf-8") != raw]
    assert not bad


@pytest.mark.parametrize("text", [
    "",
    "def f(x):\r\n\treturn x  # crlf, tab\r\n",
    "x = 1    \n\n\n        \n",     # trailing spaces, runs of spaces and newlines
    "  leading spaces",
    "naïve café Ελληνικά 中文 😀\u3000\ufeff",  # non-ASCII, ideographic space, BOM
    "a\x00b\x1b[0m\x7f",            # control bytes
    "a\u2581b \u2581\u2581",        # sentencepiece's own space symbol, literally
    "<|mask|>x<|endoftext|>",       # special names are kept as text on decode
])
def test_roundtrip_edge_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_compresses_code(tok, stdlib_sample):
    # BPE, not bytes: code should take well under one token per byte.
    raw = sum(len(r) for _, r, _ in stdlib_sample)
    tokens = sum(len(ids) for ids in tok.encode_batch([t for _, _, t in stdlib_sample]))
    assert raw / tokens > 2.5


def test_encode_batch_matches_encode(tok, stdlib_sample):
    texts = [t for _, _, t in stdlib_sample[:20]] + ["a\u2581b", ""]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_special_tokens_are_single_distinct_ids(tok):
    ids = {name: tok.token_to_id(name) for name in tokenizer_lib.SPECIAL_TOKENS}
    assert len(set(ids.values())) == 6
    assert all(0 <= i < tok.vocab_size for i in ids.values())
    assert (tok.mask_id, tok.pad_id, tok.bos_id, tok.eos_id, tok.im_start_id, tok.im_end_id) == (
        ids["<|mask|>"], ids["<|dlm_pad|>"], ids["<|beginoftext|>"], ids["<|endoftext|>"],
        ids["<|im_start|>"], ids["<|im_end|>"])
    for name, i in ids.items():
        assert tok.encode(name) == [i]
        assert tok.decode([i]) == name


def test_encode_adds_no_specials(tok):
    ids = tok.encode("print('hello')\n")
    specials = {tok.token_to_id(n) for n in tokenizer_lib.SPECIAL_TOKENS}
    assert ids and not specials & set(ids)


def test_unknown_token_name(tok):
    with pytest.raises(KeyError, match="not a token"):
        tok.token_to_id("<|nope|>")


def test_chat_template_default_system(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Add 1 and 2."}],
                                   add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nAdd 1 and 2.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids.count(tok.im_start_id) == 3 and ids.count(tok.im_end_id) == 2


def test_chat_template_given_system_no_generation_prompt(tok):
    messages = [{"role": "system", "content": "Be terse."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\nhello<|im_end|>\n")


def test_load_tokenizer(tok, tmp_path):
    loaded = tokenizer_lib.load_tokenizer(tok.path)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.encode("for i in range(3):\n") == tok.encode("for i in range(3):\n")
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "nothere.model"))
    with pytest.raises(ValueError, match="unknown file type"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "tok.bin"))


def test_train_and_load_on_gs(fake_gcs):
    """Trained in a temporary directory, uploaded whole to the run directory on gs://."""
    path = "gs://bucket/run/tokenizer.model"
    tok = tokenizer_lib.train_sentencepiece(["def f(x):\n    return x\n"] * 20, 300, path)
    assert fs.listdir("gs://bucket/run") == ["tokenizer.model"]
    again = tokenizer_lib.load_tokenizer(path)
    assert again.vocab_size == tok.vocab_size
    assert again.encode("def g(y):\n") == tok.encode("def g(y):\n")
    assert again.decode(again.encode("def g(y):\n")) == "def g(y):\n"


def test_train_on_empty_corpus_fails(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        tokenizer_lib.train_sentencepiece(["", ""], 512, str(tmp_path / "t.model"))


def test_small_corpus_gives_smaller_vocab(tmp_path):
    tok = tokenizer_lib.train_sentencepiece(["abc abd\n"] * 10, 4096, str(tmp_path / "t.model"))
    assert 256 < tok.vocab_size < 4096  # bytes + specials + a few merges
    assert tok.decode(tok.encode("zzz \u00e9")) == "zzz \u00e9"  # unseen text: byte fallback
