"""Batch folders on disk: their names, atomic writes, the manifests in them, and clean-up of unfinished ones."""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import uuid
from typing import Any, Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem

from curation.shared.manifest import _SUFFIX, BATCH_PREFIX, MANIFEST_NAME, SCORED_PREFIX, TEMPORARY_PREFIXES, Manifest


def new_batch_name(now: str) -> str:
    """batch-{UTC time}-{random}: sorts by time, never collides between concurrent runs."""
    return f"{BATCH_PREFIX}{now}-{uuid.uuid4().hex[:6]}"


# The temporary name of a file being written by `write_atomically`: `.{name}.{32 hex digits}.tmp`, beside it.
ATOMIC_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


class OutputWriteError(OSError):
    """A file of the output could not be written (a full disk, a lost permission): its path and the cause, in one
    line; nothing of it is left behind, not even its temporary file."""


def write_atomically(path: str, write: Callable[[Any], None]) -> str:
    """`write(f)` into a temporary `.{name}.{random}.tmp` beside `path`, then renamed to `path` (one object appears
    whole on GCS; a reader never sees it half-written); returns `path`. When the write fails, the temporary file is
    removed and OutputWriteError names `path` and the cause."""
    temporary = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        with FileSystems.create(temporary) as f:
            write(f)
    except BaseException as error:
        _remove_quietly(temporary)
        if isinstance(error, OSError):
            raise OutputWriteError(f"cannot write {path}: {error}") from error
        raise
    if FileSystems.exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temporary], [path])
    return path


def _remove_quietly(path: str) -> None:
    """Delete `path` if it is there (a failed write may not have created it)."""
    try:
        if FileSystems.exists(path):
            FileSystems.delete([path])
    except Exception:  # the disk or the connection that failed the write: the clean-up of a later run removes it
        pass


def write_manifest(batch_dir: str, manifest: Manifest) -> str:
    """Write `_MANIFEST.json` atomically (`write_atomically`)."""
    return write_atomically(
        posixpath.join(batch_dir, MANIFEST_NAME), lambda f: f.write(manifest.to_json().encode("utf-8"))
    )


def read_manifests(output: str) -> list[Manifest]:
    """Every batch manifest under `output`, oldest batch first (an output with none gives [])."""
    pattern = posixpath.join(output, f"{BATCH_PREFIX}*", MANIFEST_NAME)
    manifests = []
    for metadata in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(metadata.path) as f:
            manifests.append(Manifest.from_json(f.read().decode("utf-8"), posixpath.dirname(metadata.path)))
    return sorted(manifests, key=lambda manifest: manifest.batch_dir)


def _batch_folders(output: str) -> dict[str, list[str]]:
    """Batch folder under `output` -> the paths of every file inside it, at any depth."""
    output = output.rstrip("/")
    folders: dict[str, list[str]] = {}
    filesystem = FileSystems.get_filesystem(output)
    if isinstance(filesystem, LocalFileSystem) and os.path.isdir(output):  # a local disk keeps empty folders too
        folders.update(
            {
                posixpath.join(output, name): []
                for name in os.listdir(output)
                if name.startswith(BATCH_PREFIX) and os.path.isdir(os.path.join(output, name))
            }
        )
    for metadata in FileSystems.match([posixpath.join(output, f"{BATCH_PREFIX}*", "**")])[0].metadata_list:
        name = metadata.path[len(output) + 1 :].split("/", 1)[0]
        folders.setdefault(posixpath.join(output, name), []).append(metadata.path)
    return folders


def unfinished_batches(output: str) -> list[str]:
    """Batch folders under `output` that hold no manifest: never read, never counted as done."""
    return sorted(
        folder for folder, paths in _batch_folders(output).items() if posixpath.join(folder, MANIFEST_NAME) not in paths
    )


def remove_unfinished(output: str, before: str, keep: Iterable[str] = ()) -> list[str]:
    """Delete the unfinished batch folders named (by time) before the batch name `before`, and the temporary files
    left in finished ones (Beam's, and `write_atomically`'s at any depth, `sidecars/` too); returns what was deleted.
    Only safe when no run that started earlier is still writing to `output`: its batch folder has no manifest yet
    either. Sidecars a manifest lists (a resumed run adopts the finished sidecars of the run it resumes), and the
    paths in `keep`, stay: of such a folder only the rest goes."""
    cutoff = before[: len(BATCH_PREFIX) + len("YYYYmmddTHHMMSSZ")]
    kept = set(keep) | {path for manifest in read_manifests(output) for path in manifest.sidecars().values()}
    kept |= {path[: -len(_SUFFIX["parquet"])] + _SUFFIX["tfrecord"] for path in kept}  # a TFRecord twin too
    doomed: dict[str, list[str]] = {}  # file or folder -> the files under it
    for folder, paths in sorted(_batch_folders(output).items()):
        if posixpath.join(folder, MANIFEST_NAME) not in paths:
            if posixpath.basename(folder) < cutoff:
                if any(path in kept for path in paths):
                    doomed.update({path: [path] for path in paths if path not in kept})
                else:
                    doomed[folder] = paths
            continue
        for path in paths:
            top = path[len(folder) + 1 :].split("/", 1)[0]
            if top.startswith(TEMPORARY_PREFIXES):  # Beam's temporary folder goes as a whole
                doomed.setdefault(posixpath.join(folder, top), []).append(path)
            elif ATOMIC_TEMPORARY.fullmatch(posixpath.basename(path)):  # e.g. a sidecar's whose first try failed
                doomed[path] = [path]
    local = isinstance(FileSystems.get_filesystem(output), LocalFileSystem)
    for path, files in doomed.items():
        # A local folder goes as a whole (empty subfolders too); an object store has only the files.
        FileSystems.delete([path] if local else files)
    return sorted(doomed)


def write_scored_batch(output: str, name: str, table: pa.Table, manifest: Manifest) -> str:
    """A one-shard Parquet batch `output/name` from a table of the scored schema, with its manifest (for batches
    derived outside the job); returns the batch folder."""
    batch_dir = posixpath.join(output, name)
    shard = f"{SCORED_PREFIX}-00000-of-00001{_SUFFIX['parquet']}"
    with FileSystems.create(posixpath.join(batch_dir, shard)) as f:
        pq.write_table(table, f)
    write_manifest(
        batch_dir,
        dataclasses.replace(manifest, shards=[shard], dead_letter_shards=[], output_formats=["parquet"], batch_dir=""),
    )
    return batch_dir
