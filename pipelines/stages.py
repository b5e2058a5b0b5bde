"""The scoring job's stages, one named transform each, on one dead-letter pattern.

    DecodeAndValidate → Preprocess → EmbedWithReference → Score

A fallible stage applies a plain function to each element: what it returns continues on the main output, and a
`CorpusError` (stage, reason, message) goes to the tagged `dead_letter` output and counts under its reason in the
"score" metrics namespace. The rules themselves are shared with the trainer (`curation/shared/validation.py`,
`models/losses.py`); these transforms only wire them into Beam.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
from typing import Any, Callable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference
from apache_beam.pvalue import AsSingleton, TaggedOutput

from curation.shared import errors, schema, thumbnails
from curation.shared.corpus import CorpusRecord
from curation.shared.errors import CorpusError
from curation.shared.validation import ValidationOptions, ValidExample, decode_and_validate, encode_jpeg
from models.losses import own_pair_sigmoid
from models.preprocessing import ImagePreprocessing
from pipelines.corpus_io import in_global_window
from pipelines.jax_inference import DualEncoderHandler, PreparedExample, ReferenceEmbeddings
from pipelines.progress import worker_progress
from pipelines.references import LossParameters, Reference

NAMESPACE = "score"
DEAD_LETTER = "dead_letter"
STORE_IMAGE = ("as_stored", "resized", "none")


def _error_of(element: Any) -> CorpusError | None:
    """The CorpusError an element is or carries ((key, error), or (key, PredictionResult of one)), else None."""
    if isinstance(element, tuple) and len(element) == 2:
        element = element[1]
        element = getattr(element, "example", element)
    return element if isinstance(element, CorpusError) else None


class _OrDeadLetter(beam.DoFn):
    """`fn(element)` on the main output, or, when it is a CorpusError, on the dead letter with a counter. Inline,
    errors stay on the main output, in their place, and an element that already is one passes through."""

    def __init__(self, fn: Callable[[Any], Any], inline: bool = False, progress: str = ""):
        self._fn, self._inline, self._progress_name = fn, inline, progress

    def setup(self) -> None:
        self._progress = worker_progress()

    def process(self, element, **side_inputs) -> Iterator[Any]:
        if self._inline:
            earlier = _error_of(element)
            if earlier is not None:
                yield earlier
                return
        yield from self._emit(self._fn(element, **side_inputs))

    def _emit(self, result) -> Iterator[Any]:
        if isinstance(result, CorpusError):
            Metrics.counter(NAMESPACE, f"dead_letter_{result.reason}").inc()
            yield result if self._inline else TaggedOutput(DEAD_LETTER, result)
        else:
            if self._progress_name:
                self._progress.add(self._progress_name)
            yield result


class _Fallible(beam.PTransform):
    """Elements -> `fn`'s results (main) | CorpusErrors (tagged `dead_letter`); unpacks as `main, dead_letter`.
    `side_inputs` (name -> Beam side input) reach `fn` as keyword arguments. With `errors_inline`, errors stay in
    the main output in their place (the dead letter is empty): a score sidecar holds a row for every record, and a
    Beam Flatten of two outputs would end the fused stage, so that no sidecar could be written before every
    record of the job is scored."""

    def __init__(
        self, step: str, fn: Callable[..., Any], errors_inline: bool = False, progress: str = "", **side_inputs
    ):
        super().__init__()
        self._step, self._fn, self._inline, self._side_inputs = step, fn, errors_inline, side_inputs
        self._progress = progress  # the progress tally (pipelines/progress.py) its results count under

    def expand(self, elements):
        return elements | self._step >> beam.ParDo(
            _OrDeadLetter(self._fn, self._inline, self._progress), **self._side_inputs
        ).with_outputs(DEAD_LETTER, main="main")


def decode_for_model(
    record: CorpusRecord, options: ValidationOptions, preprocessing: ImagePreprocessing | None, size: int
) -> ValidExample | CorpusError:
    """`decode_and_validate` (JPEGs decoded at `size`, see `decode_image`), and the pixels resized as
    `preprocessing` declares (ValidExample.model_pixels) when it is given."""
    example = decode_and_validate(record, options, size)
    if preprocessing is None or isinstance(example, CorpusError):
        return example
    return dataclasses.replace(example, model_pixels=preprocessing.resize_pixels(example.pixels))


class _DecodeAheadFn(_OrDeadLetter):
    """`_OrDeadLetter` whose function runs on a thread pool, up to `depth` elements ahead of what it emits, in the
    order the elements came. PIL decodes and resizes without the Python lock, so the pool works while this thread
    runs the stages downstream (the model's forward among them): decoding overlaps the forward instead of
    adding to it. Counters are counted and outputs emitted on the bundle's own thread."""

    def __init__(self, fn: Callable[[Any], Any], inline: bool, workers: int, depth: int):
        super().__init__(fn, inline)
        self._workers, self._depth = workers, depth

    def setup(self) -> None:
        super().setup()
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="decode")

    def teardown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def start_bundle(self) -> None:
        self._pending: collections.deque = collections.deque()

    def process(self, element) -> Iterator[Any]:
        earlier = _error_of(element) if self._inline else None
        if earlier is not None:
            future = concurrent.futures.Future()
            future.set_result(earlier)
        else:
            future = self._pool.submit(self._fn, element)
        self._pending.append(future)
        while self._pending and (len(self._pending) > self._depth or self._pending[0].done()):
            yield from self._emit(self._pending.popleft().result())

    def finish_bundle(self) -> Iterator[Any]:
        while self._pending:
            yield from in_global_window(self._emit(self._pending.popleft().result()))


class DecodeAndValidate(_Fallible):
    """CorpusRecord -> ValidExample (main) | CorpusError of stage caption or decode (tagged `dead_letter`).

    Decoding runs on `workers` threads, up to `depth` records ahead (`_DecodeAheadFn`), JPEGs at `size` (0: as
    stored); with `preprocessing` (the reference's), the pixels are resized for the model there too."""

    def __init__(
        self,
        options: ValidationOptions,
        errors_inline: bool = False,
        *,
        size: int = 0,
        preprocessing: ImagePreprocessing | None = None,
        workers: int = 2,
        depth: int = 512,
    ):
        super().__init__(
            "Validate",
            functools.partial(decode_for_model, options=options, preprocessing=preprocessing, size=size),
            errors_inline,
        )
        self._workers, self._depth = workers, depth

    def expand(self, elements):
        return elements | self._step >> beam.ParDo(
            _DecodeAheadFn(self._fn, self._inline, self._workers, self._depth)
        ).with_outputs(DEAD_LETTER, main="main")


class _PreprocessFn(beam.DoFn):
    def __init__(self, reference: Reference, store_image: str, stored_image_size: int):
        self._reference, self._image = reference, reference.info.preprocessing
        self._store_image, self._stored_image_size = store_image, stored_image_size

    def setup(self) -> None:
        self._text = self._reference.text_encoder()

    def process(self, example: ValidExample | CorpusError) -> Iterator[tuple[str, PreparedExample | CorpusError]]:
        if isinstance(example, CorpusError):  # errors inline (score sidecars): on through the model untouched
            yield example.key, example
            return
        if self._store_image == "as_stored":
            image = example.image
        elif self._store_image == "resized":
            image = encode_jpeg(example.pixels, self._stored_image_size)
        else:
            image = b""
        pixels = example.model_pixels if example.model_pixels is not None else self._image.resize_pixels(example.pixels)
        yield (
            example.key,
            PreparedExample(
                example.key,
                example.source,
                example.caption,
                image,
                pixels,
                self._text.encode(example.caption),
                example.metadata,
                example.index,
                example.shard_items,
                hashlib.sha256(example.image).hexdigest(),
                thumbnails.to_bytes(thumbnails.make_thumbnail(example.pixels)),
            ),
        )


class Preprocess(beam.PTransform):
    """ValidExample -> (key, PreparedExample): pixels as the reference declares them, its token ids, and the image
    bytes to store. The reference's text encoder is made once per worker (its tokenizer files, never its weights)."""

    def __init__(self, reference: Reference, store_image: str, stored_image_size: int):
        super().__init__()
        self._fn = _PreprocessFn(reference, store_image, stored_image_size)

    def expand(self, valid):
        return valid | "ResizeAndTokenize" >> beam.ParDo(self._fn)


class _ReadLossParameters(beam.DoFn):
    def __init__(self, reference: Reference):
        self._reference = reference

    def process(self, _) -> Iterator[LossParameters]:
        yield self._reference.load(batch_size=1).loss_parameters()


class ReadLossParameters(beam.PTransform):
    """One element, the reference's t and bias: from its metadata when the launcher knows them (our checkpoints),
    else from its weights, loaded on a worker (a preset's are in its weights file, which the launcher never
    fetches)."""

    def __init__(self, reference: Reference):
        super().__init__()
        self._reference = reference

    def expand(self, pipeline):
        info = self._reference.info
        if np.isfinite(info.temperature) and np.isfinite(info.bias):
            return pipeline | "FromMetadata" >> beam.Create([LossParameters(info.temperature, info.bias)])
        return (
            pipeline | "Once" >> beam.Create([None]) | "FromWeights" >> beam.ParDo(_ReadLossParameters(self._reference))
        )


class EmbedWithReference(beam.PTransform):
    """(key, PreparedExample) -> (key, PredictionResult(example, ReferenceEmbeddings)) through Beam's RunInference."""

    def __init__(self, handler: DualEncoderHandler):
        super().__init__()
        self._handler = handler

    def expand(self, prepared):
        return prepared | "RunInference" >> RunInference(KeyedModelHandler(self._handler))


def score_row(
    example: PreparedExample, embeddings: ReferenceEmbeddings, loss: str, parameters: LossParameters
) -> dict[str, Any]:
    """A scored-shard row. Cosine, logit and loss are computed from the stored float16 embeddings, so a reader
    recomputing them from the shard gets the stored values. A softmax (CLIP) reference has no per-example own-pair
    loss: its logit is t·cosine and its `ref_loss` is null."""
    with np.errstate(over="ignore", invalid="ignore"):  # a non-finite result is caught by score_or_dead_letter
        zimg = embeddings.image.astype(np.float16)
        ztxt = embeddings.text.astype(np.float16)
        bias = parameters.bias if loss == "sigmoid" else 0.0
        cosine, logit, own_loss = own_pair_sigmoid(
            zimg.astype(np.float32),
            ztxt.astype(np.float32),
            np.float32(parameters.temperature),
            np.float32(bias),
            xp=np,
        )
    return {
        schema.KEY: example.key,
        schema.CAPTION: example.caption,
        schema.IMAGE: example.image,
        schema.IMAGE_SHA256: example.image_sha256,
        schema.IMAGE_THUMBNAIL: example.image_thumbnail,
        schema.SOURCE: example.source,
        schema.METADATA: json.dumps(example.metadata, sort_keys=True, default=str),
        schema.REF_IMAGE_EMBEDDING: zimg,
        schema.REF_TEXT_EMBEDDING: ztxt,
        schema.REF_COSINE: float(cosine),
        schema.REF_LOGIT: float(logit),
        schema.REF_LOSS: float(own_loss) if loss == "sigmoid" else None,
    }


def score_or_dead_letter(
    element: tuple[str, Any], loss: str, parameters: LossParameters
) -> dict[str, Any] | CorpusError:
    """(key, PredictionResult) -> the scored row, or a CorpusError (stage embed) when an embedding or score is NaN
    or infinite: a row like that would poison every loss the trainer computes from it."""
    _, result = element
    example = result.example
    row = score_row(example, result.inference, loss, parameters)
    bad = [
        name
        for name in (*schema.EMBEDDINGS, *schema.SCORES)
        if row[name] is not None and not np.isfinite(row[name]).all()
    ]
    if not bad:
        return row
    return CorpusError(
        key=example.key,
        source=example.source,
        reason=errors.NON_FINITE_EMBEDDING,
        stage=errors.EMBED,
        message=f"not finite: {', '.join(bad)}",
        index=example.index,
        shard_items=example.shard_items,
    )


@dataclasses.dataclass(frozen=True)
class Placed:
    """A scored row (or a CorpusError) with its place in its input shard: what a score sidecar is made of."""

    source: str
    index: int
    shard_items: int
    row: dict[str, Any] | CorpusError


def placed(element: Any) -> Placed:
    """A sidecar-bound element (a scored Placed row, or a CorpusError kept inline) as a Placed."""
    if isinstance(element, Placed):
        return element
    if isinstance(element, CorpusError):
        return Placed(element.source, element.index, element.shard_items, element)
    raise TypeError(f"not a scored row or dead-lettered item: {type(element).__name__}")


def score_in_place(element: tuple[str, Any], loss: str, parameters: LossParameters) -> Placed | CorpusError:
    """`score_or_dead_letter`, the scored row with its place in its shard (sidecar layout)."""
    result = score_or_dead_letter(element, loss, parameters)
    if isinstance(result, CorpusError):
        return result
    example = element[1].example
    return Placed(example.source, example.index, example.shard_items, result)


class Score(_Fallible):
    """(key, PredictionResult) -> scored rows (main) | CorpusError of stage embed (tagged `dead_letter`), under the
    reference's loss family and its t and bias (a one-element PCollection, `ReadLossParameters`). With
    `errors_inline` (sidecar layout), one stream of `Placed` rows and CorpusErrors, each knowing its place."""

    def __init__(self, loss: str, parameters, errors_inline: bool = False):
        fn = score_in_place if errors_inline else score_or_dead_letter
        super().__init__(
            "EasyReferenceScore",
            functools.partial(fn, loss=loss),
            errors_inline,
            progress="scored",
            parameters=AsSingleton(parameters),
        )
