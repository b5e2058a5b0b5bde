"""Progress lines from the workers while the job runs, and every Beam counter once it has finished."""

import logging
import re

from pipelines import progress
from tests.pipelines.test_score import run_score


def test_a_progress_line_says_what_was_read_and_scored_and_how_fast(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.progress")
    tally = progress.Progress(interval_s=0.0)
    tally.expect_shards(4)
    tally.add("records", 1000)
    tally.add("shards")
    tally.add("scored", 900)
    lines = [record.getMessage() for record in caplog.records if record.name == "pipelines.progress"]
    assert lines[-1].startswith("progress: 1 of 4 shards read, 1,000 records read, 900 scored (")
    assert re.search(r"\(\d[\d,]*/s over the last [\d.]+ s, \d[\d,]*/s overall\)$", lines[-1])
    quiet = progress.Progress(interval_s=3600.0)
    before = len(caplog.records)
    for _ in range(100):
        quiet.add("scored")
    assert len(caplog.records) == before  # at most one line per interval


def test_the_job_logs_progress_while_it_runs_and_all_counters_at_the_end(
    web_corpora, reference_checkpoint, tmp_path, caplog, monkeypatch
):
    monkeypatch.setattr(progress, "_PROCESS", progress.Progress(interval_s=0.0))  # a line at every update
    caplog.set_level(logging.INFO)
    summary = run_score(web_corpora["wds"], "wds", str(tmp_path / "out"), reference_checkpoint)
    messages = [record.getMessage() for record in caplog.records]
    lines = [message for message in messages if message.startswith("progress: ")]
    assert lines and f"{summary['scored']:,} scored" in lines[-1] and "of 3 shards read" in lines[-1]
    [counters] = [message for message in messages if message.startswith("counters:")]
    values = dict(re.findall(r"^\s+(\S+)\s+([\d,]+)$", counters, re.M))
    assert int(values["corpus:records_read"].replace(",", "")) == summary["read"]
    assert int(values["corpus:shards_read"]) == 3
    for reason, count in summary["dead_letter"].items():
        assert int(values[f"score:dead_letter_{reason}"]) == count
