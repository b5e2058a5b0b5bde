import glob
import io
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import iter_corpus
from demo import make_corpus, scenes
from demo.make_corpus import write_corpus
from demo.noise import NoiseRates

SIZE = 60
# Higher than the defaults so that a tiny corpus holds every noise kind (3 of each broken kind).
RATES = NoiseRates(
    misaligned=0.2,
    boilerplate=0.1,
    near_duplicate=0.1,
    degraded=0.1,
    truncated_image=0.05,
    non_image=0.05,
    empty_caption=0.05,
    long_caption=0.05,
    bad_utf8=0.05,
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(make_corpus.__file__)))
KWARGS = dict(noise=RATES, curated_size=10, eval_size=12, shard_size=25)


@pytest.fixture(scope="module", params=["wds", "parquet", "tfrecord"])
def tiny_corpus(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"corpus_{request.param}"))
    summary = write_corpus(out, SIZE, request.param, seed=3, **KWARGS)
    return out, request.param, summary


def split_files(out: str, summary: dict, split: str) -> list[str]:
    return [os.path.join(out, shard) for shard in summary["splits"][split]["shards"]]


def read_split(out: str, format: str, split: str) -> list[CorpusRecord]:
    return list(iter_corpus(os.path.join(out, split, "*"), format))


def decodes(image: bytes) -> bool:
    try:
        Image.open(io.BytesIO(image)).load()
        return True
    except Exception:
        return False


def test_summary_lists_every_split_with_its_shards_and_counts(tiny_corpus):
    out, format, summary = tiny_corpus
    assert json.load(open(os.path.join(out, "_SPLITS.json"))) == summary
    counts = {split: info["count"] for split, info in summary["splits"].items()}
    assert counts == {"web": SIZE, "curated": 10, "eval/zeroshot": 12, "eval/retrieval": 12}
    assert len(summary["splits"]["web"]["shards"]) == 3  # 25 + 25 + 10
    for split, info in summary["splits"].items():
        assert sorted(glob.glob(os.path.join(out, info["pattern"]))) == split_files(out, summary, split)
        assert len(read_split(out, format, split)) == info["count"]


def test_broken_records_reach_the_reader_as_records_and_counts_add_up(tiny_corpus):
    out, format, summary = tiny_corpus
    items = read_split(out, format, "web")
    assert all(isinstance(r, CorpusRecord) for r in items) and len(items) == SIZE
    truth = Counter(r.metadata["truth"] for r in items)
    expected = {kind: round(rate * SIZE) for kind, rate in RATES.as_dict().items()}
    copies = expected.pop("near_duplicate")  # correctly captioned copies of clean images: clean, and redundant
    expected["clean"] = SIZE - sum(expected.values())
    assert truth == expected == summary["splits"]["web"]["truth"]
    by_kind = {kind: [r for r in items if r.metadata["truth"] == kind] for kind in expected}
    by_kind["near_duplicate"] = [r for r in items if r.metadata["detail"] == "near_copy"]
    assert len(by_kind["near_duplicate"]) == copies
    assert all(r.caption == "" for r in by_kind["empty_caption"])
    assert all(isinstance(r.caption, bytes) for r in by_kind["bad_utf8"])
    assert all(isinstance(r.caption, str) and len(r.caption) > 5000 for r in by_kind["long_caption"])
    assert not any(decodes(r.image) for r in by_kind["truncated_image"] + by_kind["non_image"])
    for kind in ("clean", "misaligned", "boilerplate", "near_duplicate"):
        for record in by_kind[kind]:
            assert Image.open(io.BytesIO(record.image)).size == (64, 64) and decodes(record.image)
    assert all(decodes(r.image) for r in by_kind["degraded"])


def test_noise_is_what_the_hidden_truth_says(tiny_corpus):
    out, format, _ = tiny_corpus
    web = {r.key: r for r in read_split(out, format, "web")}
    settings = make_corpus.CorpusSettings(seed=3)
    for record in web.values():
        truth, related = record.metadata["truth"], record.metadata["related_key"]
        if record.metadata["detail"] == "near_copy":  # a copy of a clean image, off by a pixel shift and brightness
            source = web[related]
            assert truth == "clean" and source.metadata["truth"] == "clean" and not source.metadata["related_key"]
            assert {k: source.metadata[k] for k in ("shape", "colour", "difficulty", "frequency")} == {
                k: record.metadata[k] for k in ("shape", "colour", "difficulty", "frequency")
            }
        elif truth == "misaligned":  # the caption of another web image, of another shape or colour
            source = web[related]
            assert (source.metadata["shape"], source.metadata["colour"]) != (
                record.metadata["shape"],
                record.metadata["colour"],
            )
            assert record.caption == make_corpus.caption_of(settings, "web", int(related.split("-")[1]))
        elif truth == "boilerplate":
            assert not any(word in record.caption for word in scenes.SHAPES)
        else:
            assert related == ""
    clean = [r for r in web.values() if r.metadata["truth"] == "clean"]
    described = [r for r in clean if r.metadata["shape"] in r.caption or r.metadata["colour"] in r.caption]
    assert len(described) >= 0.8 * len(clean)


def test_curated_and_eval_splits_are_clean_disjoint_and_labelled(tiny_corpus):
    out, format, _ = tiny_corpus
    splits = {split: read_split(out, format, split) for split in make_corpus.SPLIT_IDS}
    keys = [r.key for records in splits.values() for r in records]
    assert len(keys) == len(set(keys))
    images = [r.image for split in ("curated", "eval/zeroshot", "eval/retrieval") for r in splits[split]]
    assert not set(images) & {r.image for r in splits["web"]}
    for split in ("curated", "eval/zeroshot", "eval/retrieval"):
        assert {r.metadata["truth"] for r in splits[split]} == {"clean"}
    classes = json.load(open(os.path.join(out, "eval", "classes.json")))
    assert classes["shape"]["classes"] == list(scenes.SHAPES)
    assert classes["colour"]["classes"] == list(scenes.COLOURS)
    for task in classes.values():
        assert task["templates"] and all("{}" in template for template in task["templates"])
    zeroshot = splits["eval/zeroshot"]
    assert [r.metadata["shape"] for r in zeroshot[:6]] == list(scenes.SHAPES)  # balanced over classes
    assert {r.metadata["colour"] for r in zeroshot} == set(list(scenes.COLOURS)[:2])
    for record in splits["eval/retrieval"]:
        assert record.metadata["shape"] in record.caption and record.metadata["colour"] in record.caption
        assert record.metadata["background"] in record.caption


def test_web_split_reads_with_plain_tools_without_our_code(tiny_corpus):
    out, format, summary = tiny_corpus
    files = split_files(out, summary, "web")
    ours = [
        (r.key, r.image, r.caption if isinstance(r.caption, bytes) else r.caption.encode(), r.metadata["truth"])
        for r in read_split(out, format, "web")
    ]
    if format == "parquet":
        import pyarrow.parquet as pq

        table = pq.ParquetDataset(files).read()
        assert {"key", "image", "caption", "truth", "shape", "colour"} <= set(table.column_names)
        theirs = list(zip(*(table.column(name).to_pylist() for name in ("key", "image", "caption", "truth"))))
    elif format == "tfrecord":
        import tensorflow as tf

        spec = {name: tf.io.FixedLenFeature([], tf.string) for name in ("key", "image/encoded", "caption", "truth")}
        theirs = [
            tuple(example[name].numpy() for name in spec)
            for example in tf.data.TFRecordDataset(files).map(lambda data: tf.io.parse_single_example(data, spec))
        ]
        theirs = [(key.decode(), image, caption, truth.decode()) for key, image, caption, truth in theirs]
    else:
        import webdataset as wds

        theirs = [
            (sample["__key__"], sample.get("jpg"), sample["txt"], json.loads(sample["json"])["truth"])
            for sample in wds.WebDataset(files, shardshuffle=False, empty_check=False)
        ]
    assert theirs == ours


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def files(out):
        return {os.path.relpath(p, out): open(p, "rb").read() for p in glob.glob(f"{out}/**/*.*", recursive=True)}

    first = write_corpus(str(tmp_path / "a"), 30, "wds", seed=1, **KWARGS)
    write_corpus(str(tmp_path / "b"), 30, "wds", seed=1, **KWARGS)
    write_corpus(str(tmp_path / "c"), 30, "wds", seed=2, **KWARGS)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == len(first["splits"]["web"]["shards"]) + 3 + 2 and a == b
    assert a["web/00000.tar"] != c["web/00000.tar"]


def test_command_line_with_rate_flags_and_workers_matches_the_api(tmp_path):
    out = tmp_path / "cli"
    command = [
        sys.executable,
        "-m",
        "demo.make_corpus",
        "--out",
        str(out),
        "--size",
        "40",
        "--format",
        "parquet",
        "--seed",
        "5",
        "--curated_size",
        "4",
        "--eval_size",
        "6",
        "--workers",
        "2",
        "--boilerplate_rate",
        "0",
        "--misaligned_rate",
        "0.5",
        "--image_format",
        "png",
        "--no_progress",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert "wrote web 40" in done.stdout
    truth = json.load(open(out / "_SPLITS.json"))["splits"]["web"]["truth"]
    assert "boilerplate" not in truth and truth["misaligned"] == 20
    same = write_corpus(
        str(tmp_path / "api"),
        40,
        "parquet",
        5,
        curated_size=4,
        eval_size=6,
        image_format="png",
        noise=NoiseRates(boilerplate=0, misaligned=0.5),
    )
    assert same["splits"]["web"]["truth"] == truth
    assert (out / "web/00000.parquet").read_bytes() == (tmp_path / "api/web/00000.parquet").read_bytes()
    record = next(iter_corpus(str(out / "curated/*"), "parquet"))
    assert record.image.startswith(b"\x89PNG")


def test_bad_settings_fail_fast(tmp_path):
    with pytest.raises(ValueError, match="add up"):
        NoiseRates(misaligned=0.6, boilerplate=0.5)
    with pytest.raises(ValueError, match="outside"):
        NoiseRates(degraded=-0.1)
    with pytest.raises(ValueError, match="unknown corpus format"):
        write_corpus(str(tmp_path), 10, "zip")
    with pytest.raises(ValueError, match="image_format"):
        write_corpus(str(tmp_path), 10, "wds", image_format="gif")
    write_corpus(str(tmp_path / "x"), 10, "wds", eval_size=2)
    with pytest.raises(FileExistsError, match="already holds"):
        write_corpus(str(tmp_path / "x"), 10, "wds", eval_size=2)
    summary = write_corpus(str(tmp_path / "x"), 10, "wds", eval_size=2, shard_size=4, overwrite=True)
    assert sorted(os.listdir(tmp_path / "x" / "web")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert summary["splits"]["web"]["count"] == 10


def test_web_concepts_are_long_tailed_and_clean_examples_graded():
    """Drawn as the default corpus draws them (scenes only, nothing rendered): the web split's concepts follow their
    Zipf ranking, head concepts taking about half the examples; the curated split covers concepts evenly; each
    difficulty comes at its share, and a hard scene is tiny, cluttered and finished."""
    settings = make_corpus.CorpusSettings(seed=0)
    ranked, _, frequency = make_corpus.concept_plan(0)
    web = [make_corpus.scene_of(settings, "web", i) for i in range(6000)]
    counts = Counter((s.shape, s.colour) for s in web)
    assert counts[ranked[0]] > 5 * counts[ranked[-1]] and counts[ranked[0]] > 0.15 * len(web)
    head = sum(counts[c] for c in ranked if frequency[c] == "head") / len(web)
    assert 0.45 < head < 0.55 and set(frequency.values()) == {"head", "torso", "tail"}
    curated = Counter((s.shape, s.colour) for s in (make_corpus.scene_of(settings, "curated", i) for i in range(4800)))
    assert len(curated) == 48 and max(curated.values()) < 2.0 * min(curated.values())
    difficulty = Counter(s.difficulty for s in web)
    for name, share in scenes.DIFFICULTIES.items():
        assert abs(difficulty[name] / len(web) - share) < 0.03
    hard = [s for s in web if s.difficulty == "hard"]
    assert all(s.size == "tiny" and len(s.clutter) >= 2 and s.finish in scenes.FINISHES for s in hard)
    assert not any(s.clutter or s.finish for s in web if s.difficulty != "hard")
    zeroshot = [make_corpus.scene_of(settings, "eval/zeroshot", i) for i in range(48)]
    assert {s.difficulty for s in zeroshot} == {"medium"}


def test_no_evaluation_scene_is_a_near_copy_of_a_training_scene():
    """At the demo's sizes some first draws of evaluation scenes are near copies of a web or curated scene; each is
    drawn again until it is not."""
    settings = make_corpus.CorpusSettings(seed=0)
    counts = {"web": 10000, "curated": 8000, "eval/zeroshot": 500, "eval/retrieval": 500}
    attempts = make_corpus.eval_attempts(settings, counts)
    assert any(attempts["eval/zeroshot"] + attempts["eval/retrieval"])  # the first draw would have been a copy
    training = [make_corpus.scene_of(settings, split, i) for split in ("web", "curated") for i in range(counts[split])]
    by_key = {}
    for scene in training:
        by_key.setdefault(scenes.near_copy_key(scene), []).append(scene)
    for split in ("eval/zeroshot", "eval/retrieval"):
        for index, attempt in enumerate(attempts[split]):
            scene = make_corpus.scene_of(settings, split, index, attempt)
            assert not any(scenes.near_copy(scene, other, 64) for other in by_key.get(scenes.near_copy_key(scene), []))
            if attempt:
                first = make_corpus.scene_of(settings, split, index)
                assert any(scenes.near_copy(first, other, 64) for other in by_key[scenes.near_copy_key(first)])
