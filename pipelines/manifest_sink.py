"""The scoring job's last step: the batch's manifest, written once every file is final.

It counts what was read, scored and dead-lettered, refuses a batch over --max_bad_fraction or with failed input
shards (unless allowed), and writes `_MANIFEST.json` atomically: the only thing that makes a batch visible to readers.
"""

from __future__ import annotations

import dataclasses
import posixpath
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import AsDict, AsList, AsSingleton

from curation.shared import batches, scored_set
from curation.shared.manifest import (
    DONE,
    FAILED,
    Counts,
    InputShard,
    Manifest,
)
from pipelines.scored_sinks import SidecarWritten


class TooManyBadRecords(RuntimeError):
    """More of the records read were dead-lettered than --max_bad_fraction allows."""


def check_bad_fraction(read: int, dead_lettered: int, max_bad_fraction: float, batch_dir: str = "") -> None:
    """Raise TooManyBadRecords, naming both counts, when dead_lettered / read is over max_bad_fraction."""
    if read and dead_lettered / read > max_bad_fraction:
        raise TooManyBadRecords(
            f"{dead_lettered} of {read} records read were dead-lettered ({dead_lettered / read:.1%}), over "
            f"--max_bad_fraction={max_bad_fraction}; the dead letter is in {batch_dir or 'the batch folder'}, "
            "no manifest was written, so the batch will not be read"
        )


class FailedShards(RuntimeError):
    """Input shards could not be read whole, and --allow_failed_shards was not given."""


def input_shard_records(
    input_shards: list[tuple[str, int, float]], scored_files: list[str], shard_failures: list[Any]
) -> list[InputShard]:
    """Each input shard's identity, status and the scored files holding its records (read back from their source
    column)."""
    holders: dict[str, list[str]] = {}
    for path in sorted(scored_files):
        for source in scored_set.sources_of(path):
            holders.setdefault(source, []).append(posixpath.basename(path))
    failures = {error.source: f"{error.reason}: {error.message}" for error in shard_failures}
    return [
        InputShard(
            path, FAILED if path in failures else DONE, failures.get(path, ""), size, holders.get(path, []), modified
        )
        for path, size, modified in input_shards
    ]


def _refuse_failed_shards(
    shard_failures: list[Any], input_shards: list, batch_dir: str, allow_failed_shards: bool
) -> None:
    if shard_failures and not allow_failed_shards:
        named = "; ".join(f"{error.source} ({error.reason}: {error.message})" for error in shard_failures[:5])
        raise FailedShards(
            f"{len(shard_failures)} of {len(input_shards)} input shards could not be read whole, so no manifest was "
            f"written and none of {batch_dir} will be read: {named}. Fix or remove them and run again with "
            "--incremental, or pass --allow_failed_shards to keep the rest and list them as failed"
        )


def _finish_manifest(
    batch_dir: str,
    template: dict[str, Any],
    shards: list[InputShard],
    read: int,
    scored: int,
    dead_letter: dict[str, int],
    max_bad_fraction: float,
    loss_parameters,
    files: list[str],
    dead_letter_files: list[str],
) -> str:
    check_bad_fraction(read, sum(dead_letter.values()), max_bad_fraction, batch_dir)
    failed = sum(shard.status == FAILED for shard in shards)
    reference = dataclasses.replace(
        template["reference"], temperature=loss_parameters.temperature, bias=loss_parameters.bias
    )
    manifest = Manifest(
        **{**template, "reference": reference},
        counts=Counts(
            read=read,
            scored=scored,
            dead_letter=dict(sorted(dead_letter.items())),
            shards=len(shards),
            shards_done=len(shards) - failed,
            shards_failed=failed,
        ),
        input_shards=shards,
        shards=sorted(posixpath.basename(path) for path in files),
        dead_letter_shards=sorted(posixpath.basename(path) for path in dead_letter_files),
    )
    return batches.write_manifest(batch_dir, manifest)


def _write_manifest(
    _,
    scored_files,
    dead_letter_files,
    shard_failures,
    read,
    scored,
    dead_letter,
    loss_parameters,
    *,
    batch_dir,
    template,
    input_shards,
    max_bad_fraction,
    allow_failed_shards,
):
    _refuse_failed_shards(shard_failures, input_shards, batch_dir, allow_failed_shards)
    shards = input_shard_records(input_shards, scored_files, shard_failures)
    return _finish_manifest(
        batch_dir,
        template,
        shards,
        read,
        scored,
        dict(dead_letter),
        max_bad_fraction,
        loss_parameters,
        scored_files,
        dead_letter_files,
    )


def _write_sidecar_manifest(
    _,
    written,
    shard_failures,
    loss_parameters,
    *,
    batch_dir,
    template,
    input_shards,
    adopted,
    max_bad_fraction,
    allow_failed_shards,
):
    _refuse_failed_shards(shard_failures, input_shards, batch_dir, allow_failed_shards)
    failures = {error.source: f"{error.reason}: {error.message}" for error in shard_failures}
    by_shard = {summary.input_shard: summary for summary in written}
    shards, read, scored, dead_letter = [], 0, 0, {}
    for path, size, modified in input_shards:
        if path in failures:
            shards.append(InputShard(path, FAILED, failures[path], size, [], modified))
            continue
        summary = by_shard.get(path) or adopted.get(path)  # none: a shard without a single item
        shards.append(InputShard(path, DONE, "", size, [], modified, summary.sidecar if summary else ""))
        if summary:
            read, scored = read + summary.read, scored + summary.scored
            for reason, count in summary.dead_letter.items():
                dead_letter[reason] = dead_letter.get(reason, 0) + count
    return _finish_manifest(
        batch_dir, template, shards, read, scored, dead_letter, max_bad_fraction, loss_parameters, [], []
    )


class WriteManifest(beam.PTransform):
    """Once every shard is final, write `_MANIFEST.json` (counts, input shards with their status and outputs, output
    files) atomically; or fail the job instead when an input shard could not be read whole (unless
    `allow_failed_shards`) or when more than `max_bad_fraction` of the records read was dead-lettered.

    `template` holds the manifest's fields known before the run (schema_version, created, reference,
    output_formats, options); `input_shards` the (path, size in bytes, modification time) of every input shard.
    The reference's t and bias come from the one-element `loss_parameters` input (`stages.ReadLossParameters`)."""

    def __init__(
        self,
        batch_dir: str,
        template: dict[str, Any],
        input_shards: list[tuple[str, int, float]],
        max_bad_fraction: float = 1.0,
        allow_failed_shards: bool = False,
    ):
        super().__init__()
        self._batch_dir, self._template, self._input_shards = batch_dir, template, input_shards
        self._max_bad_fraction, self._allow_failed_shards = max_bad_fraction, allow_failed_shards

    def expand(self, inputs):
        scored_files, dead_letter_files, shard_failures, read, scored, dead_letter, loss_parameters = inputs
        return (
            scored_files.pipeline
            | "Once" >> beam.Create([None])
            | "Write"
            >> beam.Map(
                _write_manifest,
                AsList(scored_files),
                AsList(dead_letter_files),
                AsList(shard_failures),
                AsSingleton(read),
                AsSingleton(scored),
                AsDict(dead_letter),
                AsSingleton(loss_parameters),
                batch_dir=self._batch_dir,
                template=self._template,
                input_shards=self._input_shards,
                max_bad_fraction=self._max_bad_fraction,
                allow_failed_shards=self._allow_failed_shards,
            )
        )


class WriteSidecarManifest(beam.PTransform):
    """The sidecar layout's manifest step: once every sidecar is written, `_MANIFEST.json` mapping each input shard
    to its sidecar, with the counts summed from them; or the job fails, as `WriteManifest` does. `adopted` maps the
    input shards whose finished sidecars an earlier run left (a resumed run) to their `SidecarWritten`: they are
    listed, and counted, as this batch's."""

    def __init__(
        self,
        batch_dir: str,
        template: dict[str, Any],
        input_shards: list[tuple[str, int, float]],
        adopted: dict[str, SidecarWritten],
        max_bad_fraction: float = 1.0,
        allow_failed_shards: bool = False,
    ):
        super().__init__()
        self._kwargs = dict(
            batch_dir=batch_dir,
            template=template,
            input_shards=input_shards,
            adopted=adopted,
            max_bad_fraction=max_bad_fraction,
            allow_failed_shards=allow_failed_shards,
        )

    def expand(self, inputs):
        written, shard_failures, loss_parameters = inputs
        return (
            written.pipeline
            | "Once" >> beam.Create([None])
            | "Write"
            >> beam.Map(
                _write_sidecar_manifest,
                AsList(written),
                AsList(shard_failures),
                AsSingleton(loss_parameters),
                **self._kwargs,
            )
        )
