"""Procedural scenes for the demo corpus: one main shape on a textured background, rendered with PIL.

The vocabulary is small and visually clear (6 shapes x 8 colours) and most scenes are easy or medium, so that a
tiny model trained for minutes on the clean split is well above chance at zero-shot shape and colour
classification: the demo's reference (1,000 steps, about 4.5 minutes on 2 CPU cores) ends at colour 1.000 against
chance 0.125 and shape 0.626 against chance 0.167. Colour is learnt first and by every model; shape is what
separates them. Everything is a pure function of a `numpy.random.Generator`, so a scene, its caption and its pixels
are reproducible from a seed.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 225, 40),
    "green": (40, 170, 60),
    "cyan": (30, 200, 210),
    "blue": (35, 70, 215),
    "purple": (135, 50, 185),
    "pink": (250, 125, 195),
}
SIZES = {"tiny": 0.2, "small": 0.27, "medium": 0.33, "large": 0.39}  # radius as a fraction of the image side
BACKGROUNDS = ("plain", "gradient", "striped", "checkered", "grainy")
# How hard a clean example is to read, and what makes it so (`sample_scene`): easy ones are large, centred and
# upright on a quiet background; medium ones vary in size, place, tilt and background (every scene of the
# evaluation splits is medium); hard ones are tiny, off-centre and tilted further, among grey distractor shapes on a
# busy background, and slightly blurred or grainy: hard but learnable, the examples learnability exists to find.
DIFFICULTIES = {"easy": 0.45, "medium": 0.45, "hard": 0.10}  # shares of the web and curated splits
LAYOUTS = {  # sizes, largest offset of the centre (fraction of the side), largest tilt (degrees), backgrounds
    "easy": (("medium", "large"), 0.05, 8.0, ("plain", "gradient")),
    "medium": (("small", "medium", "large"), 0.12, 15.0, BACKGROUNDS),
    "hard": (("tiny",), 0.2, 40.0, ("striped", "checkered", "grainy")),
}
FINISHES = ("blur", "grain")  # a hard example's mild degradation
IMAGE_FORMATS = ("jpeg", "png")
SUPERSAMPLE = 4  # shapes are drawn at 4x and downsampled: smooth edges at 64 px


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str
    background: str
    dx: float  # offset of the shape's centre from the image centre, as a fraction of the side
    dy: float
    angle: float  # rotation in degrees
    grey: int  # background base level, 0-255
    accent: tuple[str, str] | None = None  # a small second (shape, colour), or none
    difficulty: str = "medium"  # a key of DIFFICULTIES
    clutter: tuple[tuple[str, float, float, int], ...] = ()  # grey distractors: (shape, x, y, grey level)
    finish: str = ""  # "", or one of FINISHES

    @property
    def position(self) -> str:
        """Where the shape is, in words: "centre", "left", "top right", ..."""
        vertical = "top" if self.dy < -0.06 else "bottom" if self.dy > 0.06 else ""
        horizontal = "left" if self.dx < -0.06 else "right" if self.dx > 0.06 else ""
        return " ".join(part for part in (vertical, horizontal) if part) or "centre"

    @property
    def where(self) -> str:
        """The position as a phrase: "in the centre", "on the left", "at the top", "in the top right"."""
        if self.position in ("left", "right"):
            return f"on the {self.position}"
        if self.position in ("top", "bottom"):
            return f"at the {self.position}"
        return f"in the {self.position}"


def sample_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    accent_rate: float = 0.15,
    difficulty: str = "medium",
) -> Scene:
    """A random scene of `difficulty` (LAYOUTS); `shape` and `colour` fix those attributes (for balanced evaluation
    sets and long-tailed concepts). Only medium scenes have an accent; only hard ones clutter and a finish."""
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    sizes, reach, tilt, backgrounds = LAYOUTS[difficulty]
    accent = None
    if difficulty == "medium" and rng.random() < accent_rate:
        accent = (
            SHAPES[rng.choice([i for i, s in enumerate(SHAPES) if s != shape])],
            list(COLOURS)[rng.choice([i for i, c in enumerate(COLOURS) if c != colour])],
        )
    size = sizes[rng.integers(len(sizes))]
    dx, dy = (float(v) for v in rng.uniform(-reach, reach, size=2))
    scene = Scene(
        shape=shape,
        colour=colour,
        size=size,
        background=backgrounds[rng.integers(len(backgrounds))],
        dx=dx,
        dy=dy,
        angle=float(rng.uniform(-tilt, tilt)),
        grey=int(rng.integers(40, 216)),
        accent=accent,
        difficulty=difficulty,
    )
    if difficulty != "hard":
        return scene
    return dataclasses.replace(
        scene, clutter=_clutter(rng, dx, dy, scene.grey), finish=FINISHES[rng.integers(len(FINISHES))]
    )


def _clutter(rng: np.random.Generator, dx: float, dy: float, grey: int) -> tuple[tuple[str, float, float, int], ...]:
    """2-3 small grey distractor shapes at places (fractions of the side) clear of the main shape at (dx, dy)."""
    items = []
    for _ in range(int(rng.integers(2, 4))):
        for _ in range(20):
            x, y = (float(v) for v in rng.uniform(0.12, 0.88, size=2))
            if math.hypot(x - 0.5 - dx, y - 0.5 - dy) > SIZES["tiny"] + CLUTTER_RADIUS + 0.03:
                break
        level = int(np.clip(grey + rng.choice([-1, 1]) * rng.integers(45, 80), 0, 255))
        items.append((SHAPES[rng.integers(len(SHAPES))], x, y, level))
    return tuple(items)


CLUTTER_RADIUS = 0.09  # a distractor's radius, as a fraction of the side


@functools.cache
def _unit_grid(side: int) -> np.ndarray:
    """[2, side, side] float32: the y and x coordinates of each pixel, in [0, 1)."""
    grid = np.mgrid[0:side, 0:side].astype(np.float32) / side
    grid.flags.writeable = False
    return grid


def _background(scene: Scene, side: int, rng: np.random.Generator) -> np.ndarray:
    """[side, side, 3] uint8 texture in muted greys, so the shape's colour stands out."""
    tint = rng.integers(-12, 13, size=3)
    base = np.clip(scene.grey + tint, 0, 255).astype(np.float32)
    other = np.clip(base + (70 if scene.grey < 128 else -70), 0, 255)
    y, x = _unit_grid(side)  # [side, side] each
    if scene.background == "plain":
        mix = np.zeros_like(x)
    elif scene.background == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        mix = (x * math.cos(theta) + y * math.sin(theta)) / math.sqrt(2) + 0.5
    elif scene.background == "striped":
        theta, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.2)
        mix = (((x * math.cos(theta) + y * math.sin(theta)) / period) % 1.0 < 0.5).astype(np.float32)
    elif scene.background == "checkered":
        cell = rng.uniform(0.1, 0.25)
        mix = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    else:  # grainy
        mix = rng.normal(0.3, 0.25, size=x.shape).astype(np.float32)
    pixels = base + (other - base) * np.clip(mix, 0, 1)[..., None]  # [side, side, 3]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of `shape` centred at (cx, cy) with radius r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points = [(0.8 * u, 0.8 * v) for u, v in corners]
    elif shape == "triangle":
        points = [(math.sin(a), -math.cos(a)) for a in (0, 2 * math.pi / 3, 4 * math.pi / 3)]
        points = [(u, v + 0.15) for u, v in points]
    elif shape == "star":
        points = [
            (radius * math.sin(k * math.pi / 5), -radius * math.cos(k * math.pi / 5))
            for k, radius in zip(range(10), [1.0, 0.42] * 5)
        ]
    elif shape == "cross":
        a, b = 0.3, 0.95
        points = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    elif shape == "diamond":
        points = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos)) for u, v in points]


def _draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, colour: int | tuple[int, ...], cx: float, cy: float, r: float, angle: float
) -> None:
    outline = _outline(shape, cx, cy, r, angle)
    if outline is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        draw.polygon(outline, fill=colour)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """The scene as an RGB image of image_size x image_size.

    The background is made at full size; shapes are drawn as masks at SUPERSAMPLE x the size and box-filtered
    down, which gives anti-aliased edges for a fraction of the cost of rendering everything supersampled.
    """
    pixels = _background(scene, image_size, rng).astype(np.float32)  # [H, W, 3]
    jitter = rng.integers(-12, 13, size=3)
    colour = np.clip(np.array(COLOURS[scene.colour]) + jitter, 0, 255)
    side = image_size * SUPERSAMPLE
    layers = [
        (scene.shape, colour, side * (0.5 + scene.dx), side * (0.5 + scene.dy), side * SIZES[scene.size], scene.angle)
    ]
    if scene.accent is not None:
        # A small second shape in the corner farthest from the main one.
        ax, ay = side * (0.13 if scene.dx > 0 else 0.87), side * (0.13 if scene.dy > 0 else 0.87)
        layers.append((scene.accent[0], np.array(COLOURS[scene.accent[1]]), ax, ay, side * 0.09, 0.0))
    for shape, x, y, level in scene.clutter:  # drawn first: the main shape lies on top
        layers.insert(0, (shape, np.full(3, level), side * x, side * y, side * CLUTTER_RADIUS, 0.0))
    for shape, fill, cx, cy, radius, angle in layers:
        mask = Image.new("L", (side, side), 0)
        _draw_shape(ImageDraw.Draw(mask), shape, 255, cx, cy, radius, angle)
        alpha = np.asarray(mask.resize((image_size, image_size), Image.Resampling.BOX), np.float32)[..., None] / 255
        pixels = pixels * (1 - alpha) + fill * alpha  # [H, W, 3]
    image = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    if scene.finish == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=image_size * rng.uniform(0.01, 0.016)))
    if scene.finish == "grain":
        noisy = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(10, 20), size=(image_size, image_size, 3))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image


def near_copy_key(scene: Scene) -> tuple:
    """What two scenes that are near copies share exactly (`near_copy`)."""
    return scene.shape, scene.colour, scene.size, scene.background, scene.accent, bool(scene.clutter), scene.finish


def near_copy(a: Scene, b: Scene, image_size: int) -> bool:
    """Whether two scenes could render as near copies of each other: the same shape, colour, size, background,
    accent and clutter kind, centres within 3 pixels, tilts within 6 degrees and background greys within 24 (a
    near-duplicate moves an image by up to 2 pixels and its brightness by up to 12: `near_duplicate`)."""
    return (
        near_copy_key(a) == near_copy_key(b)
        and max(abs(a.dx - b.dx), abs(a.dy - b.dy)) * image_size <= 3
        and abs(a.angle - b.angle) <= 6
        and abs(a.grey - b.grey) <= 24
    )


def degrade(image: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    """A badly degraded copy: "blur" (heavy Gaussian blur), "noise" (heavy pixel noise) or "crop" (a tiny corner)."""
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=image.width * rng.uniform(0.08, 0.14)))
    if kind == "noise":
        pixels = np.asarray(image, np.float32) + rng.normal(0, rng.uniform(70, 110), size=(*image.size[::-1], 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if kind == "crop":
        side = max(4, image.width // int(rng.integers(5, 9)))
        x, y = (int(v) for v in rng.integers(0, image.width - side, size=2))
        return image.crop((x, y, x + side, y + side))
    raise ValueError(f"unknown degradation {kind!r}")


def near_duplicate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A near copy, as re-uploads make them: shifted by a pixel or two, slightly brighter or darker."""
    shift = tuple(int(v) for v in rng.integers(-2, 3, size=2))
    pixels = np.roll(np.asarray(image, np.int16), shift, axis=(0, 1)) + int(rng.integers(-12, 13))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode_image(image: Image.Image, image_format: str, quality: int = 90) -> bytes:
    """JPEG or PNG bytes (deterministic for a given Pillow build)."""
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    elif image_format == "png":
        image.save(buffer, format="PNG", optimize=False)
    else:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    return buffer.getvalue()


# --- Captions -------------------------------------------------------------------------------------------------

FULL_TEMPLATES = (
    "{a_colour} {shape}",
    "a photo of {a_colour} {shape}",
    "{a_size} {colour} {shape}",
    "{a_colour} {shape} on {a_background} background",
    "{a_size} {colour} {shape} {where}",
    "there is {a_colour} {shape} {where}",
    "a {shape} painted {colour}",
    "{colour} {shape}, {size}, {background} background",
    "close-up of {a_colour} {shape}",
    "a picture showing {a_colour} {shape}",
    "{Colour} {shape}.",
    "my favourite {colour} {shape}!",
)
PARTIAL_TEMPLATES = (  # mention only part of the scene, as web alt-text often does
    "a {shape}",
    "a photo of a {shape}",
    "something {colour}",
    "{a_colour} object",
    "{a_size} shape on {a_background} background",
    "a {shape} {where}",
)
DETAILED_TEMPLATE = "{a_size} {colour} {shape} {where} on {a_background} background"
BOILERPLATE = (
    "image",
    "click here",
    "photo",
    "untitled",
    "thumbnail",
    "view full size",
    "download",
    "no description available",
    "IMG_{n:04d}.JPG",
    "DSC{n:05d}.jpg",
    "image{n}.png",
    "stock photo {n}",
    "Copyright 20{yy:02d} all rights reserved",
    "untitled-{n}",
    "click to enlarge",
    "photo by user{n}",
)
FILLER_WORDS = ("best", "cheap", "free", "shipping", "sale", "buy", "now", "online", "shop", "new", "deal", "top")


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def describe(scene: Scene, rng: np.random.Generator, *, partial_rate: float = 0.2, detailed: bool = False) -> str:
    """A caption of the scene from a random template (a partial one with probability `partial_rate`); `detailed`
    names every attribute, for retrieval evaluation."""
    if detailed:
        template = DETAILED_TEMPLATE
    elif rng.random() < partial_rate:
        template = PARTIAL_TEMPLATES[rng.integers(len(PARTIAL_TEMPLATES))]
    else:
        template = FULL_TEMPLATES[rng.integers(len(FULL_TEMPLATES))]
    background = scene.background
    caption = template.format(
        shape=scene.shape,
        colour=scene.colour,
        Colour=scene.colour.capitalize(),
        size=scene.size,
        background=background,
        where=scene.where,
        a_colour=_article(scene.colour),
        a_size=_article(scene.size),
        a_background=_article(background),
    )
    if scene.accent is not None and (detailed or rng.random() < 0.5):
        body, end = (caption[:-1], caption[-1]) if caption[-1] in ".!" else (caption, "")
        caption = f"{body} and a small {scene.accent[1]} {scene.accent[0]}{end}"
    return caption


def boilerplate_caption(rng: np.random.Generator) -> str:
    """A caption that says nothing about the image."""
    template = BOILERPLATE[rng.integers(len(BOILERPLATE))]
    return template.format(n=int(rng.integers(1, 100_000)), yy=int(rng.integers(0, 25)))


def long_caption(caption: str, rng: np.random.Generator, n_words: int = 2000) -> str:
    """The caption followed by thousands of spam words (~12 KB): far past any text tower's context."""
    return caption + " " + " ".join(FILLER_WORDS[i] for i in rng.integers(len(FILLER_WORDS), size=n_words))
