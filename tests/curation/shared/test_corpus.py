import gzip
import io
import json
import struct
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.shared import corpus, corpus_readers, tfrecord
from curation.shared.corpus import CorpusRecord, FieldNames
from curation.shared.corpus_readers import iter_corpus, read_shard
from curation.shared.corpus_writers import SHARD_SUFFIXES, open_shard_writer
from curation.shared.errors import (
    CORRUPT_RECORD,
    DUPLICATE_KEY,
    MISSING_CAPTION,
    MISSING_IMAGE,
    TRUNCATED_SHARD,
    UNREADABLE_SHARD,
    CorpusError,
    CorpusReadError,
)

JPEG = b"\xff\xd8\xff\xe0fake-jpeg"
PNG = b"\x89PNG\r\n\x1a\nfake-png"


def sample_records(n: int = 12, prefix: str = "k") -> list[CorpusRecord]:
    """Records covering what the readers must hand on untouched: bad UTF-8, empty and odd bytes, metadata."""
    records = []
    for i in range(n):
        caption: str | bytes = f"a caption {i} ünïcödé"
        if i % 5 == 3:
            caption = b"bad \xff\xfe utf-8"
        elif i % 5 == 4:
            caption = ""
        image = (PNG if i % 2 else JPEG) + bytes([i]) * i if i % 7 != 6 else b""
        records.append(CorpusRecord(f"{prefix}{i:04d}", image, caption, "", {"truth": f"t{i % 3}", "n": i}))
    return records


def write_shard(path, format, records):
    with open_shard_writer(str(path), format) as writer:
        for record in records:
            writer.write(record)
    return str(path)


def project(items):
    return [(r.key, r.image, r.caption, r.metadata) for r in items]


@pytest.mark.parametrize("format", corpus.FORMATS)
def test_each_format_round_trips_keys_bytes_captions_and_metadata(tmp_path, format):
    records = sample_records()
    path = write_shard(tmp_path / f"00000{SHARD_SUFFIXES[format]}", format, records)
    read = list(read_shard(path, format))
    assert all(isinstance(r, CorpusRecord) for r in read)
    assert project(read) == project(records)
    assert {r.source for r in read} == {path}
    assert isinstance(read[3].caption, bytes) and read[4].caption == "" and read[6].image == b""


@pytest.mark.parametrize("format", corpus.FORMATS)
def test_iter_corpus_reads_all_shards_of_a_glob_in_order(tmp_path, format):
    suffix = SHARD_SUFFIXES[format]
    shards = [sample_records(5, prefix=f"s{s}-") for s in range(3)]
    for s, records in enumerate(shards):
        write_shard(tmp_path / f"{s:05d}{suffix}", format, records)
    (tmp_path / "notes.txt").write_text("not a shard")
    read = list(iter_corpus(str(tmp_path / f"*{suffix}"), format))
    assert project(read) == project([r for records in shards for r in records])
    assert len({r.key for r in read}) == 15


def test_iter_corpus_raises_on_an_empty_glob_and_can_raise_on_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no corpus shard"):
        list(iter_corpus(str(tmp_path / "*.tar"), "wds"))
    with pytest.raises(ValueError, match="unknown corpus format"):
        list(iter_corpus(str(tmp_path / "*.tar"), "zip"))
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 100)
    assert [e.reason for e in iter_corpus(str(tmp_path / "*.tar"), "wds")] == [UNREADABLE_SHARD]
    with pytest.raises(CorpusReadError, match="unreadable_shard"):
        list(iter_corpus(str(tmp_path / "*.tar"), "wds", errors="raise"))


def make_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_wds_orphans_are_error_records_and_json_and_extra_members_become_metadata(tmp_path):
    path = make_tar(
        tmp_path / "00003.tar",
        [
            ("a.jpg", JPEG),
            ("a.txt", b"cap a"),
            ("a.json", json.dumps({"url": "http://x", "w": 64}).encode()),
            ("b.png", PNG),  # image, no caption
            ("c.txt", b"caption, no image"),
            ("d.webp", b"RIFF....WEBP"),
            ("d.txt", b"cap d"),
            ("d.cls", b"7"),
            ("d.json", b"{not json"),
            ("dir/e.seg.jpg", JPEG),
            ("dir/e.TXT", b"cap e"),
        ],
    )
    items = list(read_shard(path, "wds"))
    errors = {e.key: e.reason for e in items if isinstance(e, CorpusError)}
    # "dir/e" has a "seg.jpg" member, which is not one of the default image extensions.
    assert errors == {"b": MISSING_CAPTION, "c": MISSING_IMAGE, "dir/e": MISSING_IMAGE}
    records = {r.key: r for r in items if isinstance(r, CorpusRecord)}
    assert list(records) == ["a", "d"]
    assert records["a"].metadata == {"url": "http://x", "w": 64}
    assert records["d"].image == b"RIFF....WEBP"
    assert records["d"].metadata == {"cls": "7", "json": "{not json"}
    custom = FieldNames(key="", image=("seg.jpg",), caption=("txt",))
    assert [r.key for r in read_shard(path, "wds", custom) if isinstance(r, CorpusRecord)] == ["dir/e"]


def test_wds_non_adjacent_members_of_a_key_are_reported_not_merged(tmp_path):
    path = make_tar(tmp_path / "00000.tar", [("a.jpg", JPEG), ("b.jpg", JPEG), ("b.txt", b"b"), ("a.txt", b"a")])
    reasons = [(i.key, i.reason if isinstance(i, CorpusError) else "record") for i in read_shard(path, "wds")]
    assert reasons == [("a", MISSING_CAPTION), ("b", "record"), ("a", DUPLICATE_KEY)]


@pytest.mark.parametrize("cut", ["mid_member", "block_boundary", "end_marker"])
def test_truncated_tar_gives_the_records_before_the_break_and_one_error(tmp_path, cut):
    records = sample_records(12)
    full = tmp_path / "full.tar"
    write_shard(full, "wds", records)
    data = full.read_bytes()
    with tarfile.open(full) as tar:
        members = tar.getmembers()
    seventh = next(m for m in members if m.name.startswith("k0007"))  # first member of the 8th sample
    length = {
        "mid_member": seventh.offset_data + 3,  # inside the data of the 8th sample's image
        "block_boundary": seventh.offset,  # the 8th sample's header never starts
        "end_marker": members[-1].offset_data + members[-1].size,  # all data, no end-of-archive blocks
    }[cut]
    path = tmp_path / "00001.tar"
    path.write_bytes(data[:length])
    items = list(read_shard(str(path), "wds"))
    good, errors = items[:-1], items[-1:]
    assert all(isinstance(r, CorpusRecord) for r in good)
    assert project(good) == project(records[: len(good)])
    # A break inside a member of the next sample shows the previous one is whole; at a clean header boundary or a
    # missing end marker, the last sample read may lack members: it is named in the error, not emitted.
    expected = {"mid_member": 7, "block_boundary": 6, "end_marker": 11}[cut]
    assert len(good) == expected
    (error,) = errors
    assert isinstance(error, CorpusError) and error.reason == TRUNCATED_SHARD
    assert error.source == str(path) and error.key == records[expected].key
    assert "truncated" in error.message


def test_tfrecord_crc_and_truncation_are_error_records_naming_the_file(tmp_path):
    records = sample_records(6)
    path = write_shard(tmp_path / "00000.tfrecord", "tfrecord", records)
    data = bytearray(open(path, "rb").read())
    frame_starts = [0]
    for _ in range(5):
        (length,) = struct.unpack("<Q", bytes(data[frame_starts[-1] : frame_starts[-1] + 8]))
        frame_starts.append(frame_starts[-1] + 16 + length)
    data[frame_starts[2] + 20] ^= 0xFF  # corrupt the data of record 2: its CRC no longer matches
    broken = tmp_path / "00001.tfrecord"
    broken.write_bytes(bytes(data[: frame_starts[5] + 10]))  # and cut inside record 5
    items = list(read_shard(str(broken), "tfrecord"))
    kinds = [i.reason if isinstance(i, CorpusError) else i.key for i in items]
    assert kinds == ["k0000", "k0001", CORRUPT_RECORD, "k0003", "k0004", TRUNCATED_SHARD]
    assert all(str(broken) == i.source for i in items)
    assert "00001-00000005" == items[-1].key and "byte" in items[-1].message
    assert project(items[3:5]) == project(records[3:5])


def test_tfrecord_written_by_tensorflow_reads_with_derived_keys_and_custom_features(tmp_path):
    import tensorflow as tf

    path = str(tmp_path / "part-7.tfrecord")
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(3):
            writer.write(tfrecord.encode_example({"jpeg": JPEG, "text": f"t{i}", "score": 0.5, "ids": [1, 2]}))
        writer.write(tfrecord.encode_example({"text": "no image here"}))
    fields = FieldNames(key="id", image=("jpeg",), caption=("text",))
    items = list(read_shard(path, "tfrecord", fields))
    assert [(r.key, r.caption) for r in items[:3]] == [(f"part-7-{i:08d}", f"t{i}") for i in range(3)]
    assert items[0].metadata == {"score": 0.5, "ids": [1, 2]}
    assert isinstance(items[3], CorpusError) and items[3].reason == MISSING_IMAGE


def test_parquet_hf_image_struct_text_column_nulls_and_row_batches(tmp_path):
    rows = 10
    table = pa.table(
        {
            "image": [{"bytes": JPEG + bytes([i]), "path": f"{i}.jpg"} for i in range(rows - 1)]
            + [{"bytes": None, "path": "elsewhere.jpg"}],
            "text": [f"caption {i}" for i in range(rows - 2)] + [None, "x"],
            "url": [f"http://e/{i}" for i in range(rows)],
            "width": [64] * (rows - 1) + [None],
        }
    )
    path = tmp_path / "train-00000-of-00002.parquet"
    pq.write_table(table, path, row_group_size=3)
    items = list(read_shard(str(path), "parquet", batch_rows=2))
    assert [r.key for r in items[:8]] == [f"train-00000-of-00002-{i:08d}" for i in range(8)]
    assert items[5].image == JPEG + b"\x05" and items[5].caption == "caption 5"
    assert items[5].metadata == {"url": "http://e/5", "width": 64}
    assert (items[8].reason, items[9].reason) == (MISSING_CAPTION, MISSING_IMAGE)
    assert "elsewhere.jpg" in items[9].message


def test_parquet_without_an_image_column_and_non_parquet_files_are_shard_errors(tmp_path):
    no_image = tmp_path / "a.parquet"
    pq.write_table(pa.table({"key": ["x"], "caption": ["c"]}), no_image)
    not_parquet = tmp_path / "b.parquet"
    not_parquet.write_bytes(b"PAR1 garbage")
    for path in (no_image, not_parquet):
        (error,) = read_shard(str(path), "parquet")
        assert error.reason == UNREADABLE_SHARD and error.source == str(path)


def test_duplicate_keys_in_a_shard_are_reported(tmp_path):
    records = sample_records(3)
    path = write_shard(tmp_path / "00000.parquet", "parquet", records + [records[1]])
    items = list(read_shard(path, "parquet"))
    assert [type(i).__name__ for i in items] == ["CorpusRecord"] * 3 + ["CorpusError"]
    assert (items[3].key, items[3].reason) == ("k0001", DUPLICATE_KEY)


def test_shard_stem_and_derived_keys():
    assert corpus.shard_stem("gs://b/web/00012.tfrecord.gz") == "00012"
    assert corpus.shard_stem("/x/train-0001.parquet") == "train-0001"
    assert corpus.derived_key("/x/00003.tar", 17) == "00003-00000017"
    assert corpus_readers.split_member_name("a/b/000123.seg.png") == ("a/b/000123", "seg.png")


def test_gzipped_tfrecord_and_tar_are_read_through_the_filesystem_layer(tmp_path):
    records = sample_records(4)
    for format, name in (("tfrecord", "00000.tfrecord"), ("wds", "00000.tar")):
        plain = write_shard(tmp_path / name, format, records)
        packed = tmp_path / (name + ".gz")
        packed.write_bytes(gzip.compress(open(plain, "rb").read()))
        assert project(read_shard(str(packed), format)) == project(records)
