"""Deterministic caption tokenizers that need no download.

Two kinds, both taking any Unicode (or raw bytes) and returning a fixed-length int32 array, padded with 0:
  - `ByteTokenizer`: UTF-8 bytes; no state, 259 ids.
  - `WordTokenizer`: a word vocabulary built from a corpus and saved with the checkpoint (via `to_dict`), with
    hashed buckets for out-of-vocabulary words so that unseen words still get distinct, stable ids.
"""

from __future__ import annotations

import collections
import re
import unicodedata
import zlib
from typing import Iterable, Sequence

import numpy as np

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
_N_SPECIAL = 3

_WORD_PATTERN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def normalize_text(text: str | bytes) -> str:
    """NFKC-normalized text; bytes are decoded as UTF-8 with invalid sequences replaced, never rejected."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    # Lone surrogates cannot be encoded; replace them so every str is accepted.
    text = text.encode("utf-8", errors="replace").decode("utf-8")
    return unicodedata.normalize("NFKC", text)


def _pad(ids: Sequence[int], length: int) -> np.ndarray:
    """[BOS] ids [EOS], truncated to `length` (EOS kept last when truncated), then padded with PAD_ID."""
    if length < 2:
        raise ValueError(f"token length must be at least 2 (BOS and EOS), got {length}")
    body = list(ids)[: length - 2]
    out = np.full([length], PAD_ID, np.int32)
    out[: len(body) + 2] = [BOS_ID, *body, EOS_ID]
    return out


class _BatchEncoder:
    def encode(self, text: str | bytes, length: int) -> np.ndarray:
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str | bytes], length: int) -> np.ndarray:
        """[N, length] int32."""
        rows = [self.encode(text, length) for text in texts]
        return np.stack(rows) if rows else np.zeros([0, length], np.int32)


class ByteTokenizer(_BatchEncoder):
    """UTF-8 bytes of the NFKC-normalized caption, shifted past the special ids."""

    kind = "bytes"
    vocab_size = 256 + _N_SPECIAL

    def encode(self, text: str | bytes, length: int) -> np.ndarray:
        data = normalize_text(text).encode("utf-8")
        return _pad([byte + _N_SPECIAL for byte in data], length)

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class WordTokenizer(_BatchEncoder):
    """Lower-cased words and punctuation; known words get their own id, unknown ones one of `n_hash_buckets`."""

    kind = "words"

    def __init__(self, vocab: Sequence[str], n_hash_buckets: int = 64):
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate words")
        if n_hash_buckets < 1:
            raise ValueError(f"n_hash_buckets must be >= 1, got {n_hash_buckets}")
        self.vocab = list(vocab)
        self.n_hash_buckets = n_hash_buckets
        self._ids = {word: _N_SPECIAL + n_hash_buckets + i for i, word in enumerate(self.vocab)}
        self.vocab_size = _N_SPECIAL + n_hash_buckets + len(self.vocab)

    @staticmethod
    def words(text: str | bytes) -> list[str]:
        return _WORD_PATTERN.findall(normalize_text(text).lower())

    @classmethod
    def build(
        cls, texts: Iterable[str | bytes], max_vocab: int = 4096, min_count: int = 2, n_hash_buckets: int = 64
    ) -> "WordTokenizer":
        """Vocabulary of the `max_vocab` most frequent words seen at least `min_count` times (ties by word)."""
        counts = collections.Counter(word for text in texts for word in cls.words(text))
        ranked = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[:max_vocab], n_hash_buckets)

    def _word_id(self, word: str) -> int:
        known = self._ids.get(word)
        if known is not None:
            return known
        return _N_SPECIAL + zlib.crc32(word.encode("utf-8")) % self.n_hash_buckets

    def encode(self, text: str | bytes, length: int) -> np.ndarray:
        return _pad([self._word_id(word) for word in self.words(text)], length)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "vocab": list(self.vocab), "n_hash_buckets": self.n_hash_buckets}


def tokenizer_from_dict(state: dict) -> ByteTokenizer | WordTokenizer:
    """Inverse of `to_dict`; raises on an unknown kind or unknown keys."""
    state = dict(state)
    kind = state.pop("kind", None)
    if kind == ByteTokenizer.kind:
        if state:
            raise ValueError(f"unknown keys for the byte tokenizer: {sorted(state)}")
        return ByteTokenizer()
    if kind == WordTokenizer.kind:
        unknown = set(state) - {"vocab", "n_hash_buckets"}
        if unknown:
            raise ValueError(f"unknown keys for the word tokenizer: {sorted(unknown)}")
        return WordTokenizer(state["vocab"], state.get("n_hash_buckets", 64))
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'bytes' or 'words'")
