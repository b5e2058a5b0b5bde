"""The scoring job's stages, one named transform each, on one dead-letter pattern.

    DecodeAndValidate → Preprocess → EmbedWithReference → Score

A fallible stage applies a plain function to each element: what it returns continues on the main output, and a
`CorpusError` (stage, reason, message) goes to the tagged `dead_letter` output and counts under its reason in the
"score" metrics namespace. The rules themselves are shared with the trainer (`curation/preprocess.py`,
`curation/losses.py`); these transforms only wire them into Beam.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.pvalue import TaggedOutput

from curation import errors, schema
from curation.errors import CorpusError
from curation.losses import own_pair_sigmoid
from curation.preprocess import ValidationOptions, ValidExample, decode_and_validate, encode_jpeg
from models.preprocessing import ImagePreprocessing
from models.tokenizer import tokenizer_from_dict
from pipelines.jax_inference import DualEncoderHandler, Embeddings, PreparedExample

NAMESPACE = "score"
DEAD_LETTER = "dead_letter"
STORE_IMAGE = ("as_stored", "resized", "none")


class _OrDeadLetter(beam.DoFn):
    """`fn(element)` on the main output, or, when it is a CorpusError, on the dead letter with a counter."""

    def __init__(self, fn: Callable[[Any], Any]):
        self._fn = fn

    def process(self, element) -> Iterator[Any]:
        result = self._fn(element)
        if isinstance(result, CorpusError):
            Metrics.counter(NAMESPACE, f"dead_letter_{result.reason}").inc()
            yield TaggedOutput(DEAD_LETTER, result)
        else:
            yield result


class _Fallible(beam.PTransform):
    """Elements -> `fn`'s results (main) | CorpusErrors (tagged `dead_letter`); unpacks as `main, dead_letter`."""

    def __init__(self, step: str, fn: Callable[[Any], Any]):
        super().__init__()
        self._step, self._fn = step, fn

    def expand(self, elements):
        return elements | self._step >> beam.ParDo(_OrDeadLetter(self._fn)).with_outputs(DEAD_LETTER, main="main")


class DecodeAndValidate(_Fallible):
    """CorpusRecord -> ValidExample (main) | CorpusError of stage caption or decode (tagged `dead_letter`)."""

    def __init__(self, options: ValidationOptions):
        super().__init__("Validate", functools.partial(decode_and_validate, options=options))


class _PreprocessFn(beam.DoFn):
    def __init__(self, tokenizer: dict[str, Any], image: ImagePreprocessing, text_length: int, store_image: str,
                 stored_image_size: int):
        self._tokenizer_state, self._image, self._text_length = tokenizer, image, text_length
        self._store_image, self._stored_image_size = store_image, stored_image_size

    def setup(self) -> None:
        self._tokenizer = tokenizer_from_dict(self._tokenizer_state)

    def process(self, example: ValidExample) -> Iterator[tuple[str, PreparedExample]]:
        if self._store_image == "as_stored":
            image = example.image
        elif self._store_image == "resized":
            image = encode_jpeg(example.pixels, self._stored_image_size)
        else:
            image = b""
        yield example.key, PreparedExample(
            example.key, example.source, example.caption, image, self._image.resize_pixels(example.pixels),
            self._tokenizer.encode(example.caption, self._text_length), example.metadata)


class Preprocess(beam.PTransform):
    """ValidExample -> (key, PreparedExample): pixels as the reference declares them, its token ids, and the image
    bytes to store. Takes the reference's tokenizer state and preprocessing (read from its metadata by the
    launcher), so no worker opens the checkpoint for them."""

    def __init__(self, tokenizer: dict[str, Any], image: ImagePreprocessing, text_length: int, store_image: str,
                 stored_image_size: int):
        super().__init__()
        self._fn = _PreprocessFn(tokenizer, image, text_length, store_image, stored_image_size)

    def expand(self, valid):
        return valid | "ResizeAndTokenize" >> beam.ParDo(self._fn)


class EmbedWithReference(beam.PTransform):
    """(key, PreparedExample) -> (key, PredictionResult(example, Embeddings)) through Beam's RunInference."""

    def __init__(self, handler: DualEncoderHandler):
        super().__init__()
        self._handler = handler

    def expand(self, prepared):
        return prepared | "RunInference" >> RunInference(KeyedModelHandler(self._handler))


def score_row(example: PreparedExample, embeddings: Embeddings, t: float, bias: float) -> dict[str, Any]:
    """A scored-shard row. Cosine, logit and loss are computed from the stored float16 embeddings, so a reader
    recomputing them from the shard gets the stored values."""
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is caught by score_or_dead_letter
        zimg = embeddings.image.astype(np.float16)
        ztxt = embeddings.text.astype(np.float16)
        cosine, logit, loss = own_pair_sigmoid(zimg.astype(np.float32), ztxt.astype(np.float32), np.float32(t),
                                               np.float32(bias), xp=np)
    return {
        schema.KEY: example.key, schema.CAPTION: example.caption, schema.IMAGE: example.image,
        schema.SOURCE: example.source, schema.METADATA: json.dumps(example.metadata, sort_keys=True, default=str),
        schema.REF_IMAGE_EMBEDDING: zimg, schema.REF_TEXT_EMBEDDING: ztxt,
        schema.REF_COSINE: float(cosine), schema.REF_LOGIT: float(logit), schema.REF_LOSS: float(loss),
    }


def score_or_dead_letter(element: tuple[str, Any], t: float, bias: float) -> dict[str, Any] | CorpusError:
    """(key, PredictionResult) -> the scored row, or a CorpusError (stage embed) when an embedding or score is NaN
    or infinite: a row like that would poison every loss the trainer computes from it."""
    _, result = element
    example = result.example
    row = score_row(example, result.inference, t, bias)
    bad = [name for name in (*schema.EMBEDDINGS, *schema.SCORES) if not np.isfinite(row[name]).all()]
    if not bad:
        return row
    return CorpusError(key=example.key, source=example.source, reason=errors.NON_FINITE_EMBEDDING, stage=errors.EMBED,
                       message=f"not finite: {', '.join(bad)}")


class Score(_Fallible):
    """(key, PredictionResult) -> scored rows (main) | CorpusError of stage embed (tagged `dead_letter`)."""

    def __init__(self, t: float, bias: float):
        super().__init__("EasyReferenceScore", functools.partial(score_or_dead_letter, t=t, bias=bias))
