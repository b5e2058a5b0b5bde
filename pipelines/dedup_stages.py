"""The dedup job's transforms (`pipelines/dedup.py`) and the pure functions beneath them.

    ReadScoredFiles → ExactGroups → NearPairs (LSH buckets of the representatives) → Components ─┐
          │               └────────── byte copies follow their representative ──────────→ CopiesFollow
          ├──→ EvalLeaks (evaluation images as a side input)                                      │
          └────────────────────────────────────── Verdicts (a row per scored row) ←──────────────┘
                                                               └→ WriteDedupFiles → WriteDedupManifest

Nothing compares all pairs: candidates share an exact content hash, or one of `bands` random-hyperplane hashes of
`band_bits` bits of their reference image embeddings (SimHash, banded), and a candidate pair is a near-duplicate when
its embedding cosine is at least the threshold. Groups are the connected components of those pairs among the exact
groups' representatives, found by `rounds` of min-label propagation (a shuffle each), their representative the
smallest id (`dedup_output`); byte copies then join their representative's group, whether or not the propagation
settled.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any, Iterable, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from curation.shared import dedup_output as out
from curation.shared import schema
from curation.shared.batches import write_atomically
from curation.shared.manifest import PARQUET_COMPRESSION
from curation.shared.scored_set import read_scored_parquet


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of a scored file, as the job needs it."""

    id: int
    key: str
    sha: str | None  # None: a sidecar's dead-lettered row (no embedding either)
    embedding: np.ndarray | None  # [d] float32, L2-normalized (from the stored float16)


@dataclasses.dataclass(frozen=True)
class Settings:
    near_threshold: float  # embedding cosine at or above which two images are near-duplicates
    leak_threshold: float  # ... at or above which a web image is a copy of an evaluation image
    bands: int
    band_bits: int
    rounds: int
    seed: int

    def hyperplanes(self, width: int) -> np.ndarray:
        """[bands * band_bits, width] the random hyperplanes of the SimHash bands (the same on every worker)."""
        return np.random.default_rng(self.seed).standard_normal((self.bands * self.band_bits, width)).astype(np.float32)


def read_rows(element: tuple[int, str]) -> Iterator[Row]:
    """The rows of one scored file (a scored Parquet shard or a score sidecar), in order."""
    file_index, path = element
    table = read_scored_parquet(path, [schema.KEY, schema.IMAGE_SHA256, schema.REF_IMAGE_EMBEDDING])
    keys = table.column(schema.KEY).to_pylist()
    shas = table.column(schema.IMAGE_SHA256).to_pylist()
    matrix, present = schema.sidecar_embeddings(table, schema.REF_IMAGE_EMBEDDING)
    matrix = matrix.astype(np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    for row, key in enumerate(keys):
        embedded = bool(present[row])
        yield Row(
            out.example_id(file_index, row), key, shas[row] if embedded else None, matrix[row] if embedded else None
        )


class BandsFn(beam.DoFn):
    """A row -> ((band, code), (id, embedding)) for each of its SimHash bands; the hyperplanes are drawn on the
    worker, from the seed."""

    def __init__(self, settings: "Settings", width: int):
        self._settings, self._width = settings, width

    def setup(self) -> None:
        self._planes = self._settings.hyperplanes(self._width)

    def process(self, row: "Row") -> Iterator[tuple[tuple[int, int], tuple[int, np.ndarray]]]:
        for band in band_keys(row.embedding, self._planes, self._settings.bands, self._settings.band_bits):
            yield band, (row.id, row.embedding)


def band_keys(embedding: np.ndarray, planes: np.ndarray, bands: int, band_bits: int) -> list[tuple[int, int]]:
    """(band, code) of each SimHash band of a unit embedding: code packs the signs of its `band_bits` hyperplanes."""
    bits = (planes @ embedding > 0).reshape(bands, band_bits)
    weights = 1 << np.arange(band_bits, dtype=np.int64)
    return [(band, int(code)) for band, code in enumerate(bits.astype(np.int64) @ weights)]


def near_pairs(members: Iterable[tuple[int, np.ndarray]], threshold: float) -> Iterator[tuple[int, int]]:
    """(smaller id, larger id) of every pair in one bucket whose embedding cosine is at least `threshold`."""
    members = sorted(members, key=lambda member: member[0])
    if len(members) < 2:
        return
    ids = np.array([member[0] for member in members], np.int64)
    matrix = np.stack([member[1] for member in members])
    similar = np.triu(matrix @ matrix.T >= threshold, k=1)
    for i, j in zip(*np.nonzero(similar)):
        yield int(ids[i]), int(ids[j])


def exact_group(element: tuple[str, Iterable[Row]]) -> Iterator[tuple[str, Any]]:
    """Rows of one content hash: the smallest id represents them ("representative", its Row, for the near
    stage) and each other gets an edge to it ("edge", (id, representative)) and is marked a copy ("copy", id)."""
    _, rows = element
    rows = sorted(rows, key=lambda row: row.id)
    yield "representative", rows[0]
    for row in rows[1:]:
        yield "edge", (rows[0].id, row.id)
        yield "copy", row.id


def propagate(element: tuple[int, dict[str, list]]) -> Iterator[tuple[int, int]]:
    """One round of min-label propagation: a node's label goes to itself and to each neighbour."""
    node, joined = element
    label = min(joined["label"])
    yield node, label
    for neighbour in joined["neighbours"]:
        yield neighbour, label


def evaluation_images(rows: list[tuple[str, Row]]) -> dict[str, Any]:
    """(the name of its scored output, row) of every evaluation image -> what each worker holds of them: "keys"
    ("OUTPUT:key"), "shas" (content hash -> the first key with it) and "matrix" ([n, d] unit embeddings)."""
    rows = sorted(
        ((f"{output}:{row.key}", row) for output, row in rows if row.embedding is not None), key=lambda x: x[0]
    )
    shas = {}
    for name, row in rows:
        if row.sha is not None:
            shas.setdefault(row.sha, name)
    matrix = np.stack([row.embedding for _, row in rows]) if rows else np.zeros([0, 1], np.float32)
    return {"keys": [name for name, _ in rows], "shas": shas, "matrix": matrix}


def exact_key(row: Row) -> str:
    """What exact duplicates share: the content hash (a row copied from a batch that recorded none is its own)."""
    return row.sha if row.sha is not None else f"id:{row.id}"


def with_copies(element: tuple[int, dict[str, list]]) -> Iterator[tuple[int, int]]:
    """The labels of one exact group's representative (its near-duplicate component's, or its own) and of its byte
    copies, which follow it: a copy is always in its representative's group, however the components came out."""
    representative, joined = element
    label = min(joined["label"]) if joined["label"] else representative
    yield representative, label
    for copy in joined["copies"]:
        yield copy, label


def eval_leak(row: Row, evaluation: dict[str, Any], threshold: float) -> Iterator[tuple[int, tuple[str, float]]]:
    """(id, (evaluation key, similarity)) when `row` is a byte copy of an evaluation image or its nearest evaluation
    image is at least `threshold` similar; nothing otherwise. `evaluation`: `evaluation_images`."""
    if row.embedding is None:
        return
    copied = evaluation["shas"].get(row.sha) if row.sha is not None else None
    if copied is not None:
        yield row.id, (copied, 1.0)
        return
    if not evaluation["keys"]:
        return
    similarity = evaluation["matrix"] @ row.embedding
    nearest = int(np.argmax(similarity))
    if similarity[nearest] >= threshold:
        yield row.id, (evaluation["keys"][nearest], float(similarity[nearest]))


def verdict(element: tuple[int, dict[str, list]]) -> tuple[int, dict[str, Any]]:
    """(file index, the dedup row of one scored row, with its row number and whether it is in a group)."""
    example, joined = element
    key = joined["row"][0]
    group = min(joined["label"]) if joined["label"] else example
    leak = joined["leak"][0] if joined["leak"] else None
    reason = None
    if group != example:
        reason = out.EXACT if joined["copy"] else out.NEAR
    if leak is not None:
        reason = out.LEAK
    file_index, row = out.split_id(example)
    return file_index, {
        "row": row,
        "grouped": bool(joined["label"]),
        out.KEY: key,
        out.GROUP: group,
        out.KEPT: reason is None,
        out.REASON: reason,
        out.EVAL_KEY: leak[0] if leak else None,
        out.EVAL_SIMILARITY: leak[1] if leak else None,
    }


class Components(beam.PTransform):
    """Edges (id, id) -> (id, the smallest id of its connected component) for every id on an edge, by `rounds`
    rounds of min-label propagation, and a one-element PCollection: how many labels one more round would still
    change (0: settled)."""

    def __init__(self, rounds: int):
        super().__init__()
        self._rounds = rounds

    def expand(self, edges):
        both = (
            edges | "BothWays" >> beam.FlatMap(lambda edge: [edge, (edge[1], edge[0])]) | "Distinct" >> beam.Distinct()
        )
        labels = both | "Nodes" >> beam.Map(lambda edge: (edge[0], edge[0])) | "Start" >> beam.Distinct()
        previous = labels
        for round_number in range(self._rounds + 1):  # the last round only tells whether the labels had settled
            previous = labels
            labels = (
                {"label": labels, "neighbours": both}
                | f"Join{round_number}" >> beam.CoGroupByKey()
                | f"Propagate{round_number}" >> beam.FlatMap(propagate)
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
            "groups": sum(
                1 for row in rows if row["grouped"] and row[out.GROUP] == out.example_id(file_index, row["row"])
            ),
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
