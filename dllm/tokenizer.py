"""Tokenizers: a small interface, a sentencepiece BPE implementation, the chat template.

Special tokens are named (DiffuCoder / Qwen names) and resolved by name, never by id:

    <|mask|>          the diffusion mask token            tok.mask_id
    <|dlm_pad|>       padding (SFT responses are padded)  tok.pad_id
    <|beginoftext|>   beginning of text                   tok.bos_id
    <|endoftext|>     end of a document                   tok.eos_id
    <|im_start|>      chat turn start (ChatML)            tok.im_start_id
    <|im_end|>        chat turn end                       tok.im_end_id

`encode` adds no special tokens but does parse the names above when they occur in the
text (as Hugging Face tokenizers do), so `encode(apply_chat_template(...))` yields the
chat markers as single ids. `decode` drops nothing: special tokens are rendered as
their names, so `decode(encode(text)) == text` for every string.
"""
import abc
import hashlib
import json
import os
import tempfile
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2 as sp_model
from tokenizers import decoders, normalizers, pre_tokenizers

from dllm import fs

MASK = "<|mask|>"
PAD = "<|dlm_pad|>"
BOS = "<|beginoftext|>"
EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (MASK, PAD, BOS, EOS, IM_START, IM_END)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


class Tokenizer(abc.ABC):
    """What the rest of dllm needs from a tokenizer."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids; every id is in [0, vocab_size)."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; no bos / eos added."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`, special tokens rendered as their names."""

    @abc.abstractmethod
    def token_to_id(self, name: str) -> int:
        """Id of the token `name` (e.g. "<|mask|>"); KeyError if it is not one token."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` of each text (implementations may parallelise)."""
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def to_file(self) -> tuple[str, bytes]:
        """(file name, contents) that `load_tokenizer` reads back as this tokenizer:
        "tokenizer.model" (sentencepiece) or "tokenizer.json" (Hugging Face)."""

    @abc.abstractmethod
    def to_hf(self) -> tokenizers.Tokenizer:
        """This tokenizer as a Hugging Face `tokenizers.Tokenizer` (tokenizer.json), same ids."""

    def checksum(self) -> str:
        """sha256 of `to_file()`'s contents: the tokenizer's identity (same ids)."""
        return hashlib.sha256(self.to_file()[1]).hexdigest()

    @property
    def mask_id(self) -> int:
        return self.token_to_id(MASK)

    @property
    def pad_id(self) -> int:
        return self.token_to_id(PAD)

    @property
    def bos_id(self) -> int:
        return self.token_to_id(BOS)

    @property
    def eos_id(self) -> int:
        return self.token_to_id(EOS)

    @property
    def im_start_id(self) -> int:
        return self.token_to_id(IM_START)

    @property
    def im_end_id(self) -> int:
        return self.token_to_id(IM_END)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        """`chat_template(messages, add_generation_prompt)` (the string; `encode` it)."""
        return chat_template(messages, add_generation_prompt)


def token_texts(tok: Tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds in context (decoding prefixes keeps the spaces that
    decoding tokens one by one would drop)."""
    texts, prev = [], ""
    for i in range(len(ids)):
        text = tok.decode(ids[:i + 1])
        texts.append(text[len(prev):])
        prev = text
    return texts


def chat_template(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Renders messages in Qwen's ChatML format (DiffuCoder's chat format).

    Args:
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]. A
            default system message ("You are a helpful assistant.") is prepended when the
            first message is not a system message, as Qwen2.5's template does.
        add_generation_prompt: append "<|im_start|>assistant\\n" so a model continues
            with the assistant's answer.
    """
    if not messages or messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, *messages]
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    if add_generation_prompt:
        text += f"{IM_START}assistant\n"
    return text


# chat_template as a Jinja template (tokenizer_config.json's "chat_template" in exports).
CHAT_TEMPLATE_JINJA = (
    "{% if messages[0]['role'] != 'system' %}" + IM_START + "system\n" + DEFAULT_SYSTEM_PROMPT
    + IM_END + "\n{% endif %}{% for m in messages %}" + IM_START + "{{ m['role'] }}\n"
    "{{ m['content'] }}" + IM_END + "\n{% endfor %}{% if add_generation_prompt %}" + IM_START
    + "assistant\n{% endif %}")


# sentencepiece turns spaces into this meta symbol and back, so a literal one in the
# input would decode as a space; we encode it as its UTF-8 bytes instead.
_SPACE_META = "\u2581"


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (.model file) with byte fallback and the special tokens."""

    def __init__(self, path: str):
        if not fs.exists(path) or fs.isdir(path):
            raise FileNotFoundError(f"tokenizer {path!r}: no such file")
        self.path = path
        self._sp = spm.SentencePieceProcessor(model_proto=fs.read_bytes(path))
        self._meta_ids = [self._byte_id(b) for b in _SPACE_META.encode("utf-8")]
        missing = [name for name in SPECIAL_TOKENS if not self._is_token(name)]
        if missing:
            raise ValueError(f"tokenizer {path!r} lacks the special tokens {missing}")

    def _is_token(self, piece: str) -> bool:
        i = self._sp.piece_to_id(piece)
        return i != self._sp.unk_id() and self._sp.id_to_piece(i) == piece

    def _byte_id(self, byte: int) -> int:
        piece = f"<0x{byte:02X}>"
        if not self._is_token(piece):
            raise ValueError(f"tokenizer {self.path!r} has no byte fallback (no piece {piece})")
        return self._sp.piece_to_id(piece)

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    def token_to_id(self, name: str) -> int:
        if not self._is_token(name):
            raise KeyError(f"{name!r} is not a token of {self.path!r}")
        return self._sp.piece_to_id(name)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Split on the literal meta symbol, encode the parts in parallel, rejoin with its bytes.
        parts = [t.split(_SPACE_META) for t in texts]
        flat = self._sp.encode([p for ps in parts for p in ps], num_threads=os.cpu_count() or 1)
        out, k = [], 0
        for ps in parts:
            ids = flat[k]  # a fresh list: extending it in place is safe
            for part_ids in flat[k + 1:k + len(ps)]:
                ids += self._meta_ids + part_ids
            out.append(ids)
            k += len(ps)
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids])

    def to_file(self) -> tuple[str, bytes]:
        return "tokenizer.model", self._sp.serialized_model_proto()

    def to_hf(self) -> tokenizers.Tokenizer:
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer` (what tokenizer.json
        holds; `transformers` and HFTokenizer load it): the pieces and, for each piece,
        the merges that make it (ranked by the piece's id, as sentencepiece ranks them),
        as a byte-fallback BPE on text with spaces as "▁", no pre-tokenizer (pieces span
        whitespace, as trained) and the special tokens as added tokens. Same ids except
        for a literal "▁" in the text (here its UTF-8 bytes, there a space)."""
        proto = sp_model.ModelProto.FromString(self._sp.serialized_model_proto())
        if proto.trainer_spec.model_type != sp_model.TrainerSpec.BPE:
            raise ValueError(f"tokenizer {self.path!r}: only BPE sentencepiece models convert")
        pieces = [p.piece for p in proto.pieces]
        vocab = {piece: i for i, piece in enumerate(pieces)}
        normal = sp_model.ModelProto.SentencePiece.NORMAL
        merges = [(piece[:k], piece[k:]) for p in proto.pieces if p.type == normal
                  for piece in [p.piece] for k in range(1, len(piece))
                  if piece[:k] in vocab and piece[k:] in vocab]
        tok = tokenizers.Tokenizer(tokenizers.models.BPE(
            vocab, merges, unk_token=pieces[self._sp.unk_id()], byte_fallback=True,
            fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", _SPACE_META)
        tok.decoder = decoders.Sequence([decoders.Replace(_SPACE_META, " "),
                                         decoders.ByteFallback(), decoders.Fuse()])
        tok.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)
                                for name in SPECIAL_TOKENS])
        return tok


def _chunks(texts: Iterable[str], chunk_chars: int, max_bytes: int) -> Iterable[str]:
    """Cuts texts into pieces of <= chunk_chars characters, until ~max_bytes are yielded."""
    total = 0
    for text in texts:
        for start in range(0, len(text), chunk_chars):
            chunk = text[start:start + chunk_chars]
            yield chunk
            total += len(chunk.encode("utf-8"))
            if total >= max_bytes:
                return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out_path: str, *,
                        max_bytes: int = 4_000_000) -> SentencePieceTokenizer:
    """Trains a byte-fallback BPE model on `texts` and writes it to `out_path` (.model).

    Whitespace is kept exactly (identity normalisation, no dummy prefix, no whitespace
    collapsing), so code round-trips byte for byte. Only the first `max_bytes` of the texts
    are read (about 1 s at vocab 4096 on two cores): pass them in a shuffled order. The
    vocabulary may come out smaller than `vocab_size` on a small corpus.

    The model is trained in a temporary directory and written atomically (dllm.fs; local
    or gs://), so a run that is killed mid-training never leaves a half-written model
    behind for a resume to pick up.
    """
    if not out_path.endswith(".model"):
        raise ValueError(f"out_path {out_path!r} must end in .model")
    # Sentences over max_sentence_length are silently skipped: cut the texts shorter.
    sentences = list(_chunks(texts, chunk_chars=4096, max_bytes=max_bytes))
    if not sentences:
        raise ValueError(f"cannot train tokenizer {out_path!r}: the corpus is empty")
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "spm")
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_prefix=prefix, model_type="bpe",
            vocab_size=vocab_size, hard_vocab_limit=False, byte_fallback=True,
            character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
            # Pieces may span whitespace ("):\n        return"): ~8% fewer tokens on code.
            split_by_whitespace=False, max_sentence_length=1 << 16,
            user_defined_symbols=list(SPECIAL_TOKENS), unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            num_threads=os.cpu_count() or 1, minloglevel=2)
        fs.makedirs(os.path.dirname(out_path) or ".")
        fs.copy(prefix + ".model", out_path)
    return SentencePieceTokenizer(out_path)


# Qwen2's pre-tokenizer split (as in its tokenizer.json), for directories that ship only
# vocab.json + merges.txt (Dream / DiffuCoder releases).
_QWEN2_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Order in which missing specials are appended: on Qwen2.5's 151665 ids this gives
# DiffuCoder's <|beginoftext|> 151665, <|mask|> 151666, <|dlm_pad|> 151667.
_ADD_ORDER = (BOS, MASK, PAD, EOS, IM_START, IM_END)


def _qwen2_from_vocab_merges(directory: str):
    """A `tokenizers.Tokenizer` rebuilt from vocab.json + merges.txt the way Qwen2's
    tokenizer is (byte-level BPE, NFC, Qwen2 split), with added_tokens.json's tokens."""
    bpe = tokenizers.models.BPE.from_file(os.path.join(directory, "vocab.json"),
                                          os.path.join(directory, "merges.txt"))
    tok = tokenizers.Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    added_path = os.path.join(directory, "added_tokens.json")
    if os.path.exists(added_path):
        with open(added_path) as f:
            added = sorted(json.load(f).items(), key=lambda kv: kv[1])
        for name, want in added:
            tok.add_special_tokens([tokenizers.AddedToken(name, special=True, normalized=False)])
            if tok.token_to_id(name) != want:
                raise ValueError(f"{added_path}: {name!r} should have id {want} but ids are not "
                                 f"contiguous after vocab.json (got {tok.token_to_id(name)})")
    return tok


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer: tokenizer.json, or a model directory holding
    one (or only vocab.json + merges.txt, rebuilt as Qwen2's byte-level BPE).

    Special tokens the file lacks (an AR Qwen2.5-Coder has no <|mask|>) are appended
    after its last id, in DiffuCoder's order; `save` writes the result, so a run keeps
    its ids. Qwen2 tokenizers NFC-normalise, so text round-trips byte for byte when it is
    NFC (ASCII code always is).
    """

    def __init__(self, path: str):
        self.path = path
        json_path = os.path.join(path, "tokenizer.json") if fs.isdir(path) else path
        if fs.exists(json_path):
            self._tok = tokenizers.Tokenizer.from_str(fs.read_text(json_path))
        elif os.path.isfile(os.path.join(path, "vocab.json")):
            self._tok = _qwen2_from_vocab_merges(path)
        else:
            raise FileNotFoundError(f"tokenizer {path!r}: no tokenizer.json (nor vocab.json + "
                                    "merges.txt)")
        missing = [name for name in _ADD_ORDER if self._tok.token_to_id(name) is None]
        self._tok.add_special_tokens(
            [tokenizers.AddedToken(name, special=True, normalized=False) for name in missing])
        self.added = missing

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, name: str) -> int:
        i = self._tok.token_to_id(name)
        if i is None:
            raise KeyError(f"{name!r} is not a token of {self.path!r}")
        return i

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str):
        """Writes tokenizer.json (with any appended special tokens) to `path`."""
        fs.write_text(path, self._tok.to_str(pretty=True))

    def to_file(self) -> tuple[str, bytes]:
        return "tokenizer.json", self._tok.to_str().encode("utf-8")

    def to_hf(self) -> tokenizers.Tokenizer:
        return self._tok


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a tokenizer by file type: .model (sentencepiece); tokenizer.json or a Hugging
    Face model directory (HFTokenizer)."""
    if path.endswith(".model"):
        return SentencePieceTokenizer(path)
    if path.endswith(".json") or fs.isdir(path):
        return HFTokenizer(path)
    raise ValueError(f"tokenizer {path!r}: unknown file type (supported: .model, "
                     "tokenizer.json, a Hugging Face model directory)")
