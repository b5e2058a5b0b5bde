"""The scoring job against bad input and bad luck: a fuzzed corpus, a run killed mid-way and re-run, determinism,
non-finite embeddings, and what a hostile tar can make the reader do.

Job runs are shared through module fixtures (each takes seconds): two fuzzed runs (wds, Parquet), one failing on
--max_bad_fraction, and on a clean corpus a baseline, a killed run and its re-run, and two other batch sizes.
"""

import collections
import dataclasses
import glob
import io
import os
import posixpath
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from apache_beam.ml.inference.base import PredictionResult
from PIL import Image

from curation.shared import batches, scored_set
from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import read_shard
from curation.shared.corpus_writers import open_shard_writer
from curation.shared.errors import CorpusError
from curation.shared.manifest import DEAD_LETTER_PREFIX, MANIFEST_NAME, Manifest, ScoredShardsError
from models import checkpoint
from pipelines import corpus_io, manifest_sink, options, score, stages
from pipelines.jax_inference import PreparedExample, ReferenceEmbeddings
from pipelines.references import LossParameters

SCORED = "scored"
SUFFIX = {"wds": "tar", "parquet": "parquet"}
POISON = "~"  # the fuzz runs' reference embeds this caption character as NaN


# --- the fuzzed corpus ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    key: str
    image: bytes
    caption: str | bytes
    allowed: frozenset  # SCORED or dead-letter reasons: what may become of the record


def case(key: str, image: bytes, caption: str | bytes = "a photo of a thing", *allowed: str) -> Case:
    return Case(key, image, caption, frozenset(allowed or (SCORED,)))


def encoded(image: Image.Image, format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **kwargs)
    return buffer.getvalue()


def photo(width: int, height: int, seed: int = 0, noise: int = 40) -> Image.Image:
    """A gradient with noise, so that every format compresses it into many bytes worth damaging."""
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // max(width, 1), yy * 255 // max(height, 1), (xx + yy) % 256], -1)
    pixels = pixels + np.random.default_rng(seed).integers(0, noise + 1, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_rgb48(width: int, height: int) -> bytes:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one)."""
    rows = np.random.default_rng(1).integers(0, 65536, (height, width * 3)).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def bombs() -> dict[str, bytes]:
    """Small files whose headers claim billions of pixels."""
    small = photo(16, 16)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 2, 0, 0, 0))
        + png_chunk(b"IDAT", zlib.compress(b""))
        + png_chunk(b"IEND", b"")
    )
    gif = encoded(small, "GIF")
    jpeg = encoded(small, "JPEG")
    sof = jpeg.index(b"\xff\xc0")
    webp = encoded(small, "WEBP")
    frame = webp.index(b"\x9d\x01\x2a")  # VP8 key frame start code, then 14-bit width and height
    return {
        "png": png,
        "gif": gif[:6] + struct.pack("<HH", 65535, 65535) + gif[10:],
        "jpeg": jpeg[: sof + 5] + struct.pack(">HH", 60000, 60000) + jpeg[sof + 9 :],
        "webp": webp[: frame + 3] + struct.pack("<HH", 16383, 16383) + webp[frame + 7 :],
    }


def fuzz_cases() -> list[Case]:
    rng = np.random.default_rng(7)
    good = {
        "jpeg": encoded(photo(48, 40, 1), "JPEG"),
        "png": encoded(photo(48, 40, 2), "PNG"),
        "webp": encoded(photo(48, 40, 3), "WEBP"),
    }
    cases = [case("duplicate-far", good["png"], "the first of two")]
    cases += [case(f"ok-{name}", data) for name, data in good.items()]
    for name, data in good.items():
        for i in range(2):
            cut = int(rng.integers(len(data) // 10, len(data) * 9 // 10))
            cases.append(case(f"truncated-{name}-{i}", data[:cut], "cut short", "corrupt_image"))
            flipped = bytearray(data)
            for position in rng.integers(len(data) // 4, len(data), 3):
                flipped[position] ^= 1 << int(rng.integers(0, 8))
            cases.append(case(f"bitflip-{name}-{i}", bytes(flipped), "flipped bits", SCORED, "corrupt_image"))
    cases += [case(f"bomb-{name}", data, "a bomb", "decompression_bomb") for name, data in bombs().items()]
    red, blue = Image.new("RGB", (24, 20), (255, 0, 0)), Image.new("RGB", (24, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6
    transparent = photo(24, 20, 4).convert("P")
    transparent.info["transparency"] = 0
    cases += [
        case("empty-image", b"", "nothing", "empty_image"),
        case("html", b"<!doctype html><html><body>404 Not Found</body></html>", "a page", "not_an_image"),
        case("random-bytes", b"\x00" + rng.bytes(300), "noise", "not_an_image"),
        case("postscript", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n", "eps", "not_an_image"),
        case("huge-dimensions", encoded(photo(2200, 2000, noise=0), "JPEG", quality=30), "big", "decompression_bomb"),
        case("tiny-1x1", encoded(Image.new("RGB", (1, 1)), "PNG"), "a dot", "image_too_small"),
        case("long-strip", encoded(photo(1200, 8), "PNG"), "a strip"),
        case("cmyk", encoded(photo(32, 32).convert("CMYK"), "JPEG"), "cmyk"),
        case(
            "grey-16bit",
            encoded(Image.fromarray(np.arange(40 * 32, dtype=np.uint16).reshape(32, 40) * 50), "PNG"),
            "sixteen bits",
        ),
        case("rgb-48bit", png_rgb48(20, 16), "sixteen bits a channel"),
        case("alpha-png", encoded(photo(32, 24).convert("RGBA"), "PNG"), "alpha"),
        case("alpha-webp", encoded(photo(32, 24).convert("RGBA"), "WEBP"), "alpha"),
        case("palette-transparent", encoded(transparent, "PNG"), "palette"),
        case("animated-gif", encoded(red, "GIF", save_all=True, append_images=[blue], duration=50), "moving"),
        case("animated-webp", encoded(red, "WEBP", save_all=True, append_images=[blue], duration=50), "moving"),
        case("exif-rotated", encoded(photo(30, 12), "JPEG", exif=exif.tobytes()), "turned"),
        case("caption-empty", good["png"], "", "empty_caption"),
        case("caption-blank", good["png"], " \t\n\u3000 ", "empty_caption"),
        case("caption-controls", good["png"], "\x00\x07\x1b", "empty_caption"),
        case("caption-too-long", good["png"], "word " * 300, "caption_too_long"),
        case("caption-at-limit", good["png"], "w" * 1000),
        case("caption-bad-utf8", good["png"], b"caf\xe9 au lait", "caption_not_utf8"),
        case("caption-messy", good["png"], "  a\tcat\x00 on\n\na   mat "),
        case("poisoned-caption-0", good["jpeg"], f"a tilde {POISON} here", "non_finite_embedding"),
        case("poisoned-caption-1", good["webp"], POISON, "non_finite_embedding"),
        case("duplicate", good["jpeg"], "the first of two"),
    ]
    # Keys again, right after their first sample and far from it: the reader dead-letters the second ones.
    return cases + [
        case("duplicate", good["png"], "the second of two", "duplicate_key"),
        case("duplicate-far", good["jpeg"], "the second of two", "duplicate_key"),
    ]


def hostile_tar(path: str) -> list[Case]:
    """A tar whose member names try to escape (.., absolute, a link) or are not UTF-8; what should become of each."""
    jpeg = encoded(photo(32, 32, 9), "JPEG")

    def add(tar: tarfile.TarFile, name: str, data: bytes = b"", **fields) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for field, value in fields.items():
            setattr(info, field, value)
        tar.addfile(info, io.BytesIO(data) if data else None)

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        add(tar, "../evil.txt", b"a caption that would land outside")
        add(tar, "/abs.jpg", jpeg)
        add(tar, "../../up/outside.jpg", jpeg)
        add(tar, "../../up/outside.txt", b"a caption")
        add(tar, "name-\udcff.jpg", jpeg)  # the raw byte 0xff: not UTF-8
        add(tar, "name-\udcff.txt", b"a caption")
        add(tar, "somedir", type=tarfile.DIRTYPE)
        add(tar, "link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "link.txt", b"a caption")
    outcomes = {
        "../evil": "missing_image",
        "/abs": "missing_caption",
        "../../up/outside": SCORED,
        "name-\ufffd": SCORED,
        "link": "missing_image",
    }  # the link member is skipped: no image
    return [Case(key, b"", "", frozenset({outcome})) for key, outcome in outcomes.items()]


def write_fuzz_corpus(directory: Path, format: str) -> list[Case]:
    """The fuzzed records in one shard of `format`; for wds also the hostile tar."""
    directory.mkdir(parents=True)
    cases = fuzz_cases()
    with open_shard_writer(str(directory / f"fuzz.{SUFFIX[format]}"), format) as writer:
        for item in cases:
            writer.write(CorpusRecord(item.key, item.image, item.caption, "", {"case": item.key}))
    if format == "wds":
        cases += hostile_tar(str(directory / "hostile.tar"))
    return cases


def poisoned_reference(source: str, path: str) -> str:
    """A copy of the reference whose token embedding of POISON is NaN: exactly the captions holding it embed as NaN."""
    restored = checkpoint.restore(source)
    params = dict(restored.params)
    text = dict(params["text_tower"])
    table = text["token_embedding"]["embedding"]
    text["token_embedding"] = {"embedding": jnp.asarray(table).at[ord(POISON) + 3].set(jnp.nan)}  # bytes start at 3
    params["text_tower"] = text
    checkpoint.save(path, params, restored.config, restored.tokenizer)
    return path


# --- reading a run back ---------------------------------------------------------------------------------------------


def manifest_of(summary: dict) -> Manifest:
    return next(
        m
        for m in batches.read_manifests(posixpath.dirname(summary["batch_dir"]))
        if m.batch_dir == summary["batch_dir"]
    )


def dead_letter(batch_dir: str) -> list[dict]:
    paths = glob.glob(os.path.join(batch_dir, f"{DEAD_LETTER_PREFIX}-*.parquet"))
    return [row for path in paths for row in pq.read_table(path).to_pylist()]


def scored_rows(manifest: Manifest) -> dict[str, dict]:
    """key -> scored row, embeddings as float16 arrays; asserts no key is scored twice."""
    rows = [row for path in manifest.shard_paths("parquet") for row in pq.read_table(path).to_pylist()]
    keyed = {row["key"]: row for row in rows}
    assert len(keyed) == len(rows), "a key is scored twice"
    for row in keyed.values():
        for name in ("ref_image_embedding", "ref_text_embedding"):
            row[name] = np.asarray(row[name], np.float16)
    return keyed


def exact(rows: dict[str, dict]) -> dict[str, tuple]:
    """Every column of every row, embeddings as their bytes: equal only when byte-identical."""
    return {
        key: tuple(value.tobytes() if isinstance(value, np.ndarray) else value for value in row.values())
        for key, row in sorted(rows.items())
    }


def check_outcomes(cases: list[Case], manifest: Manifest) -> None:
    """Each case became exactly one of what it allows, and nothing else came out."""
    observed = collections.Counter(
        [(key, SCORED) for key in scored_rows(manifest)]
        + [(row["key"], row["reason"]) for row in dead_letter(manifest.batch_dir)]
    )
    for item in cases:
        hit = sorted(outcome for outcome in item.allowed if observed[(item.key, outcome)] > 0)
        assert hit, (
            f"{item.key!r}: expected one of {sorted(item.allowed)}, got "
            f"{[outcome for (key, outcome), n in observed.items() if key == item.key and n > 0]}"
        )
        observed[(item.key, hit[0])] -= 1
    assert +observed == collections.Counter(), f"outcomes no case expects: {+observed}"


@pytest.fixture(scope="module")
def nan_reference(reference_checkpoint, tmp_path_factory) -> str:
    return poisoned_reference(reference_checkpoint, str(tmp_path_factory.mktemp("poisoned") / "model"))


def fuzz_args(corpus: Path, format: str, output: str, reference: str, *extra: str) -> list[str]:
    return [
        f"--input={corpus}/*.{SUFFIX[format]}",
        f"--input_format={format}",
        f"--output={output}",
        f"--reference_checkpoint={reference}",
        "--max_image_pixels=4000000",
        "--inference_batch_size=16",
        *extra,
    ]


@pytest.fixture(scope="module", params=["wds", "parquet"])
def fuzz_run(request, nan_reference, tmp_path_factory):
    """(cases, manifest, working directory) of the job over the fuzzed corpus, run from an empty directory."""
    root = tmp_path_factory.mktemp(f"fuzz_{request.param}")
    cases = write_fuzz_corpus(root / "corpus", request.param)
    workdir = root / "work" / "deeper"
    workdir.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)  # where a relative "../evil.txt" would land, were anything extracted
        summary = score.run(fuzz_args(root / "corpus", request.param, str(root / "out"), nan_reference))
    return cases, manifest_of(summary), root


def test_fuzzed_corpus_every_record_is_scored_or_dead_lettered_with_its_reason(fuzz_run):
    cases, manifest, _ = fuzz_run
    check_outcomes(cases, manifest)
    assert len(cases) >= 40


def test_fuzzed_corpus_counts_add_up_per_reason(fuzz_run):
    cases, manifest, _ = fuzz_run
    counts, dead = manifest.counts, dead_letter(manifest.batch_dir)
    assert counts.read == len(cases) == counts.scored + counts.dead_lettered
    assert counts.scored == len(scored_rows(manifest))
    assert counts.dead_letter == dict(collections.Counter(row["reason"] for row in dead))
    stages = {
        "read": {"duplicate_key", "missing_image", "missing_caption"},
        "embed": {"non_finite_embedding"},
        "caption": {"empty_caption", "caption_too_long", "caption_not_utf8"},
        "decode": {"empty_image", "not_an_image", "corrupt_image", "decompression_bomb", "image_too_small"},
    }
    assert all(row["reason"] in stages[row["stage"]] and row["message"] and row["source"] for row in dead), dead
    assert len({row["reason"] for row in dead}) >= 10


def test_non_finite_embeddings_go_to_the_dead_letter_never_to_a_scored_shard(fuzz_run):
    _, manifest, _ = fuzz_run
    poisoned = [row for row in dead_letter(manifest.batch_dir) if row["reason"] == "non_finite_embedding"]
    assert sorted(row["key"] for row in poisoned) == ["poisoned-caption-0", "poisoned-caption-1"]
    assert all(row["stage"] == "embed" and "ref_text_embedding" in row["message"] for row in poisoned)
    assert manifest.counts.dead_letter["non_finite_embedding"] == 2
    for row in scored_rows(manifest).values():
        values = [row["ref_image_embedding"], row["ref_text_embedding"], row["ref_cosine"], row["ref_loss"]]
        assert all(np.isfinite(value).all() for value in values), row["key"]


def test_score_or_dead_letter_catches_nan_and_inf():
    example = PreparedExample(
        "k", "shard.tar", "a caption", b"", np.zeros((4, 4, 3), np.uint8), np.zeros(4, np.int32), {}
    )
    unit = np.ones(8, np.float32) / np.sqrt(8)

    def score_of(image, text):
        embedded = ("k", PredictionResult(example, ReferenceEmbeddings(image, text)))
        return stages.score_or_dead_letter(embedded, "sigmoid", LossParameters(10.0, -10.0))

    row = score_of(unit, unit)
    assert row["ref_cosine"] == pytest.approx(1.0, abs=1e-3)
    for image, text, bad in [
        (np.full(8, np.nan, np.float32), unit, "ref_image_embedding"),
        (unit, np.where(np.arange(8) == 3, np.inf, unit).astype(np.float32), "ref_text_embedding"),
        (unit * 1e6, unit, "ref_image_embedding"),
    ]:  # finite in float32, Inf in float16
        error = score_of(image, text)
        assert isinstance(error, CorpusError) and error.reason == "non_finite_embedding" and error.stage == "embed"
        assert bad in error.message and error.key == "k" and error.source == "shard.tar"


@pytest.mark.parametrize("fuzz_run", ["wds"], indirect=True)  # the hostile tar is in the wds corpus
def test_a_hostile_tar_is_read_in_memory_and_nothing_lands_on_disk(fuzz_run, tmp_path, monkeypatch):
    _, manifest, root = fuzz_run
    workdir = tmp_path / "a" / "b"
    workdir.mkdir(parents=True)
    monkeypatch.chdir(workdir)
    before = sorted(tmp_path.rglob("*"))
    items = list(read_shard(str(root / "corpus" / "hostile.tar"), "wds"))
    assert sorted(tmp_path.rglob("*")) == before
    assert [(item.key, getattr(item, "reason", SCORED)) for item in items] == [
        ("../evil", "missing_image"),
        ("/abs", "missing_caption"),
        ("../../up/outside", SCORED),
        ("name-\ufffd", SCORED),
        ("link", "missing_image"),
    ]
    # ... and the job run over it (from root/work/deeper) wrote nothing outside its output either.
    for name in ("evil.txt", "abs.jpg", "outside.jpg", "outside.txt", "passwd"):
        assert not list(root.rglob(name)) and not list(root.parent.glob(name)), name
    assert not os.path.exists("/abs.jpg") and not os.path.exists("/up/outside.jpg")
    assert scored_rows(manifest)["name-\ufffd"]["source"] == str(root / "corpus" / "hostile.tar")


def test_a_wds_sample_repeated_right_after_itself_is_a_duplicate_not_merged_into_the_first(tmp_path):
    path = str(tmp_path / "repeat.tar")
    with open_shard_writer(path, "wds") as writer:
        for caption in ("first", "second"):
            writer.write(CorpusRecord("k", encoded(photo(16, 16), "PNG"), caption, "", {}))
    first, second = read_shard(path, "wds")
    assert isinstance(first, CorpusRecord) and first.caption == "first" and first.metadata == {}
    assert isinstance(second, CorpusError) and (second.key, second.reason) == ("k", "duplicate_key")


def test_an_input_shard_whose_name_is_not_utf8_is_refused_before_the_job(reference_checkpoint, tmp_path):
    (tmp_path / "fine.tar").write_bytes(b"")
    (tmp_path / "bad-\udcff.tar").write_bytes(b"")  # the raw byte 0xff in a local file name
    with pytest.raises(SystemExit, match=r"must be UTF-8; rename .*bad-\\udcff\.tar"):
        score.run(
            [
                f"--input={tmp_path}/*.tar",
                f"--output={tmp_path / 'out'}",
                f"--reference_checkpoint={reference_checkpoint}",
            ]
        )


@pytest.mark.parametrize("fuzz_run", ["parquet"], indirect=True)
def test_max_bad_fraction_fails_after_writing_the_dead_letter_and_writes_no_manifest(fuzz_run, nan_reference, tmp_path):
    _, finished, root = fuzz_run
    dead = finished.counts.dead_lettered
    read = finished.counts.read
    output = str(tmp_path / "out")
    with pytest.raises(Exception, match=rf"{dead} of {read} records .* over --max_bad_fraction=0.5") as failure:
        score.run(fuzz_args(root / "corpus", "parquet", output, nan_reference, "--max_bad_fraction=0.5"))
    assert dead / read > 0.5
    assert "no manifest was written" in str(failure.value)
    (batch_dir,) = glob.glob(os.path.join(output, "batch-*"))
    assert not os.path.exists(os.path.join(batch_dir, MANIFEST_NAME))
    assert sorted((row["key"], row["reason"]) for row in dead_letter(batch_dir)) == sorted(
        (row["key"], row["reason"]) for row in dead_letter(finished.batch_dir)
    )  # nothing lost
    assert batches.read_manifests(output) == []
    assert batches.unfinished_batches(output) == [batch_dir]
    with pytest.raises(ScoredShardsError, match="no scored batch"):
        scored_set.open_scored(output)


def test_check_bad_fraction_boundaries():
    manifest_sink.check_bad_fraction(10, 5, 0.5)  # at the limit: passes
    manifest_sink.check_bad_fraction(0, 0, 0.0)  # nothing read
    manifest_sink.check_bad_fraction(10, 10, 1.0)  # the default never fails
    with pytest.raises(manifest_sink.TooManyBadRecords, match="6 of 10 records"):
        manifest_sink.check_bad_fraction(10, 6, 0.5)
    with pytest.raises(SystemExit):
        options.build_parser().parse_args(
            ["--input=x", "--output=y", "--reference_checkpoint=z", "--max_bad_fraction=1.5"]
        )


def test_a_reference_with_a_non_finite_temperature_is_refused(reference_checkpoint, tmp_path):
    restored = checkpoint.restore(reference_checkpoint)
    broken = str(tmp_path / "model")
    checkpoint.save(
        broken, {**restored.params, "log_temperature": jnp.full((1,), jnp.nan)}, restored.config, restored.tokenizer
    )
    with pytest.raises(SystemExit, match="non-finite temperature"):
        score.run(["--input=unused/*.tar", f"--output={tmp_path / 'out'}", f"--reference_checkpoint={broken}"])
    assert not (tmp_path / "out").exists()


# --- killed, re-run, and determinism on a clean corpus -------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_corpus(tmp_path_factory) -> str:
    """3 wds shards of 10 records each, one of them with an empty caption (so each run has a dead letter)."""
    root = tmp_path_factory.mktemp("clean")
    for shard in range(3):
        with open_shard_writer(str(root / f"{shard:05d}.tar"), "wds") as writer:
            for i in range(10):
                image = encoded(photo(40, 36, seed=shard * 100 + i), "JPEG" if i % 2 else "PNG")
                writer.write(
                    CorpusRecord(f"s{shard}-{i:02d}", image, "" if i == 5 else f"shard {shard} item {i}", "", {"i": i})
                )
    return str(root)


def clean_args(corpus: str, output, reference: str, *extra: str) -> list[str]:
    return [f"--input={corpus}/*.tar", f"--output={output}", f"--reference_checkpoint={reference}", *extra]


@pytest.fixture(scope="module")
def baseline(clean_corpus, reference_checkpoint, tmp_path_factory) -> Manifest:
    output = tmp_path_factory.mktemp("baseline") / "out"
    return manifest_of(score.run(clean_args(clean_corpus, output, reference_checkpoint, "--inference_batch_size=64")))


@pytest.fixture(scope="module")
def killed_and_rerun(clean_corpus, reference_checkpoint, tmp_path_factory):
    """(output, the killed run's batch folder, the manifests read after the kill, the re-run's manifest): the first
    run dies reading its 3rd shard."""
    output = str(tmp_path_factory.mktemp("killed") / "out")
    real_read_shard, shards_started = corpus_io.read_whole_shard, []

    def dies_on_the_third_shard(path, *args, **kwargs):
        shards_started.append(path)
        if len(shards_started) == 3:
            raise RuntimeError(f"injected fault: worker killed reading {path}")
        return real_read_shard(path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(corpus_io, "read_whole_shard", dies_on_the_third_shard)
        with pytest.raises(Exception, match="injected fault"):  # small batches: rows reach the writers before
            score.run(
                clean_args(
                    clean_corpus,
                    output,
                    reference_checkpoint,
                    "--inference_batch_size=7",
                    "--output_format=parquet,tfrecord",
                )
            )
    assert len(shards_started) == 3
    (killed,) = glob.glob(os.path.join(output, "batch-*"))
    after_kill = batches.read_manifests(output)
    rerun = score.run(
        clean_args(
            clean_corpus,
            output,
            reference_checkpoint,
            "--inference_batch_size=64",
            "--num_output_shards=3",
            "--incremental",
        )
    )
    return output, killed, after_kill, manifest_of(rerun)


def test_a_killed_run_is_never_read_and_its_rerun_equals_an_uninterrupted_run(killed_and_rerun, baseline):
    output, killed, after_kill, rerun = killed_and_rerun
    assert after_kill == []
    assert os.path.isdir(killed) and not os.path.exists(os.path.join(killed, MANIFEST_NAME))
    debris = [path for path in glob.glob(os.path.join(killed, "beam-temp-*", "*")) if os.path.getsize(path)]
    assert debris, os.listdir(killed)  # partly written shards
    assert batches.unfinished_batches(output) == [killed]
    assert len(rerun.input_shards) == 3  # --incremental did not take the killed run's shards as done
    scored = scored_set.open_scored(output)
    assert [m.batch_dir for m in scored.manifests] == [rerun.batch_dir]
    assert all(path.startswith(rerun.batch_dir + "/") for path in scored.shard_paths())
    assert len(rerun.shard_paths()) == 3 != len(baseline.shard_paths())
    assert exact(scored_rows(rerun)) == exact(scored_rows(baseline))  # same keys, byte-identical values
    assert len(scored_rows(rerun)) == rerun.counts.scored == 27
    assert rerun.counts == baseline.counts
    assert (baseline.counts.read, baseline.counts.scored, baseline.counts.dead_letter) == (30, 27, {"empty_caption": 3})


def test_clean_unfinished_removes_unfinished_batches_and_temporary_files_only(
    killed_and_rerun, reference_checkpoint, clean_corpus, tmp_path
):
    original, killed, _, rerun = killed_and_rerun
    output = tmp_path / "out"
    shutil.copytree(original, output)
    finished = output / posixpath.basename(rerun.batch_dir)
    (finished / f".{MANIFEST_NAME}.0123abcd.tmp").write_text("{}")
    (finished / "beam-temp-scored-0123").mkdir()
    (finished / "beam-temp-scored-0123" / "part").write_bytes(b"partial")
    (finished / "notes.txt").write_text("not ours to delete")
    running = output / "batch-29991231T000000Z-abcdef"  # a run started later than this one: left alone
    running.mkdir()
    summary = score.run(clean_args(clean_corpus, output, reference_checkpoint, "--incremental", "--clean_unfinished"))
    assert summary["batch_dir"] is None and summary["skipped_shards"] == 3
    assert sorted(os.listdir(output)) == sorted([posixpath.basename(rerun.batch_dir), running.name])
    assert sorted(os.listdir(finished)) == sorted(
        rerun.shards + rerun.dead_letter_shards + [MANIFEST_NAME, "notes.txt"]
    )
    assert os.path.exists(killed)  # the copy was cleaned, not the original
    assert scored_set.open_scored(str(output)).scored == 27


@pytest.fixture(scope="module")
def other_batch_sizes(clean_corpus, reference_checkpoint, tmp_path_factory) -> dict[int, Manifest]:
    root = tmp_path_factory.mktemp("batch_sizes")
    return {
        size: manifest_of(
            score.run(
                clean_args(
                    clean_corpus,
                    root / f"bs{size}",
                    reference_checkpoint,
                    f"--inference_batch_size={size}",
                    f"--num_output_shards={shards}",
                )
            )
        )
        for size, shards in ((1, 1), (7, 2))
    }


@pytest.mark.parametrize("batch_size", [1, 7])
def test_another_inference_batch_size_scores_the_same_within_one_float16_step(other_batch_sizes, baseline, batch_size):
    """XLA's kernels for another batch shape may round differently: at one size runs are byte-identical (above),
    across sizes every embedding value is within one float16 step and everything else is identical."""
    other, reference = scored_rows(other_batch_sizes[batch_size]), scored_rows(baseline)
    assert sorted(other) == sorted(reference) and other_batch_sizes[batch_size].counts == baseline.counts
    for name in ("caption", "image", "source", "metadata"):
        assert {key: row[name] for key, row in other.items()} == {key: row[name] for key, row in reference.items()}

    def column(rows: dict[str, dict], name: str) -> np.ndarray:
        return np.stack([rows[key][name] for key in sorted(reference)])

    for name in ("ref_image_embedding", "ref_text_embedding"):
        got, expected = column(other, name), column(reference, name)  # [N, d] float16
        step = np.spacing(np.maximum(np.abs(got), np.abs(expected)))
        assert (np.abs(got.astype(np.float32) - expected) <= step).all(), name
        assert (got == expected).mean() >= 0.95, name  # mostly not even a step
    np.testing.assert_allclose(column(other, "ref_loss"), column(reference, "ref_loss"), rtol=1e-2, atol=1e-3)


def test_readers_read_only_what_the_manifest_lists(other_batch_sizes, baseline):
    manifest = other_batch_sizes[1]
    assert len(manifest.shard_paths()) == 1
    listed = scored_set.open_scored(posixpath.dirname(manifest.batch_dir)).shard_paths()
    stale = os.path.join(manifest.batch_dir, "scored-00000-of-00002.parquet")  # left by an older layout
    shutil.copy(baseline.shard_paths()[0], stale)
    temporary = os.path.join(manifest.batch_dir, "beam-temp-scored-1", "part.parquet")
    os.makedirs(os.path.dirname(temporary))
    shutil.copy(baseline.shard_paths()[0], temporary)
    unfinished = posixpath.join(posixpath.dirname(manifest.batch_dir), "batch-20000101T000000Z-000000")
    os.makedirs(unfinished)  # a manifest that was never renamed into place
    shutil.copy(
        os.path.join(baseline.batch_dir, MANIFEST_NAME), os.path.join(unfinished, f".{MANIFEST_NAME}.0123abcd.tmp")
    )
    shutil.copy(baseline.shard_paths()[0], os.path.join(unfinished, "scored-00000-of-00001.parquet"))
    try:
        reread = scored_set.open_scored(posixpath.dirname(manifest.batch_dir))
        assert [m.batch_dir for m in reread.manifests] == [manifest.batch_dir]
        assert reread.shard_paths() == listed == manifest.shard_paths()
        assert stale not in reread.shard_paths() and reread.scored == 27
    finally:
        os.remove(stale)
        shutil.rmtree(os.path.dirname(temporary))
        shutil.rmtree(unfinished)
