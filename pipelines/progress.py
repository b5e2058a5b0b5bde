"""Progress of a scoring job, logged from the workers every few seconds.

Beam's in-process runner shows no live metrics, and a Dataflow job's counters lag by a minute; so each worker
process keeps its own tally (shards and records read, examples scored) and logs one line at most every
`INTERVAL_S` seconds, from whichever stage updates it:

    progress: 4 of 10 shards read, 4,012 records read, 3,890 scored (1,120/s over the last 5.0 s, 1,050/s overall)

The job's Beam counters are all printed once it has finished (`pipelines.score.log_counters`).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("pipelines.progress")
INTERVAL_S = 5.0


class Progress:
    """One worker process's tally; thread-safe (Beam runs bundles on several threads of a process)."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._counts = {"shards": 0, "records": 0, "scored": 0}
        self._total_shards = 0
        self._start = self._last_time = None
        self._last_scored = 0

    def expect_shards(self, total: int) -> None:
        with self._lock:
            self._total_shards = max(self._total_shards, total)

    def add(self, name: str, count: int = 1) -> None:
        now = time.monotonic()
        with self._lock:
            self._counts[name] += count
            if self._start is None:
                self._start = self._last_time = now
            if now - self._last_time < self._interval_s:
                return
            line = self._line(now)
            self._last_time, self._last_scored = now, self._counts["scored"]
        log.info(line)

    def _line(self, now: float) -> str:
        counts = self._counts
        shards = f"{counts['shards']} of {self._total_shards}" if self._total_shards else f"{counts['shards']}"
        recent = (counts["scored"] - self._last_scored) / max(now - self._last_time, 1e-9)
        overall = counts["scored"] / max(now - self._start, 1e-9)
        return (
            f"progress: {shards} shards read, {counts['records']:,} records read, {counts['scored']:,} scored "
            f"({recent:,.0f}/s over the last {now - self._last_time:.1f} s, {overall:,.0f}/s overall)"
        )


_PROCESS = Progress()


def worker_progress() -> Progress:
    """This process's tally (one per worker process, shared by its DoFns)."""
    return _PROCESS
