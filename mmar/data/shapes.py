"""Procedural coloured shapes: small RGB scenes with captions and questions (a GenEval in miniature).

A scene holds one shape (a colour, a kind and a place: left / right / top / bottom) or two shapes
side by side or one above the other; two shapes of the same colour and kind are a counting scene
("two red circles"). Shapes are drawn without anti-aliasing on a black ``IMAGE_SIZE`` square.

Samples, from a fixed train / held-out split: an image belongs to the held-out split when a hash of its
pixels says so (one in ``HELD_OUT_EVERY``), so no held-out image is ever seen in training, while every
kind of scene and every caption occurs in both splits. The held-out images are all different.

* text-to-image: "draw a red circle on the left" -> image
* image-to-text: image + a question ("what colour is the shape?", "how many shapes are there?",
  "what shape is on the right?", "describe the image") -> the answer
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw
from ..types import Image, Message
from .task import TaskDataset

IMAGE_SIZE = 16
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (40, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
PLACES = ("left", "right", "top", "bottom")
PLACE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
SIZES = (0.375, 0.4375)  # shape width / height as a share of the image side (6 and 7 pixels at 16)
JITTER = 1  # across its place's axis a shape moves up to this many pixels from the middle
SINGLE_INSET = 2  # a shape alone sits up to this many pixels away from its edge
COUNT_WORDS = ("zero", "one", "two", "three")
SPLIT_SIZES = {"train": 4000, "test": 400}
SPLIT_SEEDS = {"train": 1234, "test": 5678}
HELD_OUT_EVERY = 10  # an image is held out when the CRC-32 of its pixels is a multiple of this
LAYOUT_WEIGHTS = {"single": 0.4, "pair": 0.45, "count": 0.15}

T2I_PROMPTS = ("draw {c}", "{c}", "an image of {c}", "show me {c}")
QUESTIONS = {
    "colour": "what colour is the shape?", "shape": "what shape is this?", "place": "where is the shape?",
    "count": "how many shapes are there?", "caption": "describe the image",
    "colour_first": "what colour is the shape on the {a}?", "shape_second": "what shape is on the {b}?",
}


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    x0: int  # top-left corner of its bounding box, in pixels
    y0: int
    size: int

    @property
    def centre(self) -> tuple[float, float]:
        return self.x0 + (self.size - 1) / 2, self.y0 + (self.size - 1) / 2


@dataclass(frozen=True)
class Scene:
    """``layout``: a place for one shape, ``"horizontal"`` (first shape on the left) or ``"vertical"``
    (first shape at the top) for two."""

    shapes: tuple[Shape, ...]
    layout: str

    @property
    def is_count(self) -> bool:
        return len(self.shapes) == 2 and (self.shapes[0].kind, self.shapes[0].colour) == \
            (self.shapes[1].kind, self.shapes[1].colour)


def caption(scene: Scene) -> str:
    a = scene.shapes[0]
    if len(scene.shapes) == 1:
        return f"a {a.colour} {a.kind} {PLACE_WORDS[scene.layout]}"
    if scene.is_count:
        return f"two {a.colour} {a.kind}s"
    b = scene.shapes[1]
    if scene.layout == "horizontal":
        return f"a {a.colour} {a.kind} on the left and a {b.colour} {b.kind} on the right"
    return f"a {a.colour} {a.kind} above a {b.colour} {b.kind}"


def questions(scene: Scene) -> list[tuple[str, str]]:
    """(question, answer) pairs that the scene answers unambiguously."""
    qa = [(QUESTIONS["count"], COUNT_WORDS[len(scene.shapes)]), (QUESTIONS["caption"], caption(scene))]
    a = scene.shapes[0]
    if len(scene.shapes) == 1:
        return qa + [(QUESTIONS["colour"], a.colour), (QUESTIONS["shape"], a.kind), (QUESTIONS["place"], scene.layout)]
    first, second = ("left", "right") if scene.layout == "horizontal" else ("top", "bottom")
    return qa + [(QUESTIONS["colour_first"].format(a=first), a.colour),
                 (QUESTIONS["shape_second"].format(b=second), scene.shapes[1].kind)]


def draw(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as a uint8 RGB array ``[H, W, 3]``."""
    img = PILImage.new("RGB", (image_size, image_size), (0, 0, 0))
    pen = ImageDraw.Draw(img)
    for s in scene.shapes:
        x0, y0, x1, y1 = s.x0, s.y0, s.x0 + s.size - 1, s.y0 + s.size - 1
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            pen.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            pen.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            pen.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return np.asarray(img, dtype=np.uint8).copy()


def random_shape(rng: random.Random, place: str, image_size: int, kind: str | None = None,
                 colour: str | None = None, inset: int = 0) -> Shape:
    """A shape up to ``inset`` pixels from the ``place`` edge, centred across it give or take ``JITTER``
    pixels (two shapes against opposite edges never touch)."""
    size = round(rng.choice(SIZES) * image_size)
    gap = rng.randint(0, inset)
    along = gap if place in ("left", "top") else image_size - size - gap
    across = (image_size - size) // 2 + rng.randint(-JITTER, JITTER)
    x0, y0 = (along, across) if place in ("left", "right") else (across, along)
    return Shape(kind or rng.choice(SHAPES), colour or rng.choice(list(COLOURS)), x0, y0, size)


def random_scene(rng: random.Random, image_size: int = IMAGE_SIZE) -> Scene:
    layout = rng.choices(list(LAYOUT_WEIGHTS), weights=list(LAYOUT_WEIGHTS.values()))[0]
    if layout == "single":
        place = rng.choice(PLACES)
        return Scene((random_shape(rng, place, image_size, inset=SINGLE_INSET),), place)
    pair = rng.choice(("horizontal", "vertical"))
    places = ("left", "right") if pair == "horizontal" else ("top", "bottom")
    a = random_shape(rng, places[0], image_size)
    if layout == "count":
        b = random_shape(rng, places[1], image_size, a.kind, a.colour)
    else:
        while True:  # a different colour or kind, so the pair is not a counting scene
            b = random_shape(rng, places[1], image_size)
            if (b.kind, b.colour) != (a.kind, a.colour):
                break
    return Scene((a, b), pair)


def split_of(image: np.ndarray) -> str:
    """``"test"`` for the held-out share of all possible images, ``"train"`` for the rest."""
    return "test" if zlib.crc32(np.ascontiguousarray(image).tobytes()) % HELD_OUT_EVERY == 0 else "train"


@lru_cache(maxsize=4)
def load_split(split: str, image_size: int = IMAGE_SIZE) -> tuple[tuple[Scene, ...], np.ndarray]:
    """The fixed scenes of a split and their images ``[n, H, W, 3]``: random scenes whose image belongs
    to the split (training images may repeat; held-out images are all different)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
    rng = random.Random(SPLIT_SEEDS[split])
    scenes, images, seen = [], [], set()
    while len(scenes) < SPLIT_SIZES[split]:
        scene = random_scene(rng, image_size)
        img = draw(scene, image_size)
        if split_of(img) == split and not (split == "test" and img.tobytes() in seen):
            seen.add(img.tobytes())
            scenes.append(scene)
            images.append(img)
    return tuple(scenes), np.stack(images)


def t2i_prompt(scene: Scene, i: int = 0) -> str:
    return T2I_PROMPTS[i % len(T2I_PROMPTS)].format(c=caption(scene))


def all_texts() -> list[str]:
    """Every string the task uses (all captions, prompts, questions and answers), for the text tokenizer."""
    texts = list(COUNT_WORDS) + list(COLOURS) + list(SHAPES) + list(PLACES)
    texts += [q.format(a=a, b=b) for q in QUESTIONS.values() for a, b in (("left", "right"), ("top", "bottom"))]
    scenes = []
    for c1 in COLOURS:
        for k1 in SHAPES:
            one = Shape(k1, c1, 0, 0, 0)
            scenes += [Scene((one,), place) for place in PLACES]
            scenes += [Scene((one, Shape(k2, c2, 0, 0, 0)), lay) for c2 in COLOURS for k2 in SHAPES
                       for lay in ("horizontal", "vertical")]
    return texts + [t2i_prompt(s, i) for s in scenes for i in range(len(T2I_PROMPTS))]


@dataclass
class ShapesDataset(TaskDataset):
    """Per scene a text-to-image and an image-to-text sample (one of its questions). Deterministic
    given ``seed``, which picks prompt wordings and questions (the scenes are fixed per split)."""

    split: str = "train"
    seed: int = 0
    image_size: int = IMAGE_SIZE
    kinds: tuple[str, ...] = ("t2i", "i2t")

    def __post_init__(self):
        self.check_kinds(self.kinds, ("t2i", "i2t"))
        self.scenes, self.images = load_split(self.split, self.image_size)
        self.index = self.seeded_index(len(self.scenes), self.kinds, self.seed)

    texts = staticmethod(all_texts)

    @staticmethod
    def preview_prompts() -> list[str]:
        a, b = Shape("circle", "red", 0, 0, 0), Shape("square", "blue", 0, 0, 0)
        return [t2i_prompt(Scene((a,), "left")), t2i_prompt(Scene((b,), "top")),
                t2i_prompt(Scene((a, b), "horizontal")), t2i_prompt(Scene((b, b), "vertical"))]

    def __getitem__(self, idx: int) -> list[Message]:
        kind, i, v = self.index[idx]
        scene, image = self.scenes[i], Image(self.images[i])
        if kind == "t2i":
            return [Message("user", t2i_prompt(scene, v)), Message("assistant", [image])]
        qa = questions(scene)
        question, answer = qa[v % len(qa)]
        return [Message("user", [image, question]), Message("assistant", answer)]
