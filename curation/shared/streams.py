"""File-object wrappers the corpus parsers read through (any object with `read`: local files, gs:// streams)."""

from __future__ import annotations

from typing import BinaryIO


class TailRecorder:
    """Read-only file wrapper that counts bytes and keeps the last ones read, so the end of a tar stream can be
    checked: `tarfile` in stream mode ends quietly on a missing or damaged end-of-archive block."""

    def __init__(self, raw: BinaryIO, keep: int = 1 << 16):
        self._raw, self._keep = raw, keep
        self._tail, self.position = b"", 0

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.position += len(data)
        self._tail = (self._tail + data)[-self._keep :]
        return data

    def bytes_at(self, start: int, size: int) -> bytes:
        """Bytes [start, start + size) if still in the kept tail (fewer where the file ended)."""
        tail_start = self.position - len(self._tail)
        if start < tail_start:
            raise ValueError(f"byte {start} is no longer kept (kept from {tail_start})")
        return self._tail[start - tail_start : start - tail_start + size]


class StreamGuard:
    """Read-only file wrapper that remembers whether the stream itself failed: pyarrow reports a damaged file and a
    failing disk or network alike as OSError, and only the first is data (dead-lettered); the second is raised so
    that the runner retries the read."""

    def __init__(self, raw: BinaryIO):
        self._raw, self.failed = raw, False

    def __getattr__(self, name: str):
        attribute = getattr(self._raw, name)
        if not callable(attribute):
            return attribute

        def guarded(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except OSError:
                self.failed = True
                raise

        return guarded
