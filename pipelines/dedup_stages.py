"""The dedup job's transforms (`pipelines/dedup.py`) and the pure functions beneath them.

    ReadScoredFiles → ExactGroups → NearPairs (LSH buckets of the representatives) → Components ─┐
          │               └────────── byte copies follow their representative ──────────→ CopiesFollow
          ├──→ EvalLeaks (evaluation images as a side input)                                      │
          └────────────────────────────────────── Verdicts (a row per scored row) ←──────────────┘
                                                               └→ WriteDedupFiles → WriteDedupManifest

Nothing compares all pairs: candidates share an exact content hash, or one of `bands` random-hyperplane hashes of
`band_bits` bits of their thumbnails' candidate vectors (SimHash, banded; `pipelines/pixel_match.py`), and a
candidate pair whose candidate vectors are close is a near-duplicate when its pixel similarity (the windowed
correlation of the thumbnails) is at least the threshold. An image of one colour has no pattern to compare: it is
grouped only with its byte copies. Groups are the connected components of those pairs among the exact
groups' representatives, found by `rounds` of min-label propagation (a shuffle each), their representative the
smallest id (`dedup_output`); byte copies then join their representative's group, whether or not the propagation
settled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import posixpath
from typing import Any, Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from curation.shared import dedup_output as out
from curation.shared import schema, thumbnails
from curation.shared.batches import write_atomically
from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import read_shard
from curation.shared.manifest import PARQUET_COMPRESSION
from curation.shared.scored_set import read_scored_parquet
from curation.shared.thumbnails import SIZE
from curation.shared.validation import ValidationOptions, decode_image
from pipelines import pixel_match


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a scored file, as the job needs it."""

    id: int
    key: str
    sha: str | None  # None: a sidecar's dead-lettered row (no thumbnail either)
    thumbnail: np.ndarray | None  # [16, 16, 3] uint8 (`curation/shared/thumbnails.py`)


@dataclasses.dataclass(frozen=True)
class Settings:
    near_threshold: float  # pixel similarity at or above which two images are near-duplicates
    leak_threshold: float  # ... at or above which a web image is a copy of an evaluation image
    bands: int
    band_bits: int
    rounds: int
    seed: int

    def hyperplanes(self, width: int) -> np.ndarray:
        """[bands * band_bits, width] the random hyperplanes of the SimHash bands (the same on every worker)."""
        return np.random.default_rng(self.seed).standard_normal((self.bands * self.band_bits, width)).astype(np.float32)


CANDIDATE_WIDTH = len(pixel_match.candidate_vector(np.zeros((SIZE, SIZE, 3), np.uint8)))


def read_rows(element: tuple[int, str]) -> Iterator[Row]:
    """The rows of one scored file (a scored Parquet shard or a score sidecar), in order."""
    file_index, path = element
    table = read_scored_parquet(path, [schema.KEY, schema.IMAGE_SHA256, schema.IMAGE_THUMBNAIL])
    keys = table.column(schema.KEY).to_pylist()
    shas = table.column(schema.IMAGE_SHA256).to_pylist()
    pixels = table.column(schema.IMAGE_THUMBNAIL).to_pylist()
    for row, key in enumerate(keys):
        scored = pixels[row] is not None
        yield Row(
            out.example_id(file_index, row),
            key,
            shas[row] if scored else None,
            thumbnails.from_bytes(pixels[row]) if scored else None,
        )


class BandsFn(beam.DoFn):
    """A row -> ((band, code), (id, thumbnail, every band's code)) for each SimHash band of its candidate vector
    (nothing for an image of one colour); the hyperplanes are drawn on the worker, from the seed."""

    def __init__(self, settings: "Settings"):
        self._settings = settings

    def setup(self) -> None:
        self._planes = self._settings.hyperplanes(CANDIDATE_WIDTH)

    def process(self, row: "Row") -> Iterator[tuple[tuple[int, int], tuple[int, np.ndarray, tuple[int, ...]]]]:
        vector = pixel_match.candidate_vector(row.thumbnail)
        if not vector.any():
            return
        bands = band_keys(vector, self._planes, self._settings.bands, self._settings.band_bits)
        codes = tuple(code for _, code in bands)
        for band in bands:
            yield band, (row.id, row.thumbnail, codes)


def band_keys(vector: np.ndarray, planes: np.ndarray, bands: int, band_bits: int) -> list[tuple[int, int]]:
    """(band, code) of each SimHash band of a unit vector: code packs the signs of its `band_bits` hyperplanes."""
    bits = (planes @ vector > 0).reshape(bands, band_bits)
    weights = 1 << np.arange(band_bits, dtype=np.int64)
    return [(band, int(code)) for band, code in enumerate(bits.astype(np.int64) @ weights)]


def near_pairs(
    band: int, members: Iterable[tuple[int, np.ndarray, tuple[int, ...]]], threshold: float, old_below: int = 0
) -> Iterator[tuple[int, int]]:
    """(smaller id, larger id) pairs in one bucket of `band` whose candidate vectors are at least
    `pixel_match.CANDIDATE_COSINE` close and whose pixel similarity is at least `threshold`: enough of them to
    connect what all such pairs connect. A pair two rows already joined by pairs found here is not compared, so a
    bucket of k copies of one image costs about k comparisons, not k². A pair that shares an earlier band too is
    judged in that band's bucket, not here. Two rows whose ids are both below `old_below` (an earlier dedup
    output's, with --incremental_from) are not compared: their verdicts stand; a pair with one of them is always
    compared (an earlier row joins no one to anyone else)."""
    members = sorted(members, key=lambda member: member[0])
    if len(members) < 2:
        return
    ids = np.array([member[0] for member in members], np.int64)
    stack = np.stack([member[1] for member in members])
    codes = np.array([member[2][:band] for member in members], np.int64).reshape(len(members), band)
    vectors = np.stack([pixel_match.candidate_vector(t) for t in stack])
    close = vectors @ vectors.T >= pixel_match.CANDIDATE_COSINE
    close &= ~(codes[:, None, :] == codes[None, :, :]).any(axis=2)
    old = ids < old_below
    close &= ~(old[:, None] & old[None, :])
    np.fill_diagonal(close, False)
    joined = np.arange(len(members))  # each row's component among the new rows, by the pairs found so far
    pending: list[list[int]] = [[] for _ in members]  # pending[j]: rows before j whose windows did not match j's
    for i in np.nonzero(close.any(axis=1))[0].tolist():  # a row without a close partner has nothing to judge
        # i's windows judge its later partners, and the earlier ones whose windows did not match it (the similarity
        # is the better of the two directions); each row's windows are made once
        others = np.concatenate([np.asarray(pending[i], np.int64), np.nonzero(close[i, i + 1 :])[0] + i + 1])
        others = others[old[i] | old[others] | (joined[others] != joined[i])]
        if not len(others):
            continue
        for j, score in zip(others.tolist(), pixel_match.best_matches(stack[i], stack[others]).tolist()):
            if score >= threshold:
                yield int(ids[min(i, j)]), int(ids[max(i, j)])
                if not (old[i] or old[j]):
                    joined[joined == joined[j]] = joined[i]
            elif j > i:
                pending[j].append(i)


def read_old_verdicts(element: tuple[int, str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(id, dedup row) of each row of one dedup file of an earlier output (--incremental_from), its file index
    unchanged."""
    file_index, path = element
    for row, values in enumerate(out.read_dedup_file(path).to_pylist()):
        yield out.example_id(file_index, row), values


def read_evaluation_shard(path: str, reader: dict[str, Any]) -> Iterator[tuple[str, Row]]:
    """(the shard's path, row) of each image of an evaluation corpus shard that decodes (`reader`:
    `corpus_io.reader_options`): its content hash and thumbnail, made as the scoring job makes them."""
    for record in read_shard(path, reader["format"], reader["fields"], batch_rows=reader["batch_rows"]):
        if not isinstance(record, CorpusRecord):
            continue
        pixels = decode_image(record.image, ValidationOptions())
        if isinstance(pixels, tuple):  # (reason, message): not an image this job can compare
            continue
        sha = hashlib.sha256(record.image).hexdigest()
        yield path, Row(0, record.key, sha, thumbnails.make_thumbnail(pixels))


def exact_group(element: tuple[str, Iterable[Row]]) -> Iterator[tuple[str, Any]]:
    """Rows of one content hash: the smallest id represents them ("representative", its Row, for the near
    stage) and each other gets an edge to it ("edge", (id, representative)) and is marked a copy ("copy", id)."""
    _, rows = element
    rows = sorted(rows, key=lambda row: row.id)
    yield "representative", rows[0]
    for row in rows[1:]:
        yield "edge", (rows[0].id, row.id)
        yield "copy", row.id


def propagate(element: tuple[int, dict[str, list]], old_below: int = 0) -> Iterator[tuple[int, int]]:
    """One round of min-label propagation: a node's label goes to itself and to each neighbour, except to a
    neighbour below `old_below`, whose label is pinned (an earlier dedup output's group, with --incremental_from)."""
    node, joined = element
    label = min(joined["label"])
    yield node, label
    for neighbour in joined["neighbours"]:
        if neighbour >= old_below:
            yield neighbour, label


def evaluation_images(rows: list[tuple[str, Row]]) -> dict[str, Any]:
    """(where it came from: its scored output or its corpus shard, row) of every evaluation image -> what each
    worker holds of them: "keys" ("WHERE:key"), "shas" (content hash -> the first key with it), "thumbnails"
    ([n, 16, 16, 3]) and "vectors" ([n, w] candidate vectors)."""
    rows = sorted(
        ((f"{output}:{row.key}", row) for output, row in rows if row.thumbnail is not None), key=lambda x: x[0]
    )
    shas = {}
    for name, row in rows:
        if row.sha is not None:
            shas.setdefault(row.sha, name)
    stack = np.stack([row.thumbnail for _, row in rows]) if rows else np.zeros([0, SIZE, SIZE, 3], np.uint8)
    vectors = np.stack([pixel_match.candidate_vector(t) for t in stack]) if rows else np.zeros([0, CANDIDATE_WIDTH])
    return {"keys": [name for name, _ in rows], "shas": shas, "thumbnails": stack, "vectors": vectors}


def exact_key(row: Row) -> str:
    """What exact duplicates share: the content hash (a row copied from a batch that recorded none is its own)."""
    return row.sha if row.sha is not None else f"id:{row.id}"


def touched_group(element: tuple[int, dict[str, list]]) -> Iterator[tuple[int, int]]:
    """(id, its group in the earlier output) for an earlier row on a new edge (--incremental_from)."""
    example, joined = element
    if joined["touched"] and joined["group"]:
        yield example, joined["group"][0]


def with_copies(element: tuple[int, dict[str, list]]) -> Iterator[tuple[int, int]]:
    """The labels of one exact group's representative (its near-duplicate component's, or its own) and of its byte
    copies, which follow it: a copy is always in its representative's group, however the components came out."""
    representative, joined = element
    fixed = joined.get("fixed") or [representative]  # with --incremental_from, an earlier row's group stands
    label = min(joined["label"]) if joined["label"] else fixed[0]
    yield representative, label
    for copy in joined["copies"]:
        yield copy, label


def eval_leak(row: Row, evaluation: dict[str, Any], threshold: float) -> Iterator[tuple[int, tuple[str, float]]]:
    """(id, (evaluation key, similarity)) when `row` is a byte copy of an evaluation image or its nearest evaluation
    image is at least `threshold` similar in its pixels (among those whose candidate vectors are close); nothing
    otherwise. `evaluation`: `evaluation_images`."""
    if row.thumbnail is None:
        return
    copied = evaluation["shas"].get(row.sha) if row.sha is not None else None
    if copied is not None:
        yield row.id, (copied, 1.0)
        return
    vector = pixel_match.candidate_vector(row.thumbnail)
    if not evaluation["keys"] or not vector.any():
        return
    close = np.nonzero(evaluation["vectors"] @ vector >= pixel_match.CANDIDATE_COSINE)[0]
    if not len(close):
        return
    similarity = pixel_match.similarities(row.thumbnail, evaluation["thumbnails"][close])
    nearest = int(np.argmax(similarity))
    if similarity[nearest] >= threshold:
        yield row.id, (evaluation["keys"][close[nearest]], float(similarity[nearest]))


def verdict(element: tuple[int, dict[str, list]]) -> tuple[int, dict[str, Any]]:
    """(file index, the dedup row of one scored row, with its row number); with --incremental_from, a row of the
    earlier output ("old") keeps its verdict there."""
    example, joined = element
    file_index, row = out.split_id(example)
    if joined.get("old"):
        return file_index, {**joined["old"][0], "row": row}
    key = joined["row"][0]
    group = min(joined["label"]) if joined["label"] else example
    leak = joined["leak"][0] if joined["leak"] else None
    reason = None
    if group != example:
        reason = out.EXACT if joined["copy"] else out.NEAR
    if leak is not None:
        reason = out.LEAK
    return file_index, {
        "row": row,
        out.KEY: key,
        out.GROUP: group,
        out.KEPT: reason is None,
        out.REASON: reason,
        out.EVAL_KEY: leak[0] if leak else None,
        out.EVAL_SIMILARITY: leak[1] if leak else None,
    }


def named_group(element: tuple[int, dict[str, Any]]) -> Iterator[int]:
    """The group a dedup row names when it is not its own: each group of two or more is named at least once."""
    file_index, row = element
    if row[out.GROUP] != out.example_id(file_index, row["row"]):
        yield row[out.GROUP]


class Components(beam.PTransform):
    """Edges (id, id) -> (id, the smallest id of its connected component) for every id on an edge, by `rounds`
    rounds of min-label propagation, and a one-element PCollection: how many labels one more round would still
    change (0: settled). With `fixed` ((id, label) of the ids below `old_below` on an edge: their groups in an earlier
    dedup output, with --incremental_from), those ids keep their labels, which spread to the others: a new row joins
    an earlier group, and never merges two."""

    def __init__(self, rounds: int, old_below: int = 0, fixed=None):
        super().__init__()
        self._rounds, self._old_below, self._fixed = rounds, old_below, fixed

    def expand(self, edges):
        both = (
            edges | "BothWays" >> beam.FlatMap(lambda edge: [edge, (edge[1], edge[0])]) | "Distinct" >> beam.Distinct()
        )
        labels = both | "Nodes" >> beam.Map(lambda edge: (edge[0], edge[0])) | "Start" >> beam.Distinct()
        if self._fixed is not None:
            labels = (
                {"node": labels, "fixed": self._fixed}
                | "JoinFixed" >> beam.CoGroupByKey()
                | "Pinned" >> beam.FlatMap(lambda e: [(e[0], (e[1]["fixed"] or [e[0]])[0])] if e[1]["node"] else [])
            )
        previous = labels
        for round_number in range(self._rounds + 1):  # the last round only tells whether the labels had settled
            previous = labels
            labels = (
                {"label": labels, "neighbours": both}
                | f"Join{round_number}" >> beam.CoGroupByKey()
                | f"Propagate{round_number}" >> beam.FlatMap(propagate, self._old_below)
                | f"Min{round_number}" >> beam.CombinePerKey(min)
            )
        changed = (
            {"before": previous, "after": labels}
            | "Compare" >> beam.CoGroupByKey()
            | "Changed" >> beam.Map(lambda element: int(element[1]["before"] != element[1]["after"]))
            | "CountChanged" >> beam.CombineGlobally(sum)
        )
        return labels, changed


class _WriteDedupFileFn(beam.DoFn):
    def __init__(self, folder: str, names: list[str]):
        self._folder, self._names = folder, names
        self._files = Metrics.counter("dedup", "files_written")

    def process(self, element: tuple[int, Iterable[dict]]) -> Iterator[dict[str, Any]]:
        file_index, rows = element
        rows = sorted((row for row in rows if row is not None), key=lambda row: row["row"])
        if [row["row"] for row in rows] != list(range(len(rows))):
            raise RuntimeError(f"rows of {self._names[file_index]} are missing: the job lost some")
        table = pa.Table.from_pylist([{name: row[name] for name, _, _ in out.COLUMNS} for row in rows], out.SCHEMA)
        name = f"dedup-{file_index:05d}.parquet"
        write_atomically(
            posixpath.join(self._folder, name), lambda f: pq.write_table(table, f, compression=PARQUET_COMPRESSION)
        )
        self._files.inc()
        reasons = [row[out.REASON] for row in rows]
        yield {
            "file": out.DedupFile(self._names[file_index], name, len(rows)),
            "removed_exact": reasons.count(out.EXACT),
            "removed_near": reasons.count(out.NEAR),
            "leaks": reasons.count(out.LEAK),
        }


class WriteDedupFiles(beam.PTransform):
    """(file index, dedup rows) -> one Parquet file per scored file, row-aligned, written atomically (an empty
    scored file gets an empty one); emits what it wrote and counted."""

    def __init__(self, folder: str, names: list[str]):
        super().__init__()
        self._fn, self._files = _WriteDedupFileFn(folder, names), len(names)

    def expand(self, verdicts):
        every_file = verdicts.pipeline | "EveryFile" >> beam.Create([(i, None) for i in range(self._files)])
        return (
            (verdicts, every_file)
            | "WithEmptyFiles" >> beam.Flatten()
            | "ByFile" >> beam.GroupByKey()
            | "Write" >> beam.ParDo(self._fn)
        )
