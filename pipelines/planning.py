"""Which input shards a run scores: all of them, or (`--incremental`) those no earlier batch of the same reference
under --output has done; and, in the sidecar layout, the finished sidecars of a run that died, to adopt.

A shard is known by its identity: its canonical path, its size and its modification time. A shard that changed
since it was scored is scored again; a shard an earlier batch marked failed (unreadable) is not done.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

from apache_beam.io.filesystems import FileSystems

from curation.shared import batches, sidecars
from curation.shared.corpus import match_shards, valid_unicode
from curation.shared.manifest import DONE, FAILED, InputShard, Options

# (canonical path, size in bytes, modification time) of an input shard.
ShardIdentity = tuple[str, int, float]


@dataclasses.dataclass(frozen=True)
class Plan:
    """What this run does with the input shards."""

    todo: list[ShardIdentity]  # to score now
    skipped: list[str]  # already in a batch of this reference
    adopted: dict[str, tuple[str, sidecars.SidecarInfo]]  # input shard -> its finished sidecar (path under --output)

    @property
    def nothing_to_score(self) -> bool:
        return not self.todo and not self.adopted

    @property
    def paths(self) -> list[str]:
        """The input shards to score now."""
        return [path for path, _, _ in self.todo]

    @property
    def identities(self) -> list[ShardIdentity]:
        """Every input shard of the batch: those scored now and those whose sidecars it adopts."""
        adopted = ((path, info.size_bytes, info.modified) for path, (_, info) in self.adopted.items())
        return sorted([*self.todo, *adopted])


def input_patterns(args: argparse.Namespace) -> list[str]:
    """--input's globs: the flag repeated, or comma-separated."""
    return [pattern for value in args.input for pattern in value.split(",") if pattern]


def canonical_path(path: str) -> str:
    """The one spelling of a shard's path: a local path absolute with links resolved, a URL as it is. (A relative
    path recorded by an earlier batch is resolved against the current directory.)"""
    return path if "://" in path else os.path.realpath(path)


def shard_identities(paths: Sequence[str]) -> list[ShardIdentity]:
    """(canonical path, size in bytes, modification time) of each shard, as the filesystem reports them."""
    canonical = sorted({canonical_path(path) for path in paths})
    identities = []
    for path, result in zip(canonical, FileSystems.match(canonical)):
        metadata = result.metadata_list[0]
        identities.append((path, metadata.size_in_bytes, float(metadata.last_updated_in_seconds or -1.0)))
    return identities


def _already_scored(shard: ShardIdentity, recorded: dict[str, InputShard]) -> bool:
    """Whether an earlier batch holds this very shard: the same canonical path, and the same size and
    modification time where it recorded them (a shard that changed is scored again)."""
    earlier = recorded.get(shard[0])
    if earlier is None:
        return False
    same_size = earlier.size_bytes < 0 or earlier.size_bytes == shard[1]
    same_time = earlier.modified < 0 or earlier.modified == shard[2]
    return same_size and same_time


def _match_input(args: argparse.Namespace) -> list[str]:
    try:
        shards = match_shards(input_patterns(args))
    except FileNotFoundError as error:
        raise SystemExit(
            f"--input: {error}; check the path and the glob (quote it, so the shell leaves it alone)"
        ) from None
    not_utf8 = [ascii(shard) for shard in shards if valid_unicode(shard) != shard]
    if not_utf8:  # a local file name; Beam carries paths as UTF-8 text and would fail on it mid-job
        raise SystemExit(f"input shard paths must be UTF-8; rename {', '.join(not_utf8[:5])}")
    return shards


def plan_batch(args: argparse.Namespace, fingerprint: str, options: Options | None = None) -> Plan:
    """The Plan of a run of the job's flags `args` with the reference `fingerprint`. Refuses (SystemExit) to mix
    references or to re-score into an output that already holds batches unless --incremental. A shard an earlier
    batch marked failed is scored again, unless --skip_failed_shards. Sidecars are adopted (sidecar layout) when
    they hold the very shard, scored by this reference under the same `options`."""
    shards = _match_input(args)
    existing = batches.read_manifests(args.output)
    if existing and not args.incremental:
        raise SystemExit(
            f"{args.output} already holds {len(existing)} scored batch(es); pass --incremental to "
            "score only new input shards, or choose another --output"
        )
    others = sorted({m.reference_fingerprint[:12] for m in existing if m.reference_fingerprint != fingerprint})
    if others and not args.force_new_reference:
        raise SystemExit(
            f"{args.output} holds batches scored by reference(s) {others}, not {fingerprint[:12]}; "
            "pass --force_new_reference to add a batch of this reference beside them"
        )
    counted = (DONE, FAILED) if args.skip_failed_shards else (DONE,)
    recorded = {
        canonical_path(shard.path): shard
        for m in existing
        if m.reference_fingerprint == fingerprint
        for shard in m.input_shards
        if shard.status in counted
    }
    identities = shard_identities(shards)
    todo = [shard for shard in identities if not _already_scored(shard, recorded)]
    skipped = [shard[0] for shard in identities if _already_scored(shard, recorded)]
    adopted = {}
    if options is not None and options.output_layout == "sidecar":
        finished = sidecars.resumable_sidecars(args.output, fingerprint, options.scoring())
        for path, size, modified in todo:
            found = finished.get(path)
            if found is not None and (found[1].size_bytes, found[1].modified) == (size, modified):
                adopted[path] = found
    return Plan([shard for shard in todo if shard[0] not in adopted], skipped, adopted)
