import numpy as np
import pytest

from models.tokenizer import BOS_ID, EOS_ID, PAD_ID, ByteTokenizer, WordTokenizer, tokenizer_from_dict

STRANGE_TEXTS = [
    "",
    "a red circle",
    "Ünïcödé ⚽ 日本語のキャプション 🙂",
    "lone surrogate \ud800 here",
    b"\xff\xfe bad utf-8 \xc3",
    "x" * 10_000,
    "tab\tnew\nline  spaces",
]


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), WordTokenizer.build(["a red circle", "a blue square"] * 2)])
def test_any_text_gives_fixed_length_ids_in_vocab(tokenizer):
    for text in STRANGE_TEXTS:
        ids = tokenizer.encode(text, 16)
        assert ids.shape == (16,) and ids.dtype == np.int32
        assert ids[0] == BOS_ID
        assert EOS_ID in ids
        assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size
    batch = tokenizer.encode_batch(STRANGE_TEXTS, 16)
    assert batch.shape == (len(STRANGE_TEXTS), 16)
    assert tokenizer.encode_batch([], 16).shape == (0, 16)


def test_byte_tokenizer_is_deterministic_and_truncates_keeping_eos():
    tokenizer = ByteTokenizer()
    ids = tokenizer.encode("abc", 8)
    np.testing.assert_array_equal(
        ids, [BOS_ID, ord("a") + 3, ord("b") + 3, ord("c") + 3, EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    )
    long_ids = tokenizer.encode("abcdefghij", 5)
    np.testing.assert_array_equal(long_ids, [BOS_ID, ord("a") + 3, ord("b") + 3, ord("c") + 3, EOS_ID])
    # NFKC: the ligature "ﬁ" and "fi" are the same caption.
    np.testing.assert_array_equal(tokenizer.encode("ﬁsh", 8), tokenizer.encode("fish", 8))


def test_word_tokenizer_vocab_roundtrips_and_hashes_unknown_words():
    tokenizer = WordTokenizer.build(["A red circle.", "a blue circle", "a red square"], min_count=2)
    assert tokenizer.vocab == ["a", "circle", "red"]
    restored = tokenizer_from_dict(tokenizer.to_dict())
    for text in ["a red circle", "an unseen word", "Red, RED!"]:
        np.testing.assert_array_equal(restored.encode(text, 12), tokenizer.encode(text, 12))
    red, unseen = tokenizer.encode("red zebra", 4)[1:3]
    assert red == tokenizer.encode("RED", 3)[1]
    assert 3 <= unseen < 3 + tokenizer.n_hash_buckets  # a hash bucket, not a vocabulary id


def test_tokenizer_from_dict_rejects_unknown_state():
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        tokenizer_from_dict({"kind": "sentencepiece"})
    with pytest.raises(ValueError, match="unknown keys.*'extra'"):
        tokenizer_from_dict({"kind": "words", "vocab": [], "extra": 1})
