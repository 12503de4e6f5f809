"""HFTokenizer (dllm/tokenizer.py): a Qwen2-style byte-level BPE tokenizer.json trained
here on stdlib code; byte-exact round trips, special tokens by name, agreement with
transformers' own Qwen2Tokenizer, the vocab.json + merges.txt form."""
import json
import os
import unicodedata

import pytest
import tokenizers
from tokenizers import decoders, normalizers, pre_tokenizers, trainers

from dllm import data
from dllm import tokenizer as tokenizer_lib
from test_tokenizer import _stdlib_texts as _read  # (path, bytes, text) of UTF-8 files

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # what Qwen2.5 ships


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A directory with a Qwen2-layout tokenizer.json (NFC, Qwen2 split, byte-level BPE)
    trained on stdlib files other than the test sample."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(tokenizer_lib._QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    texts = [t for _, _, t in _read(data.stdlib_files()[5::20])]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1000, special_tokens=QWEN_SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok")
    tok.save(str(path / "tokenizer.json"))
    return str(path)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return tokenizer_lib.load_tokenizer(os.path.join(tok_dir, "tokenizer.json"))


def test_roundtrip_stdlib_code_byte_for_byte(tok):
    sample = _read(data.stdlib_files()[::15])
    nfc = [(p, raw, t) for p, raw, t in sample if unicodedata.is_normalized("NFC", t)]
    assert len(nfc) > 100 and len(nfc) > 0.95 * len(sample)
    bad = [p for p, raw, t in nfc if tok.decode(tok.encode(t)).encode("utf-8") != raw]
    assert not bad
    assert tok.encode_batch([nfc[0][2], nfc[1][2]]) == [tok.encode(nfc[0][2]),
                                                        tok.encode(nfc[1][2])]


def test_missing_specials_are_appended_in_diffucoder_order(tok):
    # The file has 1000 ids; <|beginoftext|>, <|mask|>, <|dlm_pad|> follow, as on Qwen2.5
    # (151665, 151666, 151667 in DiffuCoder); Qwen's own specials keep their ids.
    assert tok.vocab_size == 1003
    assert (tok.bos_id, tok.mask_id, tok.pad_id) == (1000, 1001, 1002)
    assert (tok.eos_id, tok.im_start_id, tok.im_end_id) == (0, 1, 2)
    for name in tokenizer_lib.SPECIAL_TOKENS:
        i = tok.token_to_id(name)
        assert tok.encode(f"x{name}y")[1:-1] == [i] and tok.decode([i]) == name
    with pytest.raises(KeyError, match="nope"):
        tok.token_to_id("<|nope|>")


def test_save_keeps_the_appended_ids(tok, tmp_path):
    tok.save(str(tmp_path / "tokenizer.json"))
    again = tokenizer_lib.load_tokenizer(str(tmp_path))
    assert again.added == [] and again.mask_id == tok.mask_id and again.pad_id == tok.pad_id


def test_save_and_load_on_gs(tok, tok_dir, fake_gcs):
    tok.save("gs://bucket/run/tokenizer.json")
    for path in ("gs://bucket/run/tokenizer.json", "gs://bucket/run"):
        again = tokenizer_lib.load_tokenizer(path)
        assert again.added == [] and again.vocab_size == tok.vocab_size == 1003
        text = "def f(x):\n    return x  # ünïcode\n"
        assert again.encode(text) == tok.encode(text)


def test_chat_template_markers_are_single_ids(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Sort a list."}],
                                   add_generation_prompt=True)
    ids = tok.encode(text)
    assert ids[0] == tok.im_start_id and ids.count(tok.im_end_id) == 2
    assert tok.decode(ids) == text


@pytest.fixture(scope="module")
def code_text():
    return _read(data.stdlib_files()[7::40])[0][2][:20000] + "\nπ = 3.14  # ünïcode\n"


def test_matches_transformers_qwen2_tokenizer(tok_dir, tok, code_text):
    transformers = pytest.importorskip("transformers")
    with open(os.path.join(tok_dir, "tokenizer.json")) as f:
        model = json.load(f)["model"]
    ref = transformers.Qwen2Tokenizer(vocab=model["vocab"],
                                      merges=[tuple(m) for m in model["merges"]])
    assert ref(code_text)["input_ids"] == tok.encode(code_text)


def test_vocab_and_merges_directory_loads_like_tokenizer_json(tok_dir, tok, code_text, tmp_path):
    """Dream / DiffuCoder ship vocab.json + merges.txt + added_tokens.json."""
    tokenizers.Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json")).model.save(
        str(tmp_path))
    with open(tmp_path / "added_tokens.json", "w") as f:
        json.dump({"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2,
                   "<|beginoftext|>": 1000, "<|mask|>": 1001}, f)
    slow = tokenizer_lib.load_tokenizer(str(tmp_path))
    assert slow.added == ["<|dlm_pad|>"]
    assert (slow.bos_id, slow.mask_id, slow.pad_id) == (1000, 1001, 1002)
    text = code_text + tok.apply_chat_template([{"role": "user", "content": "hi"}], True)
    assert slow.encode(text) == tok.encode(text)


def test_load_tokenizer_rejects_unknown_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        tokenizer_lib.load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="unknown file type"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "vocab.txt"))
