"""Tiny random-weight keras-hub presets made offline: SigLIP with a SigLIP or a Gemma-style SentencePiece
tokenizer (as SigLIP 2 presets ship), and CLIP with a byte-pair vocabulary; saved with `save_to_preset` as a
user's own preset folder would be."""

from __future__ import annotations

import io
import os
import string

os.environ.setdefault("KERAS_BACKEND", "jax")

from demo.scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES

WORDS = sorted(
    {
        *SHAPES,
        *COLOURS,
        *SIZES,
        *BACKGROUNDS,
        "a",
        "an",
        "the",
        "on",
        "in",
        "at",
        "and",
        "of",
        "with",
        "background",
        "photo",
        "centre",
        "left",
        "right",
        "top",
        "bottom",
    }
)


def _sentences() -> list[str]:
    return [
        f"a {size} {colour} {shape} on a {background} background"
        for shape in SHAPES
        for colour in COLOURS
        for size in SIZES
        for background in BACKGROUNDS
    ] + [" ".join(WORDS)]


def sentencepiece_proto(kind: str, vocab_size: int = 96) -> bytes:
    """A SentencePiece model of the demo captions' words: `siglip` (</s> end and pad, <unk>) or `gemma` (<pad> 0,
    <eos> 1, <bos> 2, <unk> 3, as Gemma's tokenizer needs)."""
    import sentencepiece

    special = {
        "siglip": dict(pad_id=-1, eos_id=1, unk_id=0, bos_id=-1, unk_piece="<unk>", eos_piece="</s>"),
        "gemma": dict(
            pad_id=0,
            eos_id=1,
            bos_id=2,
            unk_id=3,
            pad_piece="<pad>",
            eos_piece="<eos>",
            bos_piece="<bos>",
            unk_piece="<unk>",
        ),
    }[kind]
    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()),
        model_writer=buffer,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        minloglevel=2,
        character_coverage=1.0,
        **special,
    )
    return buffer.getvalue()


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """A byte-pair vocabulary: every printable character alone and word-final, whole demo words through merges,
    and `<|endoftext|>` with the largest id (CLIP pools text at the argmax of the token ids)."""
    tokens = [*string.ascii_lowercase, *string.digits, *string.punctuation]
    vocabulary = {}
    for token in [*tokens, *(f"{t}</w>" for t in tokens)]:
        vocabulary.setdefault(token, len(vocabulary))
    merges = []
    for word in WORDS:  # merge left to right: "r e", "re d</w>" ...
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocabulary.setdefault(pieces[0], len(vocabulary))
    merges = list(dict.fromkeys(merges))
    vocabulary["<|startoftext|>"] = len(vocabulary)
    vocabulary["<|endoftext|>"] = len(vocabulary)
    return vocabulary, merges


def make_siglip_preset(
    directory: str,
    tokenizer: str = "siglip",
    image_size: int = 48,
    width: int = 32,
    text_length: int = 16,
    seed: int = 0,
) -> str:
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    proto = sentencepiece_proto(tokenizer)
    text_tokenizer = (
        keras_hub.tokenizers.SigLIPTokenizer(proto=proto)
        if tokenizer == "siglip"
        else keras_hub.tokenizers.GemmaTokenizer(proto=proto)
    )
    converter = keras_hub.layers.SigLIPImageConverter(
        image_size=(image_size, image_size),
        scale=1 / 127.5,
        offset=-1.0,
        crop_to_aspect_ratio=False,
        interpolation="bilinear",
    )
    preprocessor = keras_hub.models.SigLIPPreprocessor(
        tokenizer=text_tokenizer, image_converter=converter, sequence_length=text_length
    )
    vision = keras_hub.models.SigLIPVisionEncoder(
        patch_size=8,
        hidden_dim=width,
        num_layers=1,
        num_heads=2,
        intermediate_dim=2 * width,
        image_shape=(image_size, image_size, 3),
    )
    text = keras_hub.models.SigLIPTextEncoder(
        vocabulary_size=text_tokenizer.vocabulary_size(),
        embedding_dim=width,
        hidden_dim=width,
        num_layers=1,
        num_heads=2,
        intermediate_dim=2 * width,
        projection_dim=width,
        max_sequence_length=text_length,
    )
    backbone = keras_hub.models.SigLIPBackbone(vision, text)
    backbone.siglip_head.logit_scale.assign(2.3)  # t = exp(2.3) ≈ 10, bias −3: not the initial values
    backbone.siglip_head.logit_bias.assign(-3.0)
    backbone.save_to_preset(directory)
    preprocessor.save_to_preset(directory)
    return directory


def make_clip_preset(
    directory: str, image_size: int = 48, width: int = 32, text_length: int = 16, seed: int = 0
) -> str:
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    vocabulary, merges = clip_vocabulary()
    text_tokenizer = keras_hub.tokenizers.CLIPTokenizer(vocabulary=vocabulary, merges=merges)
    converter = keras_hub.layers.CLIPImageConverter(
        image_size=(image_size, image_size),
        scale=[1 / (255 * s) for s in (0.26862954, 0.26130258, 0.27577711)],
        offset=[-m / s for m, s in zip((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))],
        crop_to_aspect_ratio=True,
        interpolation="bicubic",
    )
    preprocessor = keras_hub.models.CLIPPreprocessor(
        tokenizer=text_tokenizer, image_converter=converter, sequence_length=text_length
    )
    vision = keras_hub.models.CLIPVisionEncoder(
        patch_size=8,
        hidden_dim=width,
        num_layers=1,
        num_heads=2,
        intermediate_dim=2 * width,
        image_shape=(image_size, image_size, 3),
    )
    text = keras_hub.models.CLIPTextEncoder(
        vocabulary_size=len(vocabulary),
        embedding_dim=width,
        hidden_dim=width,
        num_layers=1,
        num_heads=2,
        intermediate_dim=2 * width,
        max_sequence_length=text_length,
    )
    backbone = keras_hub.models.CLIPBackbone(vision, text, projection_dim=width)
    backbone.save_to_preset(directory)
    preprocessor.save_to_preset(directory)
    return directory
