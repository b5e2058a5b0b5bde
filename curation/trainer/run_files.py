"""The run's own files in its workdir (config.json, tokenizer.json, metrics.jsonl), on any filesystem Beam's
`FileSystems` knows: a local disk, `gs://` (tested on the GCS emulator), and the others Beam registers. Every write
replaces a whole file (written under a temporary name, then renamed), since object stores cannot append; a reader
never sees half a file."""

from __future__ import annotations

import json
import posixpath

from apache_beam.io.filesystems import FileSystems

from curation.shared.batches import write_atomically


def join(workdir: str, *names: str) -> str:
    return posixpath.join(workdir, *names)


def exists(path: str) -> bool:
    return FileSystems.exists(path)


def read_text(path: str) -> str:
    with FileSystems.open(path) as f:
        return f.read().decode("utf-8")


def write_text(path: str, text: str) -> str:
    return write_atomically(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path: str):
    return json.loads(read_text(path))


def write_json(path: str, value, indent: int | None = 2) -> str:
    return write_text(path, json.dumps(value, indent=indent))


def remove(path: str) -> bool:
    """Delete a file, or a folder and all under it; whether there was anything to delete."""
    if FileSystems.exists(path):
        FileSystems.delete([path])
        return True
    matched = FileSystems.match([path.rstrip("/") + "/**"])[0].metadata_list  # a gs:// "folder" is its objects
    if matched:
        FileSystems.delete([metadata.path for metadata in matched])
    return bool(matched)


def move(source: str, destination: str) -> None:
    """Move a file or a folder (on an object store: every object under it)."""
    if "://" not in source or FileSystems.exists(source):
        FileSystems.rename([source], [destination])
        return
    prefix = source.rstrip("/") + "/"
    sources = [metadata.path for metadata in FileSystems.match([prefix + "**"])[0].metadata_list]
    FileSystems.rename(sources, [destination.rstrip("/") + "/" + path[len(prefix) :] for path in sources])
