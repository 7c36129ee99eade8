"""Procedural scenes: 32x32 RGB images of one to four objects on a 4x4 grid, a scene graph per image,
with captions, questions and editing instructions generated from the graph (GenEval and an editing
benchmark in miniature).

An object is a kind (circle, square, triangle, diamond), a colour (six), a size (small: 5 pixels,
large: 7) and a grid cell (row, column, 0-based; each cell is 8x8 pixels and an object sits centred
in it, so two objects never touch). No two objects of a scene share colour and kind, so "the red
circle" always names one object. Shapes are exact pixel masks (no anti-aliasing) on black.

Split: an image is held out when the CRC-32 of its pixels is a multiple of ``HELD_OUT_EVERY``; on top
of that, the ``HELD_OUT_COMBINATIONS`` (a colour and kind in one position relative to another object,
e.g. a red triangle left of anything) never occur in a training image, so neither "a red triangle left of
a blue square" nor its answer "left of" is ever trained on, while red triangles, and other objects left
of others, are: the held-out scenes that hold one measure composition, not memory. The held-out images
are all different.

Samples per scene (:class:`ScenesDataset`):

* text-to-image in GenEval's six categories (:data:`CATEGORIES`): "a circle", "a red circle", "three
  triangles", "a circle and a square", "a red circle left of a blue square", "a red circle and a blue
  square";
* image-to-text: counting, "how many red objects are there?", the colour / shape / size of a named
  object, the position of one object relative to another, and a caption;
* editing: user turn ``[Image(source), instruction]``, assistant turn ``[Image(edited)]``: recolour,
  move, add, remove, resize, swap two objects (:data:`EDIT_TYPES`).
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from ..types import Image, Message
from .task import TaskDataset

IMAGE_SIZE = 32
GRID = 4  # cells per side
CELL = IMAGE_SIZE // GRID
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (40, 90, 240), "yellow": (240, 220, 40),
           "purple": (180, 60, 230), "cyan": (40, 220, 230)}
KINDS = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 5, "large": 7}  # pixels per side; both centred on the same pixel of their cell
OFFSET = {"small": 1, "large": 0}  # from the cell's top-left corner
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_OBJECTS = 4
LAYOUT_WEIGHTS = {"single": 0.2, "pair": 0.35, "count": 0.2, "mixed": 0.25}
SPLIT_SIZES = {"train": 6000, "test": 500}
SPLIT_SEEDS = {"train": 4321, "test": 8765}
HELD_OUT_EVERY = 10
HELD_OUT_COMBINATIONS = frozenset({("red", "triangle", "left of"), ("green", "circle", "right of"),
                                   ("blue", "diamond", "above"), ("yellow", "square", "below"),
                                   ("purple", "circle", "left of"), ("cyan", "triangle", "above")})
CATEGORIES = ("single_object", "two_object", "counting", "colours", "position", "colour_attribution")
EDIT_TYPES = ("recolour", "move", "add", "remove", "resize", "swap")
MOVES = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
RELATIONS = ("left of", "right of", "above", "below")
T2I_TEMPLATES = ("draw {p}", "{p}", "an image of {p}", "show me {p}")
QUESTIONS = {
    "count": "how many objects are there?", "count_colour": "how many {c} objects are there?",
    "colour": "what colour is the {k}?", "shape": "what shape is the {c} object?",
    "size": "what size is the {c} {k}?", "position": "where is the {a} relative to the {b}?",
    "caption": "describe the image",
}


@dataclass(frozen=True)
class Obj:
    """One object of a scene graph."""

    kind: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def name(self) -> str:
        """How prompts and instructions name it ("red circle"; unique within a scene)."""
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    """A scene graph: its objects in reading order (row, then column); build it with :func:`scene_of`."""

    objects: tuple[Obj, ...]

    @property
    def held_out(self) -> bool:
        """Whether it holds a combination no training image has: an object of a held-out colour and kind
        in the held-out :func:`relation` to another object."""
        return any((o.colour, o.kind, relation(o, p)) in HELD_OUT_COMBINATIONS
                   for o in self.objects for p in self.objects if p is not o)


def scene_of(objects) -> Scene:
    """The scene of ``objects`` in canonical (reading) order; rejects overlaps and repeated names."""
    objs = tuple(sorted(objects, key=lambda o: (o.row, o.col)))
    if len({(o.row, o.col) for o in objs}) < len(objs) or len({o.name for o in objs}) < len(objs):
        raise ValueError("a scene has one object per cell and one object per colour and kind")
    return Scene(objs)


@lru_cache(maxsize=None)
def shape_mask(kind: str, size: str) -> np.ndarray:
    """The boolean pixel mask of a kind at a size (``SIZES[size]`` square)."""
    s = SIZES[size]
    c = (s - 1) / 2
    i, j = np.mgrid[0:s, 0:s]
    if kind == "square":
        return np.ones((s, s), bool)
    if kind == "circle":
        return (i - c) ** 2 + (j - c) ** 2 <= (c + 0.5) ** 2
    if kind == "diamond":
        return np.abs(i - c) + np.abs(j - c) <= c
    if kind == "triangle":  # apex at the top, base the full bottom row
        return np.abs(j - c) <= i / 2
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def draw(scene: Scene) -> np.ndarray:
    """The scene as a uint8 RGB array ``[32, 32, 3]``."""
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for o in scene.objects:
        m = shape_mask(o.kind, o.size)
        y, x = o.row * CELL + OFFSET[o.size], o.col * CELL + OFFSET[o.size]
        img[y:y + m.shape[0], x:x + m.shape[1]][m] = COLOURS[o.colour]
    return img


def relation(a: Obj, b: Obj) -> str | None:
    """Where ``a`` is relative to ``b`` along the axis where they are further apart (None on a diagonal)."""
    return offset_relation(a.col - b.col, a.row - b.row)


def offset_relation(dx: float, dy: float) -> str | None:
    """The relation of something ``dx`` right of and ``dy`` below another (cells or pixels) along the axis
    of the larger offset: "left of", "right of", "above", "below" (None when both are equal)."""
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    if abs(dy) > abs(dx):
        return "above" if dy < 0 else "below"
    return None


def where(o: Obj) -> str:
    """Its cell in words, 1-based: "row 2 column 3"."""
    return f"row {o.row + 1} column {o.col + 1}"


def caption(scene: Scene) -> str:
    """Every object in reading order: "a large red circle at row 1 column 2 and a small ..."."""
    parts = [f"a {o.size} {o.name} at {where(o)}" for o in scene.objects]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def plural(kind: str) -> str:
    """"circle" -> "circles"."""
    return kind + "s"


def categories(scene: Scene) -> list[str]:
    """The GenEval categories whose prompt this scene answers exactly."""
    objs, n = scene.objects, len(scene.objects)
    out = []
    if n == 1:
        out += ["single_object", "colours"]
    if len({o.kind for o in objs}) == 1:
        out.append("counting")
    if n == 2:
        if objs[0].kind != objs[1].kind:
            out.append("two_object")
        if relation(*objs) is not None:
            out.append("position")
        out.append("colour_attribution")
    return sorted(out, key=CATEGORIES.index)


def t2i_text(scene: Scene, category: str, flip: bool = False) -> str:
    """The prompt of ``category`` for ``scene`` (``flip``: name the two objects the other way round)."""
    objs = scene.objects[::-1] if flip else scene.objects
    a = objs[0]
    if category == "single_object":
        return f"a {a.kind}"
    if category == "colours":
        return f"a {a.name}"
    if category == "counting":
        n = len(objs)
        return f"one {a.kind}" if n == 1 else f"{COUNT_WORDS[n]} {plural(a.kind)}"
    b = objs[1]
    if category == "two_object":
        return f"a {a.kind} and a {b.kind}"
    if category == "colour_attribution":
        return f"a {a.name} and a {b.name}"
    if category == "position":
        return f"a {a.name} {relation(a, b)} a {b.name}"
    raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")


def t2i_prompt(scene: Scene, category: str, variant: int = 0) -> str:
    """A worded text-to-image prompt (``variant`` picks the wording and, for two objects, the order)."""
    return T2I_TEMPLATES[variant % len(T2I_TEMPLATES)].format(p=t2i_text(scene, category, flip=variant % 2 == 1))


def questions(scene: Scene) -> list[tuple[str, str, str]]:
    """``(type, question, answer)`` for every question the scene answers unambiguously."""
    objs = scene.objects
    qa = [("count", QUESTIONS["count"], COUNT_WORDS[len(objs)])]
    present = [c for c in COLOURS if any(o.colour == c for o in objs)]
    absent = next(c for c in COLOURS if c not in present)
    for c in [*present, absent]:
        qa.append(("count_colour", QUESTIONS["count_colour"].format(c=c),
                   COUNT_WORDS[sum(o.colour == c for o in objs)]))
    for o in objs:
        if sum(p.kind == o.kind for p in objs) == 1:
            qa.append(("colour", QUESTIONS["colour"].format(k=o.kind), o.colour))
        if sum(p.colour == o.colour for p in objs) == 1:
            qa.append(("shape", QUESTIONS["shape"].format(c=o.colour), o.kind))
        qa.append(("size", QUESTIONS["size"].format(c=o.colour, k=o.kind), o.size))
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            if relation(a, b) is not None:
                qa.append(("position", QUESTIONS["position"].format(a=a.name, b=b.name), relation(a, b)))
    return qa + [("caption", QUESTIONS["caption"], caption(scene))]


def _new_object(rng: random.Random, taken: set[tuple[int, int]], names: set[str], kind: str | None = None) -> Obj:
    """A random object in a free cell whose colour and kind no other object has."""
    free = [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]
    while True:
        o = Obj(kind or rng.choice(KINDS), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), *rng.choice(free))
        if o.name not in names:
            return o


def random_scene(rng: random.Random) -> Scene:
    """A scene of one layout (one object, two, two to four of one kind, three or four mixed)."""
    layout = rng.choices(list(LAYOUT_WEIGHTS), weights=list(LAYOUT_WEIGHTS.values()))[0]
    n = {"single": 1, "pair": 2, "count": rng.randint(2, MAX_OBJECTS), "mixed": rng.randint(3, MAX_OBJECTS)}[layout]
    kind = rng.choice(KINDS) if layout == "count" else None
    objs: list[Obj] = []
    for _ in range(n):
        objs.append(_new_object(rng, {(o.row, o.col) for o in objs}, {o.name for o in objs}, kind))
    return scene_of(objs)


@dataclass(frozen=True)
class Edit:
    """An editing instruction and the scene graphs before and after it."""

    type: str
    instruction: str
    source: Scene
    target: Scene


def _others(scene: Scene, *objs: Obj) -> list[Obj]:
    return [o for o in scene.objects if o not in objs]


def _edit_one(rng: random.Random, scene: Scene, kind: str) -> tuple[str, list[Obj]] | None:
    """The instruction and the edited objects for an edit of one object (None if the scene allows none)."""
    o = rng.choice(scene.objects)
    names, cells = {p.name for p in scene.objects}, {(p.row, p.col) for p in scene.objects}
    if kind == "recolour":
        colours = [c for c in COLOURS if f"{c} {o.kind}" not in names]
        c = rng.choice(colours) if colours else None
        return None if c is None else (f"make the {o.name} {c}", [*_others(scene, o), replace(o, colour=c)])
    if kind == "move":
        moves = [(w, (o.row + dr, o.col + dc)) for w, (dr, dc) in MOVES.items()
                 if 0 <= o.row + dr < GRID and 0 <= o.col + dc < GRID and (o.row + dr, o.col + dc) not in cells]
        if not moves:
            return None
        w, (r, c) = rng.choice(moves)
        return f"move the {o.name} {w}", [*_others(scene, o), replace(o, row=r, col=c)]
    if kind == "resize":
        bigger = o.size == "small"
        return (f"make the {o.name} {'bigger' if bigger else 'smaller'}",
                [*_others(scene, o), replace(o, size="large" if bigger else "small")])
    if kind == "remove":
        return None if len(scene.objects) < 2 else (f"remove the {o.name}", _others(scene, o))
    if kind == "add":
        if len(scene.objects) >= MAX_OBJECTS:
            return None
        new = _new_object(rng, cells, names)
        return f"add a {new.size} {new.name} at {where(new)}", [*scene.objects, new]
    raise ValueError(f"unknown edit type {kind!r}; expected one of {EDIT_TYPES}")


def make_edit(rng: random.Random, scene: Scene, kind: str) -> Edit | None:
    """A random edit of type ``kind`` of ``scene`` (None when the scene allows none of that type)."""
    if kind == "swap":
        if len(scene.objects) < 2:
            return None
        a, b = rng.sample(scene.objects, 2)
        done = (f"swap the {a.name} and the {b.name}",
                [*_others(scene, a, b), replace(a, row=b.row, col=b.col), replace(b, row=a.row, col=a.col)])
    else:
        done = _edit_one(rng, scene, kind)
    return None if done is None else Edit(kind, done[0], scene, scene_of(done[1]))


def crc_split(image: np.ndarray) -> str:
    """``"test"`` for the held-out share of all images (by a hash of the pixels), else ``"train"``."""
    return "test" if zlib.crc32(np.ascontiguousarray(image).tobytes()) % HELD_OUT_EVERY == 0 else "train"


def split_of(scene: Scene, image: np.ndarray | None = None) -> str | None:
    """The split an image belongs to: ``"test"`` by its hash; ``"train"`` unless it holds a held-out
    combination (then ``None``: in no training set)."""
    if crc_split(draw(scene) if image is None else image) == "test":
        return "test"
    return None if scene.held_out else "train"


@lru_cache(maxsize=4)
def load_split(split: str) -> tuple[tuple[Scene, ...], np.ndarray]:
    """The fixed scenes of a split and their images ``[n, 32, 32, 3]`` (held-out images all different)."""
    if split not in SPLIT_SIZES:
        raise ValueError(f"split must be one of {sorted(SPLIT_SIZES)}, got {split!r}")
    rng = random.Random(SPLIT_SEEDS[split])
    scenes, images, seen = [], [], set()
    while len(scenes) < SPLIT_SIZES[split]:
        scene = random_scene(rng)
        img = draw(scene)
        if split_of(scene, img) == split and not (split == "test" and img.tobytes() in seen):
            seen.add(img.tobytes())
            scenes.append(scene)
            images.append(img)
    return tuple(scenes), np.stack(images)


@lru_cache(maxsize=4)
def load_edits(split: str) -> tuple[Edit | None, ...]:
    """One edit per scene of the split (aligned with :func:`load_split`; None where none was found), the
    types taken in turn (the next type a scene allows); a training edit's result is a training image
    too, so no held-out image is ever a target in training."""
    rng = random.Random(SPLIT_SEEDS[split] + 1)
    edits = []
    for i, scene in enumerate(load_split(split)[0]):
        found = None
        for k in range(3 * len(EDIT_TYPES)):  # the preferred type first, a few draws each
            e = make_edit(rng, scene, EDIT_TYPES[(i + k // 3) % len(EDIT_TYPES)])
            if e is not None and (split == "test" or split_of(e.target) == "train"):
                found = e
                break
        edits.append(found)
    return tuple(edits)


def all_texts() -> list[str]:
    """Strings covering the task's vocabulary (prompts, questions, answers, captions, instructions), for
    the text tokenizer: every prompt of the training scenes, their questions, answers and edits."""
    scenes, _ = load_split("train")
    texts = list(COUNT_WORDS) + list(COLOURS) + list(KINDS) + list(SIZES) + list(RELATIONS)
    for i, s in enumerate(scenes[:2000]):
        texts += [t2i_prompt(s, c, i) for c in categories(s)]
        texts += [t for _, q, a in questions(s) for t in (q, a)]
    return texts + [e.instruction for e in load_edits("train")[:2000] if e is not None]


@dataclass
class ScenesDataset(TaskDataset):
    """Per scene a text-to-image sample (one of its GenEval categories, if it has one), an image-to-text
    sample (one of its questions) and an editing sample. Deterministic given ``seed``, which picks the
    categories, wordings and questions (the scenes and edits are fixed per split)."""

    split: str = "train"
    seed: int = 0
    kinds: tuple[str, ...] = ("t2i", "i2t", "edit")

    def __post_init__(self):
        self.check_kinds(self.kinds, ("t2i", "i2t", "edit"))
        self.scenes, self.images = load_split(self.split)
        self.edits = load_edits(self.split)
        rng = random.Random(self.seed)
        self.index = []
        for i, scene in enumerate(self.scenes):
            for kind in self.kinds:
                if (kind != "t2i" or categories(scene)) and (kind != "edit" or self.edits[i] is not None):
                    self.index.append((kind, i, rng.randrange(1000)))

    texts = staticmethod(all_texts)

    @staticmethod
    def preview_prompts() -> list[str]:
        red, blue = Obj("circle", "red", "large", 1, 0), Obj("square", "blue", "small", 1, 3)
        tri = [Obj("triangle", c, "large", 2, k) for k, c in enumerate(("green", "yellow", "cyan"))]
        return [t2i_prompt(scene_of([red]), "colours"), t2i_prompt(scene_of([red, blue]), "position"),
                t2i_prompt(scene_of(tri), "counting"), t2i_prompt(scene_of([red, blue]), "colour_attribution")]

    def __getitem__(self, idx: int) -> list[Message]:
        kind, i, v = self.index[idx]
        scene, image = self.scenes[i], Image(self.images[i])
        if kind == "t2i":
            cats = categories(scene)
            return [Message("user", t2i_prompt(scene, cats[v % len(cats)], v // len(cats))),
                    Message("assistant", [image])]
        if kind == "edit":
            e = self.edits[i]
            return [Message("user", [Image(draw(e.source)), e.instruction]), Message("assistant", [Image(draw(e.target))])]
        qa = questions(scene)
        _, question, answer = qa[v % len(qa)]
        return [Message("user", [image, question]), Message("assistant", answer)]
