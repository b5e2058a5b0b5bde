import os

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from curation.shared import corpus
from curation.shared.corpus import CorpusRecord, FieldNames
from curation.shared.corpus_readers import iter_corpus, read_shard
from curation.shared.corpus_writers import SHARD_SUFFIXES, open_shard_writer
from curation.shared.errors import TRUNCATED_SHARD, CorpusError
from pipelines import corpus_io
from pipelines.corpus_io import ReadCorpus


def shard_records(shard: int, n: int = 4) -> list[CorpusRecord]:
    return [
        CorpusRecord(
            f"s{shard}-{i:03d}",
            bytes([shard, i]) * 9,
            f"caption {shard}.{i}" if i != 2 else b"\xff",
            "",
            {"shard": shard},
        )
        for i in range(n)
    ]


def write_shards(directory: str, format: str, n_shards: int) -> list[CorpusRecord]:
    written = []
    for shard in range(n_shards):
        with open_shard_writer(f"{directory}/{shard:05d}{SHARD_SUFFIXES[format]}", format) as writer:
            for record in shard_records(shard):
                writer.write(record)
                written.append(record)
    return written


def summary(record: CorpusRecord) -> tuple:
    return record.key, record.image, record.caption, tuple(sorted(record.metadata.items()))


@pytest.mark.parametrize("format", ["wds", "tfrecord"])
def test_beam_read_of_n_shards_yields_their_records_and_holds_back_a_shard_cut_short(tmp_path, format):
    written = write_shards(str(tmp_path), format, n_shards=3)
    suffix = SHARD_SUFFIXES[format]
    # A fourth shard, cut short: the parser gives its first records and an error, but none of them goes on.
    full = (tmp_path / f"00002{suffix}").read_bytes()
    (tmp_path / f"00003{suffix}").write_bytes(full[: len(full) // 2])
    truncated = [r for r in read_shard(str(tmp_path / f"00003{suffix}"), format) if isinstance(r, CorpusRecord)]
    assert 0 < len(truncated) < 4

    pipeline = BeamTestPipeline()
    records, errors, failed = pipeline | ReadCorpus(str(tmp_path / f"*{suffix}"), format)
    assert_that(records | "Summaries" >> beam.Map(summary), equal_to([summary(r) for r in written]))
    assert_that(errors, equal_to([]), label="CheckErrors")
    assert_that(
        failed | "Reasons" >> beam.Map(lambda e: (e.reason, os.path.basename(e.source))),
        equal_to([(TRUNCATED_SHARD, f"00003{suffix}")]),
        label="CheckFailed",
    )
    result = pipeline.run()
    result.wait_until_finish()
    counters = {c.key.metric.name: c.committed for c in result.metrics().query(MetricsFilter())["counters"]}
    assert (counters["shards_read"], counters["shards_failed"]) == (3, 1)
    assert counters["records_read"] == len(written)


def test_beam_read_keys_are_unique_over_shards(tmp_path):
    write_shards(str(tmp_path), "parquet", n_shards=5)
    with BeamTestPipeline() as pipeline:
        records, errors, _ = pipeline | ReadCorpus(
            [str(tmp_path / "0000[0-2].parquet"), str(tmp_path / "*.parquet")], "parquet"
        )
        keys = records | beam.Map(lambda r: r.key)
        assert_that(keys | "Count" >> beam.combiners.Count.Globally(), equal_to([20]), label="CountAll")
        assert_that(
            keys | beam.Distinct() | "CountDistinct" >> beam.combiners.Count.Globally(),
            equal_to([20]),
            label="CountDistinct",
        )
        assert_that(errors, equal_to([]), label="NoErrors")


# --- gs:// through a local GCS emulator ------------------------------------------------------------------------


@pytest.mark.parametrize("format", corpus.FORMATS)
def test_gcs_shards_read_through_the_same_readers(gcs_bucket, tmp_path, format):
    from apache_beam.io.filesystems import FileSystems

    prefix = f"{gcs_bucket}/{format}"
    written = write_shards(prefix, format, n_shards=2)  # written straight to the bucket
    local = tmp_path / f"local{SHARD_SUFFIXES[format]}"
    with open_shard_writer(str(local), format) as writer:
        for record in shard_records(7):
            writer.write(record)
    with FileSystems.create(f"{prefix}/00002{SHARD_SUFFIXES[format]}") as upload:  # and uploaded
        upload.write(local.read_bytes())
    written += shard_records(7)
    matched = [m.path for m in FileSystems.match([f"{prefix}/*"])[0].metadata_list]
    assert len(matched) == 3 and all(path.startswith("gs://corpus-test/") for path in matched)

    read = list(iter_corpus(f"{prefix}/*{SHARD_SUFFIXES[format]}", format))
    assert [summary(r) for r in read] == [summary(r) for r in written]
    assert {r.source for r in read} == set(matched)
    if format == "wds":
        with BeamTestPipeline() as pipeline:
            records, errors, _ = pipeline | ReadCorpus(f"{prefix}/*.tar", format)
            assert_that(records | beam.Map(summary), equal_to([summary(r) for r in written]))
            assert_that(errors, equal_to([]), label="NoErrors")


def test_gcs_truncated_shard_is_an_error_record(gcs_bucket):
    from apache_beam.io.filesystems import FileSystems

    path = f"{gcs_bucket}/truncated/00000.tfrecord"
    with open_shard_writer(path, "tfrecord") as writer:
        for record in shard_records(0):
            writer.write(record)
    with FileSystems.open(path) as f:
        data = f.read()
    with FileSystems.create(path) as f:
        f.write(data[:-3])
    items = list(read_shard(path, "tfrecord"))
    assert [type(i) for i in items] == [CorpusRecord] * 3 + [CorpusError]
    assert items[-1].reason == TRUNCATED_SHARD and items[-1].source == path


def test_reader_flags_override_the_default_field_names():
    import argparse

    parser = argparse.ArgumentParser()
    corpus_io.add_reader_arguments(parser)
    options = corpus_io.reader_options(parser.parse_args(["--input_format", "parquet", "--image_field", "img, jpg"]))
    assert options == {
        "format": "parquet",
        "batch_rows": 1024,
        "fields": FieldNames(key="key", image=("img", "jpg"), caption=("caption", "text")),
    }
    assert corpus_io.reader_options(parser.parse_args([]))["fields"] == corpus.DEFAULT_FIELDS["wds"]
    assert corpus_io.field_names("tfrecord", key="id", caption="text").caption == ("text",)
    with pytest.raises(ValueError, match="empty image field"):
        corpus_io.field_names("wds", image=" , ")
